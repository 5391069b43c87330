"""refresh_dynamic (the estimator's pass: thresholds and lc/wlc rings) looks only at the services it keeps keys of,
not at every real server. After any change (services, real servers, thresholds, schedulers, batches applied or
refused, a restart's restore) those keys must hold every service that a walk of the whole model says needs it:
one with lc/wlc, or with a real server that has an upper threshold or is overloaded. A service missing there
would never have its overload detected."""

import random

from hdslb.balancer import DYNAMIC_SCHEDS, Balancer
from hdslb.errors import HdslbError

from .test_batch import Ctx, random_change, restarted


def _needs(b: Balancer) -> set:
    """The rule, from a walk of every service and real server."""
    return {s.key for s in b.services.values()
            if s.sched in DYNAMIC_SCHEDS or any(d.u_threshold or d.overloaded for d in s.dests.values())}


def _svc(i: int) -> dict:
    return {"proto": "tcp", "addr": f"10.0.0.{i + 1}", "port": 80}


def test_refresh_candidates_cover_the_walk_after_every_change():
    rng = random.Random(7)
    ctx = Ctx()
    counts: dict = {}

    def bal() -> Balancer:
        return ctx.bal

    def svc():
        return _svc(rng.randrange(8))

    def rs():
        return f"192.168.1.{rng.randrange(1, 10)}"

    def thr():
        return rng.choice([0, 0, 2, 5])

    def sched():
        return rng.choice(["rr", "wrr", "lc", "wlc", "sh", "mh"])

    def dest_op(op):
        a = {"svc": svc(), "addr": rs(), "port": 80}
        if op != "dest.del" and rng.random() < 0.7:
            a["u_threshold"] = thr()
        return [op, a]

    def one():
        return rng.choice([
            lambda: ["service.add", dict(svc(), sched=sched())],
            lambda: ["service.edit", dict(svc(), sched=sched())],
            lambda: ["service.del", svc()],
            lambda: dest_op("dest.add"),
            lambda: dest_op("dest.add"),
            lambda: dest_op("dest.edit"),
            lambda: dest_op("dest.del"),
        ])()

    applied = refused = 0
    for step in range(3000):
        r = rng.random()
        try:
            if random_change(ctx, rng, one, r, 0.6, 0.85):
                pass
            elif r < 0.95:  # the estimator's pass, with connection counts that overload some servers
                counts.clear()
                counts.update({slot: (rng.randrange(0, 8), 0) for slot in range(40)})
                bal().conn_counts = lambda: counts
                bal().refresh_dynamic()
                assert set(bal()._dyn_keys) <= set(bal().services), "refresh keeps keys of live services only"
            else:
                ctx.bal = restarted(ctx.bal)
                bal().conn_counts = lambda: counts
            applied += 1
        except HdslbError:
            refused += 1
        assert _needs(bal()) <= set(bal()._dyn_keys), f"step {step}"
    assert applied > 1000 and refused > 200
    assert any(d.overloaded for s in bal().services.values() for d in s.dests.values()) or _needs(bal())


def test_a_service_without_thresholds_or_lc_is_no_longer_looked_at():
    ctx = Ctx()
    ctx.bal.service_add(dict(_svc(0), sched="wlc"))
    ctx.bal.service_add(dict(_svc(1), sched="rr"))
    ctx.bal.dest_add({"svc": _svc(1), "addr": "192.168.1.2", "port": 80, "u_threshold": 3})
    ctx.bal.service_add(dict(_svc(2), sched="rr"))
    ctx.bal.dest_add({"svc": _svc(2), "addr": "192.168.1.3", "port": 80})
    keys = [ctx.bal.get_service(_svc(i)).key for i in range(3)]
    assert list(ctx.bal._dyn_keys) == keys[:2]
    ctx.bal.service_edit(dict(_svc(0), sched="rr"))
    ctx.bal.dest_edit({"svc": _svc(1), "addr": "192.168.1.2", "port": 80, "u_threshold": 0})
    ctx.bal.refresh_dynamic()
    assert list(ctx.bal._dyn_keys) == []
