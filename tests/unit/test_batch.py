"""Batches: ipvsadm -R, dpip -b and REST set changes as one request each, validated on a scratch model before
anything is applied (or, adding only new services, undone whole when refused), with each touched service's table
rebuilt once; the id pools and route index that keep bulk loads linear; the configurable limits."""

import asyncio
import errno
import io
import ipaddress
import random

import msgpack
import pytest

from cli import dpip, ipvsadm
from hdslb.balancer import Balancer, Iface, IdPool, restore, snapshot
from hdslb.ctl import commands, protocol
from hdslb.ctl.client import Client
from hdslb.ctl.server import CtlServer
from hdslb.errors import HdslbError

from .test_balancer import Recorder

A = ipaddress.ip_address
IFACES = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)}


class Ctx:
    """What the commands need from the daemon, over a real Balancer with a recording datapath."""

    def __init__(self, **kw):
        self.bal = Balancer(Recorder(), dict(IFACES), **kw)

    def resolve_soon(self):
        pass

    def announce(self, *a):
        pass


def random_change(ctx, rng, one, r: float, ops_below: float, batches_below: float) -> bool:
    """A step of a randomized model test: r < ops_below applies one op made by one(), r < batches_below a batch of
    1-5 of them (applied whole, or refused whole: its dry run, or its creates undone); a refusal raises
    HdslbError. False: the step is the caller's."""
    if r < ops_below:
        op, a = one()
        commands.dispatch(ctx, op, a)
    elif r < batches_below:
        commands.dispatch(ctx, "batch", {"ops": [one() for _ in range(rng.randrange(1, 6))]})
    else:
        return False
    return True


def restarted(bal: Balancer, **attrs) -> Balancer:
    """A restart's model: a new Balancer restored from bal's snapshot (attrs set on it before)."""
    b = Balancer(Recorder(), dict(IFACES))
    for k, v in attrs.items():
        setattr(b, k, v)
    restore(b, snapshot(bal))
    return b


class ModelClient:
    """Stands in for hdslb.ctl.client.Client: runs each request through the command registry of a real model, and
    carries refusals back as the control socket does (errno, message, index)."""

    def __init__(self, ctx):
        self.ctx, self.calls, self.path = ctx, [], None

    def __call__(self, path=None):
        self.path = path
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def call(self, op, args=None):
        self.calls.append(op)
        args = msgpack.unpackb(msgpack.packb(args or {}), strict_map_key=False)  # what the wire carries
        try:
            return commands.dispatch(self.ctx, op, args)
        except HdslbError as e:
            rep = protocol.reply_err(1, e.errno, e.message, getattr(e, "index", None))
            err = HdslbError(rep["errno"], rep["error"])
            err.index = rep.get("index")
            raise err from None

    batch = Client.batch


def state(b: Balancer):
    return snapshot(b), sorted(b._slots_used), sorted(b._ids_used), [list(r) for r in b.cells.runs]


RESTORE = """\
-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 192.168.1.1:80 -b -w 1
-a -t 10.0.0.1:80 -r 192.168.1.2:80 -b -w 2
-A -u 10.0.0.2:53 -s mh
-a -u 10.0.0.2:53 -r 192.168.1.3:53 -b
-a -u 10.0.0.2:53 -r 192.168.1.4:53 -b
"""


# --- ipvsadm -R -------------------------------------------------------------------------------------
@pytest.fixture
def model(monkeypatch):
    ctx = Ctx()
    ctx.bal.service_add({"proto": "tcp", "addr": "10.9.9.9", "port": 80, "sched": "wrr"})
    ctx.bal.dest_add({"svc": {"proto": "tcp", "addr": "10.9.9.9", "port": 80}, "addr": "192.168.9.1", "port": 80})
    client = ModelClient(ctx)
    monkeypatch.setattr(ipvsadm, "Client", client)
    monkeypatch.setattr(dpip, "Client", client)
    return ctx, client


def test_restore_is_one_request_and_applies_everything(model, monkeypatch):
    ctx, client = model
    monkeypatch.setattr("sys.stdin", io.StringIO(RESTORE))
    assert ipvsadm.main(["-R"]) == 0
    assert client.calls == ["batch"]
    svc = ctx.bal.services[("udp", A("10.0.0.2"), 53)]
    assert sorted(str(d.addr) for d in svc.dests.values()) == ["192.168.1.3", "192.168.1.4"]
    assert svc.hcells is not None, "the mh table was built and placed in hash_cells"


def test_restore_bad_line_in_the_middle_applies_nothing(model, monkeypatch, capsys):
    ctx, client = model
    before, writes = state(ctx.bal), len(ctx.bal.dp.calls)
    # line 5 names a service nobody created: the daemon refuses it after lines 1-4 were accepted in the dry run
    text = RESTORE.replace("-a -u 10.0.0.2:53 -r 192.168.1.3:53 -b", "-a -u 10.0.0.7:53 -r 192.168.1.3:53 -b")
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert ipvsadm.main(["-R"]) == 2
    # an -a line naming a missing service: ipvsadm's words for it
    assert capsys.readouterr().err == "line 5: Service not defined; nothing of the restore was applied\n"
    assert client.calls == ["batch"]
    assert state(ctx.bal) == before, "nothing of the batch reached the model"
    assert len(ctx.bal.dp.calls) == writes, "nor the maps"


def test_restore_that_clears_first_replaces_the_table(model, monkeypatch):
    """The usual `-C` then the saved rules: the flush runs in the dry run's scratch model too, over services it
    copies while iterating (each must come round once, or the second removal of a service fails)."""
    ctx, client = model
    ctx.bal.service_add({"proto": "udp", "addr": "10.9.9.8", "port": 53, "sched": "rr"})
    monkeypatch.setattr("sys.stdin", io.StringIO("-C\n" + RESTORE))
    assert ipvsadm.main(["-R"]) == 0
    assert client.calls == ["batch"]
    assert sorted((k[0], str(k[1]), k[2]) for k in ctx.bal.services) == [("tcp", "10.0.0.1", 80),
                                                                         ("udp", "10.0.0.2", 53)]


def test_restore_with_reads_between_changes_checks_every_change_first(model, monkeypatch, capsys):
    """-Z or -L between rule lines splits them into several batches; a refused rule after such a line still
    leaves everything as it was: all the changes are checked together (a dry run) before any is applied."""
    ctx, client = model
    before, writes = state(ctx.bal), len(ctx.bal.dp.calls)
    monkeypatch.setattr("sys.stdin", io.StringIO(
        "-A -t 10.0.0.1:80 -s rr\n-Z\n-A -t 10.0.0.2:80 -s rr\n-a -t 10.0.0.3:80 -r 192.168.1.1 -b\n"))
    assert ipvsadm.main(["-R"]) == 2
    # an -a line naming a missing service: ipvsadm's words for it
    assert capsys.readouterr().err == "line 4: Service not defined; nothing of the restore was applied\n"
    assert client.calls == ["batch"], "the dry run refused it: nothing else was sent"
    assert state(ctx.bal) == before and len(ctx.bal.dp.calls) == writes
    # accepted: the lines run in order, -Z in its place between the two batches (on a service the first made)
    monkeypatch.setattr("sys.stdin", io.StringIO("-A -t 10.0.0.1:80 -s rr\n-Z -t 10.0.0.1:80\n-A -t 10.0.0.2:80 -s rr\n"))
    client.calls.clear()
    zeroed = []
    monkeypatch.setattr(commands, "COMMANDS", dict(commands.COMMANDS, **{
        "stats.zero": lambda c, a: zeroed.append((a, sorted(str(k[1]) for k in c.bal.services)))}))
    assert ipvsadm.main(["-R"]) == 0
    assert client.calls == ["batch", "batch", "stats.zero", "batch"]
    assert zeroed[0][1] == ["10.0.0.1", "10.9.9.9"], "-Z ran after the first line, before the third"
    assert ("tcp", A("10.0.0.2"), 80) in ctx.bal.services


@pytest.mark.parametrize("text, bad", [
    ("-A -t 10.0.0.1:80 -s rr\n-Z -t 10.0.0.7:80\n", 2),
    ("-A -t 10.0.0.1:80 -s rr\n-L -n -t 10.0.0.7:80\n-A -t 10.0.0.2:80 -s rr\n", 2),
    ("-A -t 10.0.0.1:80 -s rr\n--get-laddr -t 10.0.0.7:80\n", 2),
    ("-A -t 10.0.0.1:80 -s rr\n-D -t 10.0.0.1:80\n-Z -t 10.0.0.1:80\n-A -t 10.0.0.2:80 -s rr\n", 3),  # removed before
])
def test_a_read_of_a_service_that_will_not_be_there_refuses_the_restore_before_any_change(model, monkeypatch, capsys,
                                                                                          text, bad):
    """A read line runs in its place, after the changes before it were applied: -Z or -L of a service that is not
    there at that point failed with "the changes up to line 1 were applied". The dry run now checks such a read
    with the changes (an edit naming only the service, which changes nothing), so nothing is applied."""
    ctx, client = model
    before, writes = state(ctx.bal), len(ctx.bal.dp.calls)
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert ipvsadm.main(["-R"]) == 2
    assert capsys.readouterr().err == f"line {bad}: No such service; nothing of the restore was applied\n"
    assert client.calls == ["batch"], "the dry run refused it: nothing else was sent"
    assert state(ctx.bal) == before and len(ctx.bal.dp.calls) == writes


def test_restore_table_refused_at_the_end_names_the_last_line_of_that_service(model, monkeypatch, capsys):
    ctx, client = model
    ctx.bal.cells = type(ctx.bal.cells)(600)  # one 251-cell Maglev table and room to rebuild it; not two
    before = state(ctx.bal)
    monkeypatch.setattr("sys.stdin", io.StringIO(
        "-A -t 10.0.0.1:80 -s mh --sched-flags size=251\n-a -t 10.0.0.1:80 -r 192.168.1.1:80 -b\n"
        "-A -t 10.0.0.3:80 -s mh --sched-flags size=251\n-a -t 10.0.0.3:80 -r 192.168.1.5:80 -b\n"
        "-a -t 10.0.0.3:80 -r 192.168.1.6:80 -b\n"))
    assert ipvsadm.main(["-R"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("line 5: ") and "hash" in err and "nothing of the restore was applied" in err
    assert state(ctx.bal) == before


def test_a_batch_of_new_services_is_applied_without_a_dry_run_and_undone_whole(monkeypatch):
    """A bulk load of new services skips the scratch copy (a quarter of a REST PUT's daemon time); a refusal in an op or
    in building a table at the end removes what it added, and no map was written before it was refused."""
    ctx = Ctx()
    ctx.bal.service_add({"proto": "tcp", "addr": "10.9.9.9", "port": 80, "sched": "wrr"})
    ctx.bal.dest_add({"svc": {"proto": "tcp", "addr": "10.9.9.9", "port": 80}, "addr": "192.168.9.1", "port": 80})

    def no_scratch(*a, **kw):
        raise AssertionError("dry run")

    monkeypatch.setattr(ctx.bal, "scratch", no_scratch)
    new = [["service.add", {"proto": "tcp", "addr": "10.0.0.1", "port": 80, "sched": "rr"}],
           ["dest.add", {"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": 80}, "addr": "192.168.1.1"}],
           ["service.set", {"proto": "udp", "addr": "10.0.0.2", "port": 53, "sched": "mh"}],
           ["dest.set", {"svc": {"proto": "udp", "addr": "10.0.0.2", "port": 53}, "addr": "192.168.1.2"}]]
    assert commands.only_creates(ctx.bal, new)
    for refused, bad in ((3, ["dest.add", {"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": 80},
                                           "addr": "192.168.1.3", "port": 8080, "fwd": "dr"}]),
                         (2, ["dest.add", {"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": 80},
                                           "addr": "192.168.1.1"}])):
        before, writes = state(ctx.bal), len(ctx.bal.dp.calls)
        with pytest.raises(HdslbError) as e:
            commands.dispatch(ctx, "batch", {"ops": new[:2] + [bad] + new[2:]})
        assert e.value.index == 2 and state(ctx.bal) == before
        assert len(ctx.bal.dp.calls) == writes, "a refused batch of new services wrote nothing"
    # refused at the end: the second Maglev table finds no room; the first service is not published either
    cells, ctx.bal.cells = ctx.bal.cells, type(ctx.bal.cells)(600)
    two = new + [["service.add", {"proto": "udp", "addr": "10.0.0.3", "port": 53, "sched": "mh",
                                  "sched_params": {"size": 251}}],
                 ["dest.add", {"svc": {"proto": "udp", "addr": "10.0.0.3", "port": 53}, "addr": "192.168.1.4"}]]
    two[2] = ["service.set", dict(two[2][1], sched_params={"size": 251})]
    before, writes = state(ctx.bal), len(ctx.bal.dp.calls)
    with pytest.raises(HdslbError) as e:
        commands.dispatch(ctx, "batch", {"ops": two})
    assert e.value.errno == errno.ENOSPC and e.value.index == 5
    assert state(ctx.bal) == before and len(ctx.bal.dp.calls) == writes
    ctx.bal.cells = cells
    # a map write failing while the second service is published (writing its Maglev table): both services go,
    # the first one's maps are cleared, and every hash cell is free again
    before, writes = state(ctx.bal), len(ctx.bal.dp.calls)
    rec = ctx.bal.dp

    class Failing:
        def __getattr__(self, name):
            def call(*a):
                if name == "hash_cells_set":
                    raise OSError(errno.ENOMEM, "cannot write hash_cells")
                return getattr(rec, name)(*a)
            return call

    ctx.bal.dp = Failing()
    with pytest.raises(OSError):
        commands.dispatch(ctx, "batch", {"ops": new})
    ctx.bal.dp = rec
    assert state(ctx.bal) == before, "model, slots, ids and hash cells as they were"
    done = [(n, a[0].addr) for n, a in rec.calls[writes:] if n in ("service_set", "service_del")]
    # the first was published and is removed; the second had its slots written: removed too (clears them)
    assert done == [("service_set", A("10.0.0.1")), ("service_del", A("10.0.0.1")),
                    ("service_del", A("10.0.0.2"))], done
    writes = len(ctx.bal.dp.calls)
    # accepted: published in order, each new service's slots and table before its svc_map entry
    assert commands.dispatch(ctx, "batch", {"ops": new}) == {"applied": 4, "warnings": []}
    names = [(n, a[0].addr if n in ("service_set", "sched_set", "dest_set") else None)
             for n, a in ctx.bal.dp.calls[writes:]]
    for vip in (A("10.0.0.1"), A("10.0.0.2")):
        seq = [n for n, a in names if a == vip]
        assert seq == ["dest_set", "sched_set", "service_set"], seq
    assert len(ctx.bal.services) == 3


def test_a_refused_batch_of_new_services_with_local_addresses_wrote_and_announced_nothing():
    """Local addresses of a new service are written with its slots when it is published, and announced (gratuitous
    ARP) once the batch stands: a batch refused after them (undone, no dry run) claimed nothing on the wire."""
    ctx = Ctx()
    said = []
    ctx.announce = lambda *a: said.append(a)
    mine = {"proto": "tcp", "addr": "10.0.0.1", "port": 80}
    ops = [["service.add", dict(mine, sched="rr")],
           ["laddr.add", {"svc": mine, "addr": "192.168.100.1", "ifname": "eth1"}],
           ["dest.add", {"svc": mine, "addr": "192.168.1.1", "port": 80, "fwd": "fnat"}]]
    assert commands.only_creates(ctx.bal, ops)
    before, writes = state(ctx.bal), len(ctx.bal.dp.calls)
    bad = ["dest.add", {"svc": mine, "addr": "192.168.1.2", "port": 8080, "fwd": "dr"}]
    with pytest.raises(HdslbError) as e:
        commands.dispatch(ctx, "batch", {"ops": ops + [bad]})
    assert e.value.index == 3 and state(ctx.bal) == before
    # (the batch's end writes each address it touched from the model: here, that it is not ours)
    assert ctx.bal.dp.calls[writes:] == [("local_del", (A("192.168.100.1"),))]
    assert said == [] and not ctx.bal.is_local(A("192.168.100.1"))
    commands.dispatch(ctx, "batch", {"ops": ops})
    names = [n for n, _ in ctx.bal.dp.calls[writes:]]
    assert names.index("laddrs_set") < names.index("service_set") and "local_set" in names
    assert said == [("192.168.100.1", "eth1")] and ctx.bal.is_local(A("192.168.100.1"))


def test_only_new_services_skip_the_dry_run():
    ctx = Ctx()
    ctx.bal.service_add({"proto": "tcp", "addr": "10.9.9.9", "port": 80})
    old = {"proto": "tcp", "addr": "10.9.9.9", "port": 80}
    add = ["service.add", {"proto": "tcp", "addr": "10.0.0.1", "port": 80}]
    mine = {"proto": "tcp", "addr": "10.0.0.1", "port": 80}
    assert commands.only_creates(ctx.bal, [add, ["dest.add", {"svc": mine, "addr": "192.168.1.1"}],
                                           ["dest.edit", {"svc": mine, "addr": "192.168.1.1", "weight": 3}],
                                           ["laddr.add", {"svc": mine, "addr": "192.168.100.1", "ifname": "eth1"}],
                                           ["service.edit", dict(mine, sched="wrr")]])
    for ops in ([["service.add", old]],                                        # exists
                [add, ["dest.add", {"svc": old, "addr": "192.168.1.1"}]],      # touches an existing service
                [add, ["laddr.add", {"svc": old, "addr": "192.168.100.1", "ifname": "eth1"}]],
                [add, add],                                                    # the second add is refused
                [add, ["dest.del", {"svc": mine, "addr": "192.168.1.1"}]],     # not a creation
                [add, ["route.del", {"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth0"}]],
                [["route.add", {"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth0"}],
                 ["addr.add", {"addr": "10.1.0.1", "prefixlen": 16, "ifname": "eth0"}]],
                [["service.add", {"match": {"proto": "tcp", "src_range": "10.0.0.0-10.0.0.9"}}]],
                [["service.add", {"proto": "tcp", "addr": "nope", "port": 80}]],   # the dry run names it
                [["dest.add", {"svc": "nope", "addr": "192.168.1.1"}]],
                []):
        assert not commands.only_creates(ctx.bal, ops), ops


def test_a_bulk_load_of_routes_skips_the_dry_run_and_is_undone_whole_when_refused(monkeypatch):
    """dpip -b with 100k `route add` lines: the dry run (a scratch copy, every route parsed and indexed twice) was
    40 % of the load; route adds alone are now applied at once and removed again when refused, in an op or when
    the LPM map refuses a write at the end (full): the model as it was, the prefixes that had a route before
    written back from it, the refusal naming the op that added the prefix."""
    ctx = Ctx()
    ctx.bal.route_add({"prefix": "10.2.0.0", "prefixlen": 16, "ifname": "eth0", "metric": 5})

    def no_scratch(*a, **kw):
        raise AssertionError("dry run")

    monkeypatch.setattr(ctx.bal, "scratch", no_scratch)

    def route(i, **kw):
        return ["route.add", dict({"prefix": f"10.1.{i}.0", "prefixlen": 24, "ifname": "eth1"}, **kw)]

    ops = [route(i) for i in range(5)] + [["route.add", {"prefix": "10.2.0.0", "prefixlen": 16, "ifname": "eth1",
                                                         "metric": 1}]]  # beats the existing route of its prefix
    assert commands.only_creates(ctx.bal, ops)
    for bad in (route(2), route(9, via="10.0.0.300"), route(9, ifname="eth7")):  # a duplicate, a bad gateway, device
        before, writes = state(ctx.bal), len(ctx.bal.dp.calls)
        with pytest.raises(HdslbError) as e:
            commands.dispatch(ctx, "batch", {"ops": ops[:4] + [bad] + ops[4:]})
        assert e.value.index == 4 and state(ctx.bal) == before
        assert len(ctx.bal.dp.calls) == writes, "a refused batch of routes wrote nothing"
        assert ctx.bal.route_lookup(A("10.1.1.1")) is None
    # the LPM map full at the fourth write: every route of the batch goes, each prefix written gets its entry back
    # from what is left (10.2.0.0/16: the metric 5 route again; the others: removed)
    rec = ctx.bal.dp

    class Full:
        n = 0

        def __getattr__(self, name):
            def call(*a):
                if name == "route_set":
                    Full.n += 1
                    if Full.n == 4:
                        raise HdslbError(errno.ENOSPC, "route4_map is full")
                return getattr(rec, name)(*a)
            return call

    before, writes = state(ctx.bal), len(rec.calls)
    ctx.bal.dp = Full()
    with pytest.raises(HdslbError) as e:
        commands.dispatch(ctx, "batch", {"ops": ops[::-1]})  # the 10.2.0.0/16 route first: written, then undone
    ctx.bal.dp = rec
    assert e.value.errno == errno.ENOSPC and e.value.index == 3, (e.value.index, e.value)
    assert state(ctx.bal) == before
    lpm = {}
    for name, a in rec.calls:
        if name == "route_set":
            lpm[a[0].net] = a[0].metric
        elif name == "route_del":
            lpm.pop(a[0], None)
    assert lpm == {ipaddress.ip_network("10.2.0.0/16"): 5}, lpm
    assert rec.calls[writes:].count(("route_set", (ctx.bal.route_lookup(A("10.2.0.1")), 2))) == 1
    # the map still full while the undo writes the old routes back: the model is undone whole all the same, and the
    # refusal is the batch's own
    Full.n, full_from = 0, 4

    class StillFull(Full):
        def __getattr__(self, name):
            def call(*a):
                if name == "route_set":
                    Full.n += 1
                    if Full.n >= full_from:
                        raise HdslbError(errno.ENOSPC, "route4_map is full")
                return getattr(rec, name)(*a)
            return call

    ctx.bal.dp = StillFull()
    with pytest.raises(HdslbError) as e:
        commands.dispatch(ctx, "batch", {"ops": ops[::-1]})
    ctx.bal.dp = rec
    assert e.value.index == 3 and state(ctx.bal) == before
    # accepted: each prefix written once, after every op
    writes = len(rec.calls)
    assert commands.dispatch(ctx, "batch", {"ops": ops}) == {"applied": 6, "warnings": []}
    assert [n for n, _ in rec.calls[writes:]] == ["route_set"] * 6
    assert ctx.bal.route_lookup(A("10.2.0.1")).metric == 1 and ctx.bal.route_lookup(A("10.1.4.9")).ifname == "eth1"


def test_restore_prints_warnings_with_their_line(model, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("-A -t 10.0.0.1:80\n-a -t 10.0.0.1:80 -r 192.168.1.1 -g\n"))
    assert ipvsadm.main(["-R"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("ipvsadm: warning: line 2: no route to 192.168.1.1")


def _first_match(bal: Balancer, proto: str, src: str, dst: str):
    """The SNAT service a packet from inside takes: the first rule of snat_order (the fast path's rule array, in
    its order) whose protocol and ranges hold it."""
    def within(r, a):
        return r is None or r[0] <= A(a) <= r[1]
    return next((s for s in bal.snat_order if s.match.proto == proto and within(s.match.src, src)
                 and within(s.match.dst, dst)), None)


def test_save_and_restore_keep_which_snat_match_wins(monkeypatch, capsys):
    """Match services are tried in creation order, first match wins: -Ln lists them in that order and -S writes
    them in it, so -R creates them in it again. (Sorted by what they match, the /24 came before the host, the
    restore made it the first rule, and the host's traffic took the /24's source address.)"""
    from .test_api import FakeCtx
    ctx = FakeCtx()
    ctx.bal.service_add({"proto": "tcp", "addr": "10.9.9.9", "port": 80, "sched": "wrr"})
    for tool in (ipvsadm, dpip):
        monkeypatch.setattr(tool, "Client", ModelClient(ctx))
    for ad in ("203.0.113.1/24", "203.0.113.2/24"):
        assert dpip.main(["addr", "add", ad, "dev", "eth0", "sapool"]) == 0
    host, net, udp = ("proto=tcp,src-range=10.1.0.100", "proto=tcp,src-range=10.1.0.1-10.1.0.254",
                      "proto=udp,src-range=10.1.0.1-10.1.0.254")
    for m, sa in ((udp, "203.0.113.1"), (host, "203.0.113.2"), (net, "203.0.113.1")):
        assert ipvsadm.main(["-A", "-H", m, "-s", "rr"]) == 0
        assert ipvsadm.main(["-a", "-H", m, "-r", f"{sa}:0"]) == 0
    order = [str(s.match) for s in ctx.bal.snat_order]
    assert order == [udp, host, net]
    assert list(_first_match(ctx.bal, "tcp", "10.1.0.100", "198.51.100.1").dests)[0][0] == A("203.0.113.2")
    capsys.readouterr()
    assert ipvsadm.main(["-Ln"]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("MATCH")] == [
        "MATCH udp,from=10.1.0.1-10.1.0.254 rr", "MATCH tcp,from=10.1.0.100 rr", "MATCH tcp,from=10.1.0.1-10.1.0.254 rr"]
    assert ipvsadm.main(["-Sn"]) == 0
    saved = capsys.readouterr().out
    assert [ln for ln in saved.splitlines() if ln.startswith("-A -H")] == [f"-A -H {m} -s rr" for m in order]
    monkeypatch.setattr("sys.stdin", io.StringIO("-C\n" + saved))
    assert ipvsadm.main(["-R"]) == 0
    assert [str(s.match) for s in ctx.bal.snat_order] == order
    assert list(_first_match(ctx.bal, "tcp", "10.1.0.100", "198.51.100.1").dests)[0][0] == A("203.0.113.2"), \
        "the host's rule still wins after the restore"
    assert list(_first_match(ctx.bal, "tcp", "10.1.0.7", "198.51.100.1").dests)[0][0] == A("203.0.113.1")
    # and the fast path's rule array holds them in that order
    rules = {}
    for name, args in ctx.bal.dp.calls:
        if name == "snat_rule_set":
            rules[args[0]] = str(args[1].match)
    assert [rules[i] for i in range(3)] == order
    # the VIP service of the fixture is listed after them, and saved again the same
    capsys.readouterr()
    assert ipvsadm.main(["-Sn"]) == 0
    assert capsys.readouterr().out == saved


def test_edit_of_a_dr_or_tunnel_server_names_it_by_any_port_as_its_add_did(monkeypatch, capsys):
    """ipvsadm forces a DR/TUNNEL server's port to the service's for -a and -e alike: the line that added it
    edits it, with no method given (the server's own is kept) or with -g/-i; a NAT server's port stays its own;
    -d does not force (nor does ipvsadm); REST's dest.set still adds a server it does not find at that port."""
    from .test_api import FakeCtx
    ctx = FakeCtx()
    monkeypatch.setattr(ipvsadm, "Client", ModelClient(ctx))
    ctx.bal.route_add({"prefix": "10.0.1.0", "prefixlen": 24, "ifname": "eth1"})
    svc = ctx.bal.services
    for line in ("-A -t 10.0.0.1:80 -s rr", "-a -t 10.0.0.1:80 -r 10.0.1.1:8080 -g",
                 "-a -t 10.0.0.1:80 -r 10.0.1.2:8080 -m", "-a -t 10.0.0.1:80 -r 10.0.1.3:8080 -i"):
        assert ipvsadm.main(line.split()) == 0
    dests = svc[("tcp", A("10.0.0.1"), 80)].dests
    assert sorted((str(a), p) for a, p in dests) == [("10.0.1.1", 80), ("10.0.1.2", 8080), ("10.0.1.3", 80)]
    assert ipvsadm.main("-e -t 10.0.0.1:80 -r 10.0.1.1:8080 -w 3".split()) == 0
    assert ipvsadm.main("-e -t 10.0.0.1:80 -r 10.0.1.3:8080 -x 9".split()) == 0
    assert ipvsadm.main("-e -t 10.0.0.1:80 -r 10.0.1.2:8080 -w 5".split()) == 0
    d1, d2, d3 = dests[(A("10.0.1.1"), 80)], dests[(A("10.0.1.2"), 8080)], dests[(A("10.0.1.3"), 80)]
    assert (d1.fwd, d1.weight, d2.fwd, d2.weight, d3.fwd, d3.u_threshold) == ("dr", 3, "nat", 5, "tunnel", 9)
    # given, the method decides: -g/-i force the port as -a does, -m does not (no NAT server is at 8080)
    assert ipvsadm.main("-e -t 10.0.0.1:80 -r 10.0.1.1:8080 -g -w 4".split()) == 0
    assert d1.weight == 4
    capsys.readouterr()
    assert ipvsadm.main("-e -t 10.0.0.1:80 -r 10.0.1.1:8080 -m -w 6".split()) == 1
    assert ipvsadm.main("-d -t 10.0.0.1:80 -r 10.0.1.1:8080".split()) == 1
    assert capsys.readouterr().err == "No such destination\nNo such destination\n"
    assert d1.weight == 4 and (A("10.0.1.1"), 80) in dests
    # in a restore's batch too
    monkeypatch.setattr("sys.stdin", io.StringIO("-e -t 10.0.0.1:80 -r 10.0.1.1:8080 -w 7\n"))
    assert ipvsadm.main(["-R"]) == 0
    assert d1.weight == 7
    # dest.set (REST bulk upserts) keeps exact ports: not there, the server is added
    assert commands.dispatch(ctx, "dest.set", {"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": 80},
                                               "addr": "10.0.1.1", "port": 8080, "fwd": "nat"}) == {"result": "added"}
    assert dests[(A("10.0.1.1"), 8080)].fwd == "nat" and d1.fwd == "dr" and d1.weight == 7


# --- deferred rebuilds ------------------------------------------------------------------------------
def _ops():
    """Adds, edits and deletes over ring and hash services, with a slot freed and one taken in the same batch."""
    ops = []
    for i, sch in enumerate(("rr", "wrr", "mh", "sh", "wlc")):
        svc = {"proto": "tcp", "addr": f"10.0.1.{i + 1}", "port": 80}
        ops.append(("service.add", dict(svc, sched=sch)))
        for j in range(6):
            ops.append(("dest.add", {"svc": svc, "addr": f"192.168.{i}.{j + 1}", "port": 80, "weight": j + 1}))
        ops.append(("dest.edit", {"svc": svc, "addr": f"192.168.{i}.2", "port": 80, "weight": 0}))
        ops.append(("dest.del", {"svc": svc, "addr": f"192.168.{i}.3", "port": 80}))
        ops.append(("dest.add", {"svc": svc, "addr": f"192.168.{i}.9", "port": 80, "weight": 4}))
    ops.append(("service.edit", {"proto": "tcp", "addr": "10.0.1.1", "port": 80, "sched": "wrr"}))
    ops.append(("service.add", {"proto": "tcp", "addr": "10.0.1.9", "port": 80}))
    ops.append(("service.del", {"proto": "tcp", "addr": "10.0.1.9", "port": 80}))
    return ops


def _tables(b: Balancer) -> dict:
    """Each service's final table as the fast path reads it, with slots named by their real server."""
    last, cells = {}, {}
    for name, args in b.dp.calls:
        if name == "sched_set":
            last[args[0].svc_id] = (args[1], args[2])
        elif name == "hash_cells_set":
            for k, v in enumerate(args[1]):
                cells[args[0] + k] = v
    out = {}
    for svc in b.services.values():
        by_slot = {d.slot: (str(d.addr), d.port) for d in svc.dests.values()}
        table, hoff = last[svc.svc_id]
        entries = table.entries if table.kind != "hash" else [cells[hoff + k] for k in range(len(table.entries))]
        out[svc.key] = (table.kind, [by_slot.get(s, s) for s in entries])
    return out


def test_deferred_rebuild_equals_one_at_a_time():
    one = Ctx()
    for op, args in _ops():
        commands.dispatch(one, op, args)
    batched = Ctx()
    commands.dispatch(batched, "batch", {"ops": [[op, args] for op, args in _ops()]})
    assert _tables(batched.bal) == _tables(one.bal)
    assert {k: sorted(d for d in s.dests) for k, s in batched.bal.services.items()} == \
        {k: sorted(d for d in s.dests) for k, s in one.bal.services.items()}


def test_deferred_rebuild_writes_each_table_once_and_in_a_safe_order():
    ctx = Ctx()
    commands.dispatch(ctx, "batch", {"ops": [[op, args] for op, args in _ops()]})
    calls = ctx.bal.dp.calls
    per_svc = {}
    for name, args in calls:
        if name == "sched_set":
            per_svc[args[0].svc_id] = per_svc.get(args[0].svc_id, 0) + 1
    assert set(per_svc.values()) == {1}, "each touched service's table is built once"
    names = [(n, a) for n, a in calls]
    for i, (n, a) in enumerate(names):
        if n == "service_set":  # a new service becomes visible only after its table exists
            assert any(m == "sched_set" and b[0] is a[0] for m, b in names[:i])
        if n == "dest_clear":  # a removed server's slot is cleared only after no table holds it
            slot = a[0].slot
            later = [b for m, b in names[i:] if m == "sched_set"]
            assert not any(slot in b[1].entries for b in later)
            assert any(m == "sched_set" for m, _ in names[:i])
    assert not any(n == "service_set" and a[0].addr == A("10.0.1.9") for n, a in names), \
        "a service added and deleted in one batch never reaches svc_map"


def test_a_freed_slot_is_not_reused_within_its_batch():
    ctx = Ctx()
    svc = {"proto": "tcp", "addr": "10.0.0.1", "port": 80}
    commands.dispatch(ctx, "service.add", dict(svc, sched="rr"))
    commands.dispatch(ctx, "dest.add", {"svc": svc, "addr": "192.168.0.1", "port": 80})
    old = ctx.bal.services[("tcp", A("10.0.0.1"), 80)].dests[(A("192.168.0.1"), 80)].slot
    commands.dispatch(ctx, "batch", {"ops": [["dest.del", {"svc": svc, "addr": "192.168.0.1", "port": 80}],
                                             ["dest.add", {"svc": svc, "addr": "192.168.0.2", "port": 80}]]})
    new = ctx.bal.services[("tcp", A("10.0.0.1"), 80)].dests[(A("192.168.0.2"), 80)].slot
    assert new != old, "the old table still led to the old slot while the batch ran"
    assert old not in ctx.bal._slots_used, "released at the batch's end"


def test_batch_refuses_unbatchable_and_malformed_ops():
    ctx = Ctx()
    for ops, err in (([["daemon.shutdown", {}]], errno.EOPNOTSUPP), ([["batch", {"ops": []}]], errno.EOPNOTSUPP),
                     ([["route.add"]], errno.EINVAL), ("nope", errno.EINVAL)):
        with pytest.raises(HdslbError) as e:
            commands.dispatch(ctx, "batch", {"ops": ops})
        assert e.value.errno == err
    assert ctx.bal.dp.calls == []


async def test_refused_batch_index_travels_over_the_socket(tmp_path):
    path = str(tmp_path / "ctl.sock")
    ctx = Ctx()
    srv = CtlServer(path, lambda op, args: commands.dispatch(ctx, op, args))
    await srv.start()
    try:
        def client_side():
            with Client(path) as c:
                with pytest.raises(HdslbError) as e:
                    c.batch([("service.add", {"proto": "tcp", "addr": "10.0.0.1", "port": 80}),
                             ("service.add", {"proto": "tcp", "addr": "10.0.0.1", "port": 80})])
                return e.value

        e = await asyncio.get_running_loop().run_in_executor(None, client_side)
    finally:
        await srv.stop()
    assert e.errno == errno.EEXIST and e.index == 1
    assert not ctx.bal.services


# --- dpip -b ----------------------------------------------------------------------------------------
def test_dpip_batch_file_is_one_request(model, tmp_path):
    ctx, client = model
    f = tmp_path / "routes"
    f.write_text("# routes\nroute add 20.0.0.0/24 dev eth1  # the lab's\n\nroute add 20.0.1.0/24 via 10.1.0.1 dev eth1\n"
                 "dpip addr add 10.1.0.2/24 dev eth1\nroute show\n")
    client.calls.clear()
    assert dpip.main(["-b", str(f)]) == 0
    assert client.calls == ["batch", "route.list"]
    nets = {str(r.net) for r in ctx.bal.routes}
    assert {"20.0.0.0/24", "20.0.1.0/24", "10.1.0.0/24", "10.1.0.2/32"} <= nets


def test_dpip_batch_refused_line_applies_nothing(model, tmp_path, capsys):
    ctx, client = model
    f = tmp_path / "routes"
    f.write_text("route add 20.0.0.0/24 dev eth1\nroute add 20.0.1.0/24 dev nosuch0\nroute add 20.0.2.0/24 dev eth1\n")
    before = state(ctx.bal)
    client.calls.clear()
    assert dpip.main(["--batch", str(f)]) == 1
    assert client.calls == ["batch"]
    err = capsys.readouterr().err
    assert err.startswith("dpip: line 2: device 'nosuch0'") and "nothing of the batch was applied" in err
    assert state(ctx.bal) == before and not ctx.bal.routes


def test_dpip_batch_with_a_show_between_changes_applies_nothing_when_a_later_change_is_refused(model, tmp_path,
                                                                                              capsys):
    ctx, client = model
    f = tmp_path / "b"
    f.write_text("addr add 10.0.0.8/24 dev eth0\nroute show\nroute del 1.2.3.0/24\n")
    before = state(ctx.bal)
    client.calls.clear()
    assert dpip.main(["-b", str(f)]) == 1
    assert capsys.readouterr().err == "dpip: line 3: route 1.2.3.0/24 not found; nothing of the batch was applied\n"
    assert client.calls == ["batch"] and state(ctx.bal) == before


def test_dpip_batch_usage_error_sends_nothing(model, tmp_path, capsys, monkeypatch):
    ctx, client = model
    client.calls.clear()
    monkeypatch.setattr("sys.stdin", io.StringIO("route add 20.0.0.0/24 dev eth1\nroute add 20.0.0.300/24 dev eth1\n"))
    assert dpip.main(["-b", "-"]) == 2
    assert client.calls == []
    assert capsys.readouterr().err.startswith("dpip: line 2: ")
    assert dpip.main(["-b", str(tmp_path / "missing")]) == 2
    assert dpip.main(["-b", "-", "route", "show"]) == 2


def test_route_batch_writes_each_prefix_once():
    """Routes in one batch: each prefix's LPM entry is written once, at the batch's end."""
    ctx = Ctx()
    ops = [["route.add", {"af": 4, "prefix": f"20.{i >> 8}.{i & 255}.0", "prefixlen": 24, "ifname": "eth1"}]
           for i in range(300)] + [["route.del", {"af": 4, "prefix": "20.0.5.0", "prefixlen": 24}]]
    commands.dispatch(ctx, "batch", {"ops": ops})
    sets = [a[0].net for n, a in ctx.bal.dp.calls if n == "route_set"]
    assert len(sets) == 299 and len(set(sets)) == 299, "one LPM write per prefix"
    assert ipaddress.ip_network("20.0.5.0/24") not in sets, "added and deleted in the batch: never set"


# --- what keeps bulk loads linear -------------------------------------------------------------------
def test_id_pool_hands_out_never_used_ids_first_then_the_longest_free():
    p = IdPool()
    assert Balancer._peek(p, 10, "x") == 0
    p.update(range(5))
    assert Balancer._peek(p, 10, "x") == 5
    p.discard(2)
    p.discard(0)
    assert Balancer._peek(p, 10, "x") == 5  # 2 and 0 rest: their flows may still name them
    p.update(range(5, 10))
    assert Balancer._peek(p, 10, "x") == 2  # nothing never used is left: the one freed first
    p.add(2)
    assert Balancer._peek(p, 10, "x") == 0
    p.add(0)
    with pytest.raises(HdslbError) as e:
        Balancer._peek(p, 10, "real server slot")
    assert e.value.errno == errno.ENOSPC and "--max-dests" in e.value.message
    restored = IdPool({1, 3, 7})  # a model read back: its holes come last, lowest first
    assert Balancer._peek(restored, 8, "x") == 0 and Balancer._peek(restored, 9, "x") == 8


def test_a_deleted_services_ids_and_slots_are_not_handed_to_the_next_one():
    """Its flows keep its id and its servers' slots in the conn table until they end: a service made at once
    with them showed those flows' connections and traffic as its own (and lc/wlc counted them)."""
    b = Balancer(Recorder(), dict(IFACES))
    b.service_add({"proto": "tcp", "addr": "10.0.0.120", "port": 80, "sched": "rr"})
    for n in (2, 3):
        b.dest_add({"svc": {"proto": "tcp", "addr": "10.0.0.120", "port": 80}, "addr": f"192.168.100.{n}",
                    "port": 80})
    old = b.get_service({"proto": "tcp", "addr": "10.0.0.120", "port": 80})
    old_ids = ({old.svc_id}, {d.slot for d in old.dests.values()})
    b.service_del({"proto": "tcp", "addr": "10.0.0.120", "port": 80})
    svc = {"proto": "tcp", "addr": "10.0.0.121", "port": 80}
    b.service_add(dict(svc, sched="wlc"))
    for n in (3, 2):
        b.dest_add({"svc": svc, "addr": f"192.168.100.{n}", "port": 80})
    new = b.get_service(svc)
    assert not {new.svc_id} & old_ids[0] and not {d.slot for d in new.dests.values()} & old_ids[1]
    # the same through a batch's dry run (a scratch model hands out what the model would)
    scratch = b.scratch()
    scratch.service_del(svc)
    scratch.service_add(dict(svc, sched="rr"))
    assert scratch.get_service(svc).svc_id not in {new.svc_id} | old_ids[0]


def test_route_lookup_is_longest_prefix_then_metric_then_first_added():
    rnd = random.Random(7)
    b = Balancer(Recorder(), dict(IFACES))
    for _ in range(300):
        plen = rnd.choice((8, 16, 20, 24, 28, 32))
        net = ipaddress.ip_network((rnd.randrange(1 << 32) >> (32 - plen) << (32 - plen), plen))
        try:
            b.route_add({"prefix": str(net.network_address), "prefixlen": plen, "ifname": rnd.choice(list(IFACES)),
                         "metric": rnd.choice((0, 0, 5))})
        except HdslbError:
            pass
    b.route_add({"prefix": "0.0.0.0", "prefixlen": 0, "ifname": "eth0", "via": "10.0.0.1"})

    def brute(addr):
        best = None
        for r in b.routes:
            if addr in r.net and (best is None or (r.net.prefixlen, -r.metric) > (best.net.prefixlen, -best.metric)):
                best = r
        return best

    for r in b.routes[:100]:
        for addr in (r.net.network_address, r.net.broadcast_address):
            assert b.route_lookup(addr) is brute(addr)
    for _ in range(200):
        addr = ipaddress.IPv4Address(rnd.randrange(1 << 32))
        assert b.route_lookup(addr) is brute(addr)
    assert b.route_lookup(A("2001:db8::1")) is None
    # the bulk walkers' int index (index_routes) answers the same, v6 included, until a route changes
    for i in range(40):
        plen = rnd.choice((32, 48, 56, 64, 128))
        net = ipaddress.ip_network(((0x20010db8 << 96 | rnd.randrange(1 << 24) << 80) >> (128 - plen) << (128 - plen),
                                    plen))
        try:
            b.route_add({"prefix": str(net.network_address), "prefixlen": plen, "ifname": "eth1", "af": 6})
        except HdslbError:
            pass
    probes = [r.net.network_address for r in b.routes] + [ipaddress.IPv4Address(rnd.randrange(1 << 32))
                                                          for _ in range(300)] + [A("2001:db9::1"), A("::")]
    slow = [b.route_lookup(a) for a in probes]
    b.index_routes()
    assert b._rint is not None
    assert [b.route_lookup(a) for a in probes] == slow and all(b.route_lookup(a) is brute(a) for a in probes)
    b.route_add({"prefix": "0.0.0.0", "prefixlen": 0, "ifname": "eth1", "via": "10.0.0.9", "metric": 1})
    b.route_add({"prefix": "100.64.0.0", "prefixlen": 10, "ifname": "eth1"})
    assert b.route_lookup(A("100.64.1.1")).net == ipaddress.ip_network("100.64.0.0/10"), "a stale index is not used"
    b.index_routes()
    assert b.route_lookup(A("100.64.1.1")).net == ipaddress.ip_network("100.64.0.0/10")
    assert all(b.route_lookup(a) is brute(a) for a in probes)
    b.route_flush({})
    assert b.route_lookup(A("1.2.3.4")) is None and not b._plens


def test_restore_rebuilds_the_route_index():
    b = Balancer(Recorder(), dict(IFACES))
    b.route_add({"prefix": "20.0.0.0", "prefixlen": 16, "ifname": "eth1"})
    other = Balancer(Recorder(), dict(IFACES))
    restore(other, snapshot(b))
    assert other.route_lookup(A("20.0.3.4")).ifname == "eth1"


# --- limits -----------------------------------------------------------------------------------------
def test_max_services_and_dests_flags_reach_sizes_and_the_model():
    from hdslb.daemon import Daemon, settings_from_args

    s = settings_from_args(["eth0", "--max-services", "16384", "--max-dests", "131072"])
    assert (s.max_services, s.max_dests) == (16384, 131072)
    d = Daemon(s)
    assert (d.sizes.max_services, d.sizes.max_dests) == (16384, 131072)
    assert "-DMAX_SERVICES=16384" in _cflags(d.sizes) and "-DMAX_DESTS=131072" in _cflags(d.sizes)
    dflt = settings_from_args(["eth0"])
    assert (dflt.max_services, dflt.max_dests) == (4096, 65536)
    for bad in (["--max-services", "0"], ["--max-services", "65537"], ["--max-dests", "0"]):
        with pytest.raises(SystemExit):
            settings_from_args(["eth0", *bad])


def _cflags(sizes):
    from hdslb.fastpath.loader import FastPath

    return FastPath("/nonexistent", sizes).cflags({"conn4_map": 3, "conn6_map": 4}, ncpus=2)


def test_dest_slots_beyond_16_bits():
    b = Balancer(Recorder(), dict(IFACES), max_services=16384, max_dests=131072)
    b._slots_used.update(range(70000))
    svc = {"proto": "tcp", "addr": "10.0.0.1", "port": 80}
    b.service_add(dict(svc, sched="rr"))
    d = b.dest_add({"svc": svc, "addr": "192.168.0.1", "port": 80})
    assert d.slot == 70000
    assert [a for n, a in b.dp.calls if n == "sched_set"][-1][1].entries == [70000]
    b._ids_used.update(range(5000))
    assert b.service_add({"proto": "tcp", "addr": "10.0.0.2", "port": 80}).svc_id == 5000, \
        "above the old 4096 default"
    small = Balancer(Recorder(), dict(IFACES), max_services=1)
    small.service_add(svc)
    with pytest.raises(HdslbError) as e:
        small.service_add({"proto": "tcp", "addr": "10.0.0.2", "port": 80})
    assert e.value.errno == errno.ENOSPC and "--max-services" in e.value.message


# --- REST bulk ----------------------------------------------------------------------------------------
@pytest.fixture
async def rest():
    from aiohttp.test_utils import TestClient, TestServer

    from hdslb.api.app import make_app

    from .test_api import FakeCtx

    ctx = FakeCtx()
    async with TestClient(TestServer(make_app(ctx))) as c:
        yield c, ctx


async def test_rest_put_vs_with_rss_creates_the_service_and_its_servers_in_one_batch(rest):
    c, ctx = rest
    r = await c.put("/v2/vs/10.0.0.50-80-tcp", json={"SchedName": "rr", "RSs": {"Items": [
        {"ip": "192.168.5.1", "port": 80, "weight": 1}, {"ip": "192.168.5.2", "weight": 2}]}})
    assert r.status == 201, await r.text()
    body = await r.json()
    assert body["result"] == "created" and body["Id"] == "10.0.0.50-80-tcp"
    assert body["added"] == ["192.168.5.1:80", "192.168.5.2:80"]
    assert [op for op, _ in ctx.ops if not commands.is_read_only(op)] == ["batch"]
    svc = ctx.bal.services[("tcp", A("10.0.0.50"), 80)]
    assert svc.sched == "rr" and len(svc.dests) == 2
    # again: the service is updated by option, servers upserted
    r = await c.put("/v2/vs/10.0.0.50-80-tcp", json={"SchedName": "wrr", "RSs": {"Items": [
        {"ip": "192.168.5.2", "weight": 5}, {"ip": "192.168.5.3"}]}})
    assert r.status == 200
    body = await r.json()
    assert (body["result"], body["added"], body["updated"]) == ("updated", ["192.168.5.3:80"], ["192.168.5.2:80"])
    assert svc.sched == "wrr" and len(svc.dests) == 3


async def test_rest_bulk_bad_body_is_4xx_and_changes_nothing(rest):
    c, ctx = rest
    before, writes = snapshot(ctx.bal), len(ctx.bal.dp.calls)
    # refused by the model: DR cannot change the port (the third item); the service would have been new
    r = await c.put("/v2/vs/10.0.0.51-80-tcp", json={"SchedName": "rr", "RSs": {"Items": [
        {"ip": "192.168.6.1"}, {"ip": "192.168.6.2"}, {"ip": "192.168.6.3", "port": 8080, "mode": "DR"}]}})
    assert r.status == 400
    body = await r.json()
    assert body["field"] == "RSs.Items[2]" and "nothing was changed" in body["error"]
    # refused by the schema, and a duplicate
    r = await c.put("/v2/vs/10.0.0.51-80-tcp", json={"RSs": {"Items": [{"ip": "not-an-ip"}]}})
    assert r.status == 400
    r = await c.put("/v2/vs/10.0.0.51-80-tcp", json={"RSs": {"Items": [{"ip": "192.168.6.1"},
                                                                       {"ip": "192.168.6.1", "port": 80}]}})
    assert r.status == 400 and (await r.json())["field"] == "RSs.Items[1]"
    assert snapshot(ctx.bal) == before and len(ctx.bal.dp.calls) == writes


async def test_rest_patch_vs_upserts_many_services_in_one_batch(rest):
    c, ctx = rest
    items = [{"Addr": f"10.0.2.{i}", "Port": 80, "Proto": "tcp", "SchedName": "rr",
              "RSs": {"Items": [{"ip": f"192.168.{i}.{j}", "weight": j} for j in range(1, 4)]}} for i in range(1, 6)]
    r = await c.patch("/v2/vs", json={"Items": items})
    assert r.status == 200, await r.text()
    assert await r.json() == {"result": "applied", "services": 5, "real_servers": 15, "warnings": []}
    assert [op for op, _ in ctx.ops] == ["batch"]
    assert len(ctx.bal.services) == 5 and all(len(s.dests) == 3 for s in ctx.bal.services.values())
    # again, changed: existing services are edited by option and servers upserted, nothing else removed
    items[0]["SchedName"] = "wrr"
    items[0]["RSs"]["Items"] = [{"ip": "192.168.1.1", "weight": 9}, {"ip": "192.168.1.7"}]
    r = await c.patch("/v2/vs", json={"Items": items[:1]})
    assert r.status == 200
    svc = ctx.bal.services[("tcp", A("10.0.2.1"), 80)]
    assert svc.sched == "wrr" and len(svc.dests) == 4 and svc.dests[(A("192.168.1.1"), 80)].weight == 9


async def test_rest_patch_vs_refused_item_changes_nothing(rest):
    c, ctx = rest
    before, writes = snapshot(ctx.bal), len(ctx.bal.dp.calls)
    items = [{"Addr": f"10.0.3.{i}", "Port": 80, "Proto": "tcp",
              "RSs": {"Items": [{"ip": f"192.168.{i}.1"}]}} for i in range(1, 4)]
    items[2]["RSs"]["Items"].append({"ip": "192.168.3.2", "port": 8080, "mode": "DR"})
    r = await c.patch("/v2/vs", json={"Items": items})
    assert r.status == 400
    body = await r.json()
    assert body["field"] == "Items[2].RSs.Items[1]" and "nothing was changed" in body["error"]
    for bad, field in (({"Items": [{"Addr": "10.0.3.1", "Port": 80}]}, "Items[0].Proto"),
                       ({"Items": [items[0], dict(items[0])]}, "Items[1]"),
                       ({"Items": [dict(items[0], Bps=5)]}, "Items[0].Bps")):
        r = await c.patch("/v2/vs", json=bad)
        assert r.status in (400, 501) and (await r.json())["field"] == field
    assert snapshot(ctx.bal) == before and len(ctx.bal.dp.calls) == writes


def test_wanted_nexthops_follows_every_change_it_caches_over():
    b = Balancer(Recorder(), dict(IFACES))
    svc = {"proto": "tcp", "addr": "10.0.0.1", "port": 80}
    b.route_add({"prefix": "192.168.0.0", "prefixlen": 24, "ifname": "eth1"})
    b.service_add(svc)
    assert b.wanted_nexthops() == {}
    b.dest_add({"svc": svc, "addr": "192.168.0.5", "port": 80})
    assert b.wanted_nexthops() == {A("192.168.0.5"): "eth1"}
    assert b.wanted_nexthops() is b.wanted_nexthops(), "unchanged model: the same answer, not recomputed"
    b.route_add({"prefix": "192.168.0.0", "prefixlen": 25, "ifname": "eth0", "via": "192.168.0.1"})
    assert b.wanted_nexthops() == {A("192.168.0.1"): "eth0"}
    b.addr_add({"addr": "192.168.0.1", "prefixlen": 32, "ifname": "eth0"})
    assert b.wanted_nexthops() == {}, "our own address is never probed"
    b.dest_del({"svc": svc, "addr": "192.168.0.5", "port": 80})
    b.addr_del({"addr": "192.168.0.1"})
    assert b.wanted_nexthops() == {}


def test_wanted_nexthops_asked_inside_a_refused_batch_of_new_services_forgets_them():
    """The daemon's resolvers may ask for the wanted next hops while a batch runs (dest.add kicks them at once
    outside a burst): once a refused batch of new services is undone, its real servers are not wanted."""
    ctx = Ctx()
    ctx.bal.route_add({"prefix": "192.168.0.0", "prefixlen": 24, "ifname": "eth1"})
    ctx.resolve_soon = ctx.bal.wanted_nexthops
    mine = {"proto": "tcp", "addr": "10.0.0.1", "port": 80}
    ops = [["service.add", dict(mine, sched="rr")],
           ["dest.add", {"svc": mine, "addr": "192.168.0.5", "port": 80}],
           ["dest.add", {"svc": mine, "addr": "192.168.0.6", "port": 8080, "fwd": "dr"}]]
    assert commands.only_creates(ctx.bal, ops)
    with pytest.raises(HdslbError):  # refused at an op
        commands.dispatch(ctx, "batch", {"ops": ops})
    assert not ctx.bal.services and ctx.bal.wanted_nexthops() == {}
    # refused at the end (8 servers for a table of 7), after the last op's kick
    ops = [["service.add", dict(mine, sched="mh", sched_params={"size": 7})]] + \
          [["dest.add", {"svc": mine, "addr": f"192.168.0.{i}", "port": 80}] for i in range(1, 9)]
    with pytest.raises(HdslbError):
        commands.dispatch(ctx, "batch", {"ops": ops})
    assert not ctx.bal.services and ctx.bal.wanted_nexthops() == {}


def test_plain_python_fast_path_never_accepts_what_the_schema_refuses():
    from hdslb.api import openapi

    good = {"Items": [{"Addr": "10.0.0.1", "Port": 80, "Proto": "tcp", "SchedName": "wrr",
                       "RSs": {"Items": [{"ip": "192.168.0.1", "port": 80, "weight": 3, "mode": "FNAT"},
                                         {"ip": "2001:db8::1"}]}}]}
    assert openapi._plainly_valid("VirtualServerBulk", good)
    item, rs = good["Items"][0], good["Items"][0]["RSs"]["Items"][0]
    variants = [dict(item, Port=70000), dict(item, Port=True), dict(item, Proto="icmp"), dict(item, Addr="x"),
                dict(item, SchedName="nope"), dict(item, Bps=0), dict(item, Extra=1),
                dict(item, RSs={"Items": [dict(rs, weight=70000)]}), dict(item, RSs={"Items": [dict(rs, ip="1.2.3")]}),
                dict(item, RSs={"Items": [dict(rs, mode="x")]}), dict(item, RSs={"Items": [dict(rs, inhibited=False)]}),
                dict(item, RSs={"Items": [dict(rs, port=-1)]}), dict(item, RSs={"Items": []}), {"Addr": "10.0.0.1"}]
    v = openapi._validator("VirtualServerBulk")
    for x in variants:
        body = {"Items": [x]}
        if openapi._plainly_valid("VirtualServerBulk", body):
            assert v.is_valid(body), x
        elif v.is_valid(body):  # left to the schema, which accepts it: still accepted
            openapi.validate("VirtualServerBulk", body)
        else:
            with pytest.raises(openapi.BodyError):
                openapi.validate("VirtualServerBulk", body)
    assert openapi._plainly_valid("RealServerTinyList", {"Items": [rs]})
    # dpvs-agent's flags, booleans as the schema has them (a true one is the handler's to judge), else the schema's
    assert openapi._plainly_valid("RealServerTinyList", {"Items": [dict(rs, overloaded=False, inhibited=True)]})
    assert not openapi._plainly_valid("RealServerTinyList", {"Items": [dict(rs, overloaded=1)]})


def test_plain_python_check_of_put_vs_bodies_agrees_with_the_schema():
    from hdslb.api import openapi

    rs = {"ip": "192.168.0.1", "port": 80, "weight": 3, "mode": "FNAT"}
    good = {"SchedName": "wlc", "RSs": {"Items": [rs, {"ip": "2001:db8::1"}]}}
    assert openapi._plainly_valid("VirtualServerSpecTiny", good)
    assert openapi._plainly_valid("VirtualServerSpecTiny", {"RSs": {"Items": [rs]}})
    v = openapi._validator("VirtualServerSpecTiny")
    variants = [good, {}, {"SchedName": "nope"}, {"SchedName": 3}, dict(good, Timeout=30), dict(good, Extra=1),
                {"RSs": {"Items": [dict(rs, weight=-1)]}}, {"RSs": {"Items": [dict(rs, ip="1.2.3")]}},
                {"RSs": {"Items": [dict(rs, mode="x")]}}, {"RSs": []}, {"RSs": {"Items": [], "x": 1}}, []]
    for body in variants:
        if openapi._plainly_valid("VirtualServerSpecTiny", body):
            assert v.is_valid(body), body
        elif v.is_valid(body):
            openapi.validate("VirtualServerSpecTiny", body)
        else:
            with pytest.raises(openapi.BodyError):
                openapi.validate("VirtualServerSpecTiny", body)


def test_state_file_reuses_the_routes_part_until_a_route_changes(tmp_path):
    """The saved model is what snapshot() says, byte for byte as data, after every kind of route change; the
    routes' packed bytes are reused between saves only while no route changed."""
    import msgpack

    from hdslb.daemon import Daemon, settings_from_args

    d = Daemon(settings_from_args(["eth0", "--state-dir", str(tmp_path)]))
    b = d.bal = Balancer(Recorder(), dict(IFACES))
    d.ctl_checks = {}
    b.service_add({"proto": "tcp", "addr": "10.0.0.1", "port": 80, "sched": "rr"})

    def saved():
        d._save_state()
        with open(d.settings.state_file, "rb") as f:
            return msgpack.unpackb(f.read(), raw=False)

    def fresh():
        return dict(snapshot(b), checks=[])

    def packed_routes():
        saved()
        return b._routes_packed[2]

    changes = [
        lambda: b.route_add({"prefix": "20.0.0.0", "prefixlen": 16, "ifname": "eth1"}),
        lambda: b.route_add({"prefix": "2001:db8::", "prefixlen": 32, "ifname": "eth0", "af": 6}),
        lambda: b.route_set({"prefix": "20.0.0.0", "prefixlen": 16, "ifname": "eth0", "mtu": 1400}),
        lambda: b.addr_add({"addr": "10.1.0.1", "prefixlen": 24, "ifname": "eth0"}),  # its local + net routes
        lambda: b.dest_add({"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": 80}, "addr": "20.0.0.9"}),
        lambda: b.route_del({"prefix": "20.0.0.0", "prefixlen": 16}),
        lambda: b.route_flush({}),
    ]
    assert saved() == fresh()
    for change in changes:
        change()
        got = saved()
        assert got == fresh()
        assert sorted(got) == sorted(["version", "services", "addrs", "routes", "neighs", "retired_laddrs", "checks"])
    routes = packed_routes()
    b.service_add({"proto": "udp", "addr": "10.0.0.1", "port": 53})
    assert packed_routes() is routes, "no route changed: the same bytes"
    b.route_add({"prefix": "30.0.0.0", "prefixlen": 8, "ifname": "eth0"})
    assert packed_routes() is not routes
    assert saved()["routes"][-1]["net"] == "30.0.0.0/8"


def test_listings_order_services_by_protocol_family_address_port_then_match():
    """service.list and laddr.list order (ipvsadm -L's): protocol, address family, address, port, then SNAT match;
    the sort compares addresses as ints (IPv4Address objects compare in Python: 44 ms a listing of 10k)."""
    from types import SimpleNamespace

    rng = random.Random(3)
    ctx = Ctx()
    ctx.sizes = SimpleNamespace(max_conns=1 << 20)
    made = []
    for i in range(60):
        proto = rng.choice(["tcp", "udp"])
        addr = rng.choice([f"10.{rng.randrange(3)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                           f"fd00::{rng.randrange(1, 0xffff):x}", "9.255.255.255", "11.0.0.1", "::ffff:10.0.0.1"])
        port = rng.randrange(1, 35000)
        try:
            ctx.bal.service_add({"proto": proto, "addr": addr, "port": port})
        except HdslbError:
            continue
        made.append((proto, A(addr).version, A(addr), port, ""))
    ctx.bal.service_add({"match": {"proto": "tcp", "src_range": "10.9.0.1-10.9.0.9"}})
    made.append(("tcp", 4, A("0.0.0.0"), 0, str(ctx.bal.services[next(k for k in ctx.bal.services
                                                                      if k[0] == "match")].match)))
    got = [(s["proto"], A(s["addr"]).version, A(s["addr"]), s["port"])
           for s in commands.dispatch(ctx, "service.list", {"brief": True})["services"]]
    assert got == [m[:4] for m in sorted(made)]


def test_a_real_server_removed_and_added_again_gets_its_slot_back():
    """LVS keeps a removed server in its trash and a re-add takes it back with its connections; with slots resting
    before reuse, `ipvsadm -d` then `-a` of the same server gave it a new slot, and its running flows (which name
    the old one) vanished from its ActiveConn. Another server still never gets a resting slot."""
    b = Balancer(Recorder(), dict(IFACES))
    svc = {"proto": "tcp", "addr": "10.0.0.120", "port": 80}
    b.service_add(dict(svc, sched="rr"))
    for n in (2, 3):
        b.dest_add({"svc": svc, "addr": f"192.168.100.{n}", "port": 80, "fwd": "nat"})
    slot3 = b.get_service(svc).dests[(ipaddress.ip_address("192.168.100.3"), 80)].slot
    b.dest_del({"svc": svc, "addr": "192.168.100.3", "port": 80})
    assert b.dest_add({"svc": svc, "addr": "192.168.100.4", "port": 80, "fwd": "nat"}).slot != slot3
    assert b.dest_add({"svc": svc, "addr": "192.168.100.3", "port": 80, "fwd": "nat"}).slot == slot3
    # the same through a whole service's removal (ipvsadm -D then -A, -a), and in a batch's dry run
    slots = {d.addr: d.slot for d in b.get_service(svc).dests.values()}
    b.service_del(svc)
    scratch = b.scratch()
    scratch.service_add(dict(svc, sched="rr"))
    assert scratch.dest_add({"svc": svc, "addr": "192.168.100.2", "port": 80, "fwd": "nat"}).slot == \
        slots[ipaddress.ip_address("192.168.100.2")]
    b.service_add(dict(svc, sched="rr"))
    assert b.dest_add({"svc": svc, "addr": "192.168.100.2", "port": 80, "fwd": "nat"}).slot == \
        slots[ipaddress.ip_address("192.168.100.2")]


def test_dpip_batch_show_of_an_unknown_device_applies_nothing(model, tmp_path, capsys):
    """`route add ...`, `addr show dev nope`, `route add ...`: the first route was applied, then the show failed
    ("the changes up to line 1 were applied"), though a refused line of dpip -b applies nothing of the batch. The
    devices the reads name are now checked before any change is sent."""
    ctx, client = model
    f = tmp_path / "b"
    f.write_text("route add 20.0.0.0/24 dev eth1\naddr show dev nosuch0\nroute add 20.0.1.0/24 dev eth1\n")
    before = state(ctx.bal)
    assert dpip.main(["-b", str(f)]) == 1
    assert capsys.readouterr().err.startswith("dpip: line 2: device 'nosuch0' is not managed by this balancer")
    assert state(ctx.bal) == before and not ctx.bal.routes
    f.write_text("route add 20.0.0.0/24 dev eth1\naddr show dev eth0\nroute show dev eth1\n")
    assert dpip.main(["-b", str(f)]) == 0
    assert [str(r.net) for r in ctx.bal.routes] == ["20.0.0.0/24"]


def test_dpip_batch_file_that_is_not_utf8_is_a_usage_error_naming_the_line(model, tmp_path, capsys, monkeypatch):
    """`dpip -b FILE` with a byte that is not UTF-8 died with a UnicodeDecodeError traceback (exit 1)."""
    ctx, client = model
    client.calls.clear()
    f = tmp_path / "b"
    f.write_bytes(b"route add 20.0.0.0/24 dev eth1\n# caf\xe9\n")
    assert dpip.main(["-b", str(f)]) == 2
    assert capsys.readouterr().err == "dpip: line 2: not UTF-8 text (byte 36)\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\n"), encoding="utf-8"))
    assert dpip.main(["-b", "-"]) == 2
    assert capsys.readouterr().err == "dpip: line 1: not UTF-8 text (byte 0)\n"
    assert client.calls == [] and not ctx.bal.routes
