"""Section 2 of `make bench` (bench/e2e.py): the UDP and conn/s targets are ratios between peers, so those peers'
UDP and conn/s are measured in one sequence forward then back, each figure the mean of its two passes. Tested with
stand-in peers on a box whose speed falls steadily: the ratios come out as if it had not."""

from bench import e2e


class FakePeer:
    pid = None  # no control-plane process whose CPU is counted

    def __init__(self, name, log):
        self.name, self.log = name, log

    def setup(self):
        self.log.append(("setup", self.name))

    def teardown(self):
        self.log.append(("teardown", self.name))


def _udp(rate, t):
    m = rate * (1 - 0.05 * t)  # the box slows by 5 % a measurement
    return {"mpps": m, "windows_mpps": [m], "gen_mpps": 3.0, "spread": [0.5, 0.5], "misaddressed": 0}


def test_the_udp_peers_go_forward_then_back_and_a_steady_drift_cancels(monkeypatch):
    bench = e2e.E2E(True, lambda *a: None)
    bench.floor_mpps = 3.0
    log, clock = [], iter(range(100))
    true = {"plain routing": 1.0, "nftables DNAT": 0.6, "bare XDP redirect (native)": 2.4,
            "hdslb FNAT (native)": 2.1, "HAProxy (TCP mode)": None}
    monkeypatch.setattr(bench, "udp", lambda peer: (log.append(("udp", peer.name)), _udp(true[peer.name], next(clock)))[1])
    cps_true = {"plain routing": 30000, "nftables DNAT": 20000, "hdslb FNAT (native)": 27000}

    def cps(peer):  # the same clock: each conn/s run is one more step of the drift
        log.append(("cps", peer.name))
        return {"cps": cps_true[peer.name] * (1 - 0.05 * next(clock)), "errors": ""}

    monkeypatch.setattr(bench, "cps", cps)
    monkeypatch.setattr(bench, "cps_light", cps)
    made = [((lambda b, n=n: FakePeer(n, log)),
             {"peer": n, **{k: (None if n in bench.ABBA[k] else {"na": "x"}) for k in ("udp", "cps", "cps_light")},
              "udp_flows": {"na": "measured in the loop here"}})
            for n in true]
    bench.abba(made)
    order = [n for what, n in log if what == "udp"]
    fwd = ["plain routing", "nftables DNAT", "bare XDP redirect (native)", "hdslb FNAT (native)"]
    assert order == fwd + fwd[::-1]
    assert log.count(("setup", "hdslb FNAT (native)")) == log.count(("teardown", "hdslb FNAT (native)")) == 2
    rows = {row["peer"]: row for _, row in made}
    assert rows["HAProxy (TCP mode)"]["udp"] == {"na": "x"}  # not one of the sequence's peers: left as it was
    got = {n: rows[n]["udp"]["mpps"] for n in fwd}
    # each peer's two passes sit around the sequence's middle: every figure is its true rate x the same factor
    for n in fwd:
        assert abs(got[n] / got["plain routing"] - true[n] / true["plain routing"]) < 1e-9
    # hdslb's UDP is the 8th measurement (after routing's three, nftables' three, the redirect's one) and the 13th
    assert rows["hdslb FNAT (native)"]["udp"]["passes_mpps"] == [round(2.1 * (1 - 0.05 * 7), 3),
                                                                round(2.1 * (1 - 0.05 * 12), 3)]
    assert len(rows["hdslb FNAT (native)"]["udp"]["windows_mpps"]) == 2
    assert rows["hdslb FNAT (native)"]["udp"]["lb_only_mpps"] > 0
    # conn/s the same way: each pass's figure (the mean of its runs) around the sequence's middle
    cps_fwd = [n for n in fwd if n in cps_true for _ in ("cps", "cps_light")]  # quick: one run of each a pass
    assert [n for what, n in log if what == "cps"] == cps_fwd + cps_fwd[::-1]
    measured = [(what, n) for what, n in log if what in ("udp", "cps")]
    assert measured[len(measured) // 2:] == measured[:len(measured) // 2][::-1]  # the back pass mirrors the forward
    ratio = rows["hdslb FNAT (native)"]["cps"]["cps"] / rows["nftables DNAT"]["cps"]["cps"]
    assert abs(ratio - 27000 / 20000) < 1e-9
    assert len(rows["hdslb FNAT (native)"]["cps"]["passes"]) == 2
    assert len(rows["hdslb FNAT (native)"]["cps_light"]["runs"]) == 2  # quick: one run a pass
    assert rows["bare XDP redirect (native)"]["cps"] == {"na": "x"}  # conn/s of a one-way program: not in it
    # the targets read the combined figures
    t = {x["name"]: x for x in e2e.targets([row for _, row in made])}
    assert t["hdslb native udp_mpps >= 2.5 x plain routing"]["value"] == round(2.1, 2)
    assert t["hdslb native cps >= 1.5 x nftables DNAT"]["value"] == round(27000 / 20000, 2)


def test_a_pass_that_fails_makes_the_peers_udp_na_not_half_a_figure(monkeypatch):
    bench = e2e.E2E(True, lambda *a: None)
    calls = []

    def udp(peer):
        calls.append(peer.name)
        if len(calls) == 3:  # the back pass of nftables DNAT
            raise e2e.NA("nothing delivered")
        return _udp(1.0, 0)

    monkeypatch.setattr(bench, "udp", udp)
    monkeypatch.setattr(bench, "cps", lambda peer: {"cps": 1000.0, "errors": ""})
    monkeypatch.setattr(bench, "cps_light", lambda peer: {"cps": 1000.0, "errors": ""})
    made = [((lambda b, n=n: FakePeer(n, [])), {"peer": n, "udp": None, "cps": None, "cps_light": None})
            for n in ("plain routing", "nftables DNAT")]
    bench.abba(made)
    rows = {row["peer"]: row for _, row in made}
    assert rows["nftables DNAT"]["udp"] == {"na": "nothing delivered"}
    assert rows["plain routing"]["udp"]["mpps"] == 1.0
    assert e2e.combine_passes([], None) == {"na": "not measured"}


def test_the_by_flows_runs_of_the_two_table_kinds_go_forward_and_back_too(monkeypatch):
    """Table 2g compares per-CPU and shared tables at 8k and 32k flows: each peer's by-flows runs are in the
    sequence after the loop, each flow count's figure the mean of its two passes, so a drift cancels there too."""
    bench = e2e.E2E(True, lambda *a: None)
    log, clock = [], iter(range(100))
    true = {"nftables DNAT": (0.7, 0.6), "bare XDP redirect (native)": (2.7, 2.7), "hdslb FNAT (native)": (2.0, 1.2),
            "hdslb FNAT (native, --conn-table shared)": (2.0, 1.6), "plain routing": None}

    def flows(peer):
        t = next(clock)
        log.append(("flows", peer.name))
        if true[peer.name] is None:
            raise e2e.NA("measured for " + ", ".join(e2e.E2E.FLOW_PEERS))
        return {"by_flows": {str(n): v * (1 - 0.05 * t) for n, v in zip((1024, 8192), true[peer.name])}}

    monkeypatch.setattr(bench, "udp_flows", flows)
    made = [((lambda b, n=n: FakePeer(n, log)),
             {"peer": n, "udp": {"na": "x"}, "cps": {"na": "x"}, "cps_light": {"na": "x"},
              "udp_flows": None if n in bench.ABBA["udp_flows"] else {"na": "x"}}) for n in true]
    bench.abba(made)
    fwd = [n for n in true if true[n] is not None]
    assert [n for what, n in log if what == "flows"] == fwd + fwd[::-1]
    rows = {row["peer"]: row for _, row in made}
    assert rows["plain routing"]["udp_flows"] == {"na": "x"}
    per_cpu = rows["hdslb FNAT (native)"]["udp_flows"]
    shared = rows["hdslb FNAT (native, --conn-table shared)"]["udp_flows"]
    assert len(per_cpu["passes"]["8192"]) == 2 and per_cpu["order"].startswith("forward and back")
    # the per-CPU peer is measured 3rd and 6th, the shared one 4th and 5th: the same mean drift
    assert abs(shared["by_flows"]["8192"] / per_cpu["by_flows"]["8192"] - 1.6 / 1.2) < 0.002  # rounded to 3 places
    assert per_cpu["by_flows"]["1024"] == round(2.0 * (1 - 0.05 * 3.5), 3)  # clock 2 and 5: the middle, 3.5
    # a failed pass makes the peer's figures n/a, not half a figure
    assert e2e.combine_flows([{"by_flows": {"1024": 1.0}}, {"na": "nothing delivered"}]) == {"na": "nothing delivered"}
    from bench import report

    part = report.fmt_e2e({"rows": [row for _, row in made], "targets": []}).split("2g.")[1]
    assert "forward and back" in part.splitlines()[0]


def test_table_2g_compares_flow_counts_measured_in_the_same_minute():
    """The targets' peers get their main UDP figure after the loop (forward and back), minutes away from their
    by-flows runs: 2g's base column is the 1024-flow run made beside the 8k and 32k ones, not the main figure."""
    from bench import report

    assert e2e.E2E.FLOW_COUNTS[0] == 1024
    row = {"peer": "hdslb FNAT (native)", "udp": {"mpps": 3.0, "gen_mpps": 3.0, "spread": [0.5, 0.5]},
           "udp_flows": {"by_flows": {"1024": 2.0, "8192": 1.5, "32768": 1.0}}}
    text = report.fmt_e2e({"rows": [row], "targets": []})
    part = text[text.index("2g."):]
    line = next(x for x in part.splitlines() if x.startswith("hdslb FNAT (native)"))
    assert line.split()[3:] == ["2.000", "1.500", "1.000", "0.50"]  # 32768 / 1024 of the same minute, not 1.0 / 3.0
    header = next(x for x in part.splitlines() if x.startswith("peer"))
    assert header.split() == ["peer", "1024", "flows", "8192", "flows", "32768", "flows", "32768", "/", "1024"]
    assert "same minute" in part.splitlines()[0]
    # a run from before (no 1024 in by_flows) still reads against the main figure
    old = dict(row, udp_flows={"by_flows": {"8192": 1.5, "32768": 1.0}})
    part = report.fmt_e2e({"rows": [old], "targets": []}).split("2g.")[1]
    line = next(x for x in part.splitlines() if x.startswith("hdslb"))
    assert line.split()[3:] == ["3.000", "1.500", "1.000", "0.33"]
    assert "same minute" not in part.splitlines()[0]
