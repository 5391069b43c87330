"""hdslb-ctl top: the pure renderer, and one bounded run against a real control socket."""

import asyncio
import io

from hdslb import top
from hdslb.ctl import commands
from hdslb.ctl.server import CtlServer
from tests.unit.test_api import COUNTERS, FakeCtx, quick_start


def sample(ctx):
    return {"services": commands.dispatch(ctx, "service.list", {"svc": None}),
            "stats": commands.dispatch(ctx, "stats.get", {}), "time": 0}


def test_render_services_dests_and_rates():
    ctx = quick_start(FakeCtx(n_conns=7))
    out = top.render(sample(ctx))
    lines = out.splitlines()
    assert lines[0].startswith("hdslb top") and "services 1" in lines[0] and "conn table 7/4096 (0.2%)" in lines[0]
    svc = next(line for line in lines if line.startswith("TCP"))
    assert svc.split() == ["TCP", "10.0.0.100:80", "rr", "8", "1", "5", "50", "45", "5.0K", "45.0K"]
    rs = [line.split() for line in lines if "->" in line and "Remote" not in line]
    assert rs == [["->", "192.168.100.2:80", "FNAT", "1", "3", "1", "0", "0", "0", "0", "0"],
                  ["->", "192.168.100.3:80", "FNAT", "2", "5", "0", "0", "0", "0", "0", "0"]]
    # two tables: each one's fill beside the total (each evicts on its own)
    data = sample(ctx)
    data["stats"]["conn_table"].update(size=5120, size4=4096, size6=1024, entries4=5, entries6=2)
    assert "conn table 7/5120 (0.1%) [v4 5/4096 v6 2/1024]" in top.render(data).splitlines()[0]
    # first frame: totals, no rates yet
    assert "fast path  (totals) rx 1.0K  tx 983  redirect 0  pass 10  drop 7" in out
    assert "drops      no_route 4  malformed_ip 3" in out


def test_render_drop_rates_between_frames():
    ctx = quick_start(FakeCtx())
    data = sample(ctx)
    prev = dict(COUNTERS, rx=0, drop_no_route=4, drop_malformed_ip=1)
    data.update(prev_counters=prev, interval=2.0)
    out = top.render(data)
    assert "every 2.0s" in out
    assert "fast path  rx 500/s" in out
    # sorted by rate: malformed_ip moved 2 in 2 s, no_route did not move
    assert "drops      malformed_ip 1/s (3)  no_route 0/s (4)" in out


def test_render_empty_and_ipv6():
    ctx = FakeCtx()
    out = top.render(sample(ctx))
    assert "(no virtual services)" in out
    ctx.bal.service_add({"proto": "udp", "addr": "2001:db8::1", "port": 53, "sched": "rr"})
    ctx.bal.dest_add({"svc": {"proto": "udp", "addr": "2001:db8::1", "port": 53}, "addr": "2001:db8::2"})
    out = top.render(sample(ctx))
    assert "UDP  [2001:db8::1]:53" in out and "-> [2001:db8::2]:53" in out


def test_render_no_drops():
    data = {"services": {"services": []}, "stats": {"counters": {"rx": 5, "drop_no_route": 0}}, "time": 0}
    assert "drops      none" in top.render(data)


def test_human():
    assert [top.human(x) for x in (0, 999, 1000, 1234567, 5.5e9)] == ["0", "999", "1.0K", "1.2M", "5.5G"]


async def test_main_count_1_against_a_control_socket(tmp_path):
    ctx = quick_start(FakeCtx(n_conns=3))
    path = str(tmp_path / "ctl.sock")
    srv = CtlServer(path, ctx.dispatch)
    await srv.start()
    try:
        out = io.StringIO()
        rc = await asyncio.get_running_loop().run_in_executor(
            None, lambda: top.main(["--count", "1", "--interval", "0.01"], ctl_socket=path, out=out))
    finally:
        await srv.stop()
    assert rc == 0
    text = out.getvalue()
    assert "\x1b[" not in text, "no screen control codes when not on a terminal"
    assert "TCP  10.0.0.100:80" in text and "-> 192.168.100.3:80" in text and "conn table 3/4096" in text
    assert [op for op, _ in ctx.ops] == ["service.list", "stats.get"]


async def test_main_two_frames_compute_rates(tmp_path):
    ctx = quick_start(FakeCtx())
    path = str(tmp_path / "ctl.sock")
    srv = CtlServer(path, ctx.dispatch)
    await srv.start()
    try:
        out = io.StringIO()
        rc = await asyncio.get_running_loop().run_in_executor(
            None, lambda: top.main(["--count", "2", "--interval", "0.01", "--ctl-socket", path], out=out))
    finally:
        await srv.stop()
    assert rc == 0
    first, second = out.getvalue().split("\n\nhdslb top")
    assert "(totals)" in first and "(totals)" not in second and "rx 0/s" in second


def test_main_without_daemon(tmp_path, capsys):
    assert top.main(["--count", "1"], ctl_socket=str(tmp_path / "none.sock")) == 1
    assert "cannot reach hdslbd" in capsys.readouterr().err


def test_snat_services_are_named_by_their_match_as_ipvsadm_does():
    ctx = quick_start(FakeCtx())
    ctx.bal.addr_add({"addr": "203.0.113.1", "prefixlen": 24, "ifname": "eth0", "sapool": True})
    for rng in ("192.168.1.1-192.168.1.9", "192.168.2.1-192.168.2.9"):
        m = {"proto": "tcp", "src_range": rng, "oif": "eth0"}
        ctx.bal.service_add({"match": m, "sched": "rr"})
        ctx.bal.dest_add({"svc": {"match": m}, "addr": "203.0.113.1", "port": 0})
    out = top.render(sample(ctx))
    assert "MATCH tcp,from=192.168.1.1-192.168.1.9,oif=eth0 " in out
    assert "MATCH tcp,from=192.168.2.1-192.168.2.9,oif=eth0 " in out
    assert "0.0.0.0:0" not in out


def many_services(n):
    ctx = FakeCtx()
    for i in range(n):
        svc = {"proto": "tcp", "addr": f"10.0.1.{i + 1}", "port": 80}
        ctx.bal.service_add(dict(svc, sched="rr"))
        for j in range(2):
            ctx.bal.dest_add({"svc": svc, "addr": f"192.168.{i}.{j + 2}", "port": 80, "fwd": "dr"})
    return ctx


def test_a_small_terminal_gets_the_busiest_services_that_fit():
    ctx = many_services(6)
    busy = ctx.svc("10.0.1.5")
    ctx.rates = {("svc", busy.svc_id): {"cps": 9, "inpps": 900, "outpps": 800, "inbps": 0, "outbps": 0}}
    lines = top.render(sample(ctx), rows=12, cols=50).splitlines()
    assert len(lines) <= 12 and all(len(line) <= 50 for line in lines)
    services = [line.split()[1] for line in lines if line.startswith("TCP")]
    assert services[0] == "10.0.1.5:80", "the busiest service comes first"
    assert lines[-1].startswith(f"... {6 - len(services)} of 6 services not shown")
    # every line of a service shown is there: the service and its two real servers
    i = next(i for i, line in enumerate(lines) if line.startswith("TCP  10.0.1.5:80"))
    assert lines[i + 1].startswith("  -> 192.168.4.2:80") and lines[i + 2].startswith("  -> 192.168.4.3:80")
    # a terminal that holds everything: every service in ipvsadm's order, nothing left out
    full = top.render(sample(ctx), rows=100, cols=200)
    assert "not shown" not in full and full == top.render(sample(ctx))


def test_rates_after_a_counter_reset_count_from_zero():
    ctx = quick_start(FakeCtx())
    data = sample(ctx)
    data.update(prev_counters=dict(COUNTERS, rx=5000), interval=2.0)  # rx went 5000 -> 1000: reset
    assert "fast path  rx 500/s" in top.render(data)


async def test_top_waits_for_a_restarted_daemon(tmp_path, monkeypatch):
    """Once drawing, a daemon that goes away (restart) is a frame saying so, then top goes on with the new one."""
    ctx = quick_start(FakeCtx())
    path = str(tmp_path / "ctl.sock")
    loop = asyncio.get_running_loop()
    servers = [CtlServer(path, ctx.dispatch)]
    await servers[0].start()
    real_fetch, calls = top.fetch, []

    def fetch(call):
        calls.append(1)
        if len(calls) != 2:
            return real_fetch(call)
        # the daemon restarts between two frames: our connection is closed, a new daemon listens afterwards
        asyncio.run_coroutine_threadsafe(servers[0].stop(), loop).result()
        try:
            return real_fetch(call)
        finally:
            servers.append(CtlServer(path, ctx.dispatch))
            asyncio.run_coroutine_threadsafe(servers[1].start(), loop).result()

    monkeypatch.setattr(top, "fetch", fetch)
    try:
        out = io.StringIO()
        rc = await loop.run_in_executor(
            None, lambda: top.main(["--count", "3", "--interval", "0.01"], ctl_socket=path, out=out))
    finally:
        for srv in servers:
            await srv.stop()
    assert rc == 0
    frames = out.getvalue().split("\n\nhdslb top")
    assert len(frames) == 3 and "TCP  10.0.0.100:80" in frames[0]
    assert "hdslbd is not answering" in frames[1] and "asking again every 0.01s" in frames[1]
    assert "TCP  10.0.0.100:80" in frames[2] and "(totals)" not in frames[2], "rates resume from the last counters"


async def test_a_slow_fetch_stretches_the_interval(tmp_path, monkeypatch):
    """A daemon with 10k services takes ~1.5 s of its event loop per frame: top must not ask every 2 s."""
    ctx = quick_start(FakeCtx())
    path = str(tmp_path / "ctl.sock")
    srv = CtlServer(path, ctx.dispatch)
    await srv.start()
    clock, sleeps = [1000.0], []
    real_fetch = top.fetch

    def slow_fetch(call):
        data = real_fetch(call)
        clock[0] += 1.5  # this sample took the daemon 1.5 s
        return data

    monkeypatch.setattr(top, "fetch", slow_fetch)
    monkeypatch.setattr(top, "_clock", lambda: clock[0])
    monkeypatch.setattr(top, "_sleep", lambda s: (sleeps.append(s), clock.__setitem__(0, clock[0] + s)))
    try:
        rc = await asyncio.get_running_loop().run_in_executor(
            None, lambda: top.main(["--count", "3", "--interval", "2"], ctl_socket=path, out=io.StringIO()))
    finally:
        await srv.stop()
    assert rc == 0 and sleeps == [6.0, 6.0]
    assert top.pause(2.0, 0.1) == 2.0, "a quick fetch keeps the interval asked for"
