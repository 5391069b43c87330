"""wanted_nexthops() (the next hops the resolvers keep resolved ahead of new flows) keeps the union of the services'
real servers' next hops up to date from the services whose real servers changed, instead of walking every service
on every change. After any change (services, real servers, routes, interface and local addresses, batches applied
or refused, a restart's restore), and also when asked in the middle of a batch (the resolvers' kick), it must
answer what a walk of the whole model says."""

import random

from hdslb.balancer import Balancer
from hdslb.ctl import commands
from hdslb.errors import HdslbError

from .test_batch import Ctx, random_change, restarted


def _walk(b: Balancer) -> dict:
    """The rule, from a walk of every service and real server: each real server's next hop (of its family, on an
    attached interface), less the addresses that are ours (interface and local addresses)."""
    want = {}
    for s in b.services.values():
        if s.match is not None:
            continue
        for d in s.dests.values():
            nh = b.nexthop(d.addr)
            if nh and nh[0].version == d.addr.version and nh[1] in b.ifaces and not nh[0].is_unspecified:
                want.setdefault(nh[0], nh[1])
    ours = {a.addr for a in b.addrs} | {la.addr for s in b.services.values() for la in s.laddrs} | \
        set(b.retired_laddrs)
    return {nh: ifname for nh, ifname in want.items() if nh not in ours}


def test_wanted_nexthops_answer_the_walk_after_every_change():
    rng = random.Random(11)
    ctx = Ctx()

    ctx.bal.WANTED_STALE_ABOVE_S = float("inf")  # never served stale here: every answer is checked
    asked = [0]

    def kick():  # the daemon's resolvers, kicked by dest.add, ask at once (also inside a batch)
        if rng.random() < 0.3:
            asked[0] += 1
            ctx.bal.wanted_nexthops()

    ctx.resolve_soon = kick

    def svc():
        return {"proto": "tcp", "addr": f"10.0.0.{rng.randrange(1, 9)}", "port": 80}

    def rs():  # two connected subnets, one behind a gateway (two routes to it), and one with no route
        return rng.choice(["192.168.1.", "192.168.2.", "172.16.0.", "172.17.0."]) + str(rng.randrange(1, 30))

    routes = [{"prefix": "172.16.0.0", "prefixlen": 16, "ifname": "eth1", "via": "192.168.1.254"},
              {"prefix": "172.16.0.0", "prefixlen": 24, "ifname": "eth0", "via": "192.168.2.254"},
              {"prefix": "192.168.2.0", "prefixlen": 24, "ifname": "eth0"}]

    def existing_dest():  # mostly a real server that is there (its next hop often no other service's)
        svcs = [s for s in ctx.bal.services.values() if s.dests and s.match is None]
        if not svcs or rng.random() < 0.2:
            return {"svc": svc(), "addr": rs(), "port": 80}
        s = rng.choice(svcs)
        d = rng.choice(list(s.dests.values()))
        return {"svc": {"proto": s.proto, "addr": str(s.addr), "port": s.port}, "addr": str(d.addr), "port": d.port}

    def one():
        return rng.choice([
            lambda: ["service.add", dict(svc(), sched=rng.choice(["rr", "wrr", "mh"]))],
            lambda: ["service.del", svc()],
            lambda: ["dest.add", {"svc": svc(), "addr": rs(), "port": 80}],
            lambda: ["dest.add", {"svc": svc(), "addr": rs(), "port": 80}],
            lambda: ["dest.add", {"svc": svc(), "addr": rs(), "port": 8080, "fwd": "dr"}],  # refused: DR port
            lambda: ["dest.del", existing_dest()],
            lambda: ["dest.del", existing_dest()],
            lambda: ["dest.edit", {"svc": svc(), "addr": rs(), "port": 80, "weight": rng.randrange(0, 4)}],
            lambda: ["laddr.add", {"svc": svc(), "addr": rs(), "ifname": "eth1"}],
            lambda: ["laddr.del", {"svc": svc(), "addr": rs()}],
            lambda: ["route.add", rng.choice(routes)],
            lambda: ["route.del", rng.choice(routes)],
            lambda: ["addr.add", {"addr": rs(), "prefixlen": 32, "ifname": "eth1"}],
            lambda: ["addr.del", {"addr": rs(), "prefixlen": 32, "ifname": "eth1"}],
        ])()

    ctx.bal.route_add({"prefix": "192.168.1.0", "prefixlen": 24, "ifname": "eth1"})
    checked = applied = refused = 0
    for step in range(3000):
        r = rng.random()
        try:
            if random_change(ctx, rng, one, r, 0.55, 0.75):
                pass
            elif r < 0.85:  # new services only: no dry run, undone whole when refused
                ops = []
                for _ in range(rng.randrange(1, 4)):
                    s = {"proto": "udp", "addr": f"10.1.0.{rng.randrange(1, 30)}", "port": 53}
                    ops.append(["service.add", dict(s, sched="rr")])
                    ops += [["dest.add", {"svc": s, "addr": rs(), "port": 53}] for _ in range(rng.randrange(0, 4))]
                if rng.random() < 0.3:
                    ops.append(["dest.add", {"svc": s, "addr": rs(), "port": 99, "fwd": "dr"}])
                commands.dispatch(ctx, "batch", {"ops": ops})
            elif r < 0.87:  # a restart: the model restored from its snapshot
                ctx.bal = restarted(ctx.bal, WANTED_STALE_ABOVE_S=float("inf"))
            applied += 1
        except HdslbError:
            refused += 1
        if rng.random() < 0.5:
            checked += 1
            got = ctx.bal.wanted_nexthops()
            assert got == _walk(ctx.bal), (step, got, _walk(ctx.bal))
    assert checked > 1000 and applied > 800 and refused > 300 and asked[0] > 50, (checked, applied, refused, asked)
    assert any(ctx.bal.wanted_nexthops().values()), "the run ends with next hops wanted"
