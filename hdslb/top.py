"""hdslb-ctl top: a live terminal view of services, real servers, their rates and the fast path's drops.

render(data) is pure (tested directly); main() fetches with the control-socket client and redraws in place.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time

CLEAR = "\x1b[H\x1b[2J"  # cursor home + clear screen: redraw in place without curses
RATE_COLS = (("CPS", "cps"), ("InPPS", "inpps"), ("OutPPS", "outpps"), ("InBPS", "inbps"), ("OutBPS", "outbps"))
MAX_DROP_REASONS = 6


def human(n) -> str:
    """1234 -> 1.2K, as ipvsadm-like columns can hold; below 1000 the exact integer."""
    n = float(n or 0)
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{int(n)}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def _hostport(addr: str, port: int) -> str:
    try:
        v6 = ipaddress.ip_address(addr).version == 6
    except ValueError:
        v6 = False
    return f"[{addr}]:{port}" if v6 else f"{addr}:{port}"


def _rates(counters: dict, prev: dict | None, interval: float | None) -> dict:
    """Per-second rates; a counter below its previous value was reset (a restart with --fresh, `decap zero`)
    and counted afresh from 0 within the interval, as Prometheus' rate() takes it: v / interval."""
    if not prev or not interval:
        return {}
    return {k: (v - prev.get(k, 0) if v >= prev.get(k, 0) else v) / interval for k, v in counters.items()}


def _service_name(s: dict) -> str:
    """'TCP  10.0.0.100:80', or a SNAT service's match as ipvsadm -L shows it: 'MATCH tcp,from=..,oif=..'."""
    m = s.get("match")
    if m:
        text = f"MATCH {m.get('proto', s['proto'])}"
        for key, label in (("src_range", "from"), ("dst_range", "to"), ("iif", "iif"), ("oif", "oif")):
            if m.get(key):
                text += f",{label}={m[key]}"
        return text
    return f"{s['proto'].upper():<4} {_hostport(s['addr'], s['port'])}"


def _activity(s: dict) -> tuple:
    """Sort key, busiest first: packets per second, then new connections, then connections held."""
    r = s.get("rates") or {}
    conns = sum(d.get("active", 0) + d.get("inactive", 0) for d in s.get("dests", []))
    return (-(r.get("inpps", 0) + r.get("outpps", 0)), -r.get("cps", 0), -conns)


# The first column holds "PROT ADDR:PORT" for a service and "  -> ADDR:PORT" for its real servers, as ipvsadm -L.
ROW = "{:<33} {:<6} {:>6} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}"


def render(data: dict, rows: int | None = None, cols: int | None = None) -> str:
    """One frame. data: {"services": service.list reply, "stats": stats.get reply, and optionally
    "prev_counters" (the previous frame's counters), "interval" (seconds since it), "time" (epoch seconds)}.

    rows/cols (a terminal's size) bound the frame: lines are cut at cols (a wrapped line would push the
    header off the screen), and when the services do not fit in rows the busiest come first (packet rate,
    then new connections, then connections held), whole with their real servers, and a last line says
    how many are left out. Without them (a pipe, a file) every service is written, in ipvsadm's order."""
    svcs = (data.get("services") or {}).get("services", [])
    st = data.get("stats") or {}
    counters = st.get("counters") or {}
    rates = _rates(counters, data.get("prev_counters"), data.get("interval"))
    table = st.get("conn_table") or {}
    size = table.get("size") or (data.get("services") or {}).get("size") or 0
    entries = table.get("entries")
    when = time.strftime("%H:%M:%S", time.localtime(data.get("time", time.time())))
    lines = []
    head = f"hdslb top  {when}"
    if data.get("interval"):
        head += f"  every {data['interval']:.1f}s"
    head += f"  services {len(svcs)}"
    if entries is not None and size:
        head += f"  conn table {entries}/{size} ({100.0 * entries / size:.1f}%)"
        if table.get("size6"):  # each table fills (and evicts) on its own
            head += (f" [v4 {table.get('entries4', 0)}/{table.get('size4', 0)}"
                     f" v6 {table.get('entries6', 0)}/{table['size6']}]")
    lines.append(head)

    def fp(name: str) -> str:
        if rates:
            return f"{name.replace('verdict_', '')} {human(rates.get(name, 0))}/s"
        return f"{name.replace('verdict_', '')} {human(counters.get(name, 0))}"

    lines.append("fast path  " + ("" if rates else "(totals) ") + "  ".join(
        fp(n) for n in ("rx", "verdict_tx", "verdict_redirect", "verdict_pass", "verdict_drop")))
    drops = [(k, counters[k]) for k in counters if k.startswith("drop_") and counters[k]]
    if drops:
        drops.sort(key=lambda kv: (-rates.get(kv[0], 0), -kv[1], kv[0]))
        shown = [f"{k[5:]} {human(rates[k])}/s ({human(n)})" if rates else f"{k[5:]} {human(n)}"
                 for k, n in drops[:MAX_DROP_REASONS]]
        more = len(drops) - MAX_DROP_REASONS
        lines.append("drops      " + "  ".join(shown) + (f"  +{more} more" if more > 0 else ""))
    else:
        lines.append("drops      none")
    lines.append("")
    lines.append(ROW.format("Prot LocalAddress:Port", "Sched", "Weight", "ActConn", "InActConn",
                            *(c for c, _ in RATE_COLS)))
    lines.append(ROW.format("  -> RemoteAddress:Port", "Fwd", "", "", "", "", "", "", "", ""))
    blocks = []
    for s in svcs:
        r = s.get("rates") or {}
        act = sum(d.get("active", 0) for d in s.get("dests", []))
        inact = sum(d.get("inactive", 0) for d in s.get("dests", []))
        block = [ROW.format(_service_name(s), s["sched"], "", act, inact, *(human(r.get(k, 0)) for _, k in RATE_COLS))]
        for d in s.get("dests", []):
            dr = d.get("rates") or {}
            block.append(ROW.format("  -> " + _hostport(d["addr"], d["port"]), d["fwd"].upper(), d["weight"],
                                    d.get("active", 0), d.get("inactive", 0),
                                    *(human(dr.get(k, 0)) for _, k in RATE_COLS)))
        blocks.append((s, block))
    if not svcs:
        lines.append("(no virtual services)")
    elif rows is not None and len(lines) + sum(len(b) for _, b in blocks) > rows:
        room = max(0, rows - len(lines) - 1)  # the last row says what is left out
        shown = 0
        for s, block in sorted(blocks, key=lambda sb: _activity(sb[0])):
            if len(block) > room:
                break
            lines += block
            room -= len(block)
            shown += 1
        lines.append(f"... {len(svcs) - shown} of {len(svcs)} services not shown (busiest first; "
                     "a taller terminal, or `hdslb-ctl top -n 1 | less`, shows them all)")
    else:
        for _, block in blocks:
            lines += block
    if cols is not None:
        lines = [line[:cols] for line in lines]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def fetch(call) -> dict:
    """One sample through `call(op, args)` (a Client's call): the same ops ipvsadm uses."""
    return {"services": call("service.list", {"svc": None}), "stats": call("stats.get", {}), "time": time.time()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdslb-ctl top", description="live view of services, real servers and drops")
    p.add_argument("--interval", "-i", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--count", "-n", type=int, default=0, help="frames to draw, then exit (default: until ^C)")
    p.add_argument("--ctl-socket", help="control socket (default $HDSLB_CTRL or /var/run/hdslb_ctrl)")
    return p


# A frame asks hdslbd for every service (service.list): at 10k services x 10 real servers ~2.5 s from request to
# decoded reply, ~0.5 s of it the daemon's event loop (in slices: the slow path, health checks and other clients
# are served in between). Between two frames top waits at least this many times what the last one took, so it
# keeps the daemon busy a fifth of the time at most.
FETCH_SHARE = 4
_clock, _sleep = time.monotonic, time.sleep  # (tests replace them)


def pause(interval: float, took: float) -> float:
    """Seconds to wait before the next frame: the interval asked for, longer when fetching is slow."""
    return max(interval, FETCH_SHARE * took)


def _size(out) -> tuple[int | None, int | None]:
    """(rows, columns) of the terminal out writes to, read afresh every frame (it may be resized)."""
    try:
        size = os.get_terminal_size(out.fileno())
    except (AttributeError, ValueError, OSError):
        return None, None
    return max(size.lines - 1, 1), max(size.columns, 1)  # the cursor's line stays free: no scroll


def main(argv: list[str] | None = None, ctl_socket: str | None = None, out=None) -> int:
    """Draw frames until ^C or --count. hdslbd must answer the first one (else exit 1, for scripts); once it has,
    a daemon that goes away (restart, upgrade) gets a frame saying so and is asked again every interval,
    the rates resuming from the counters it left (they live in pinned maps)."""
    from hdslb.ctl import protocol
    from hdslb.ctl.client import Client, DaemonUnreachable
    from hdslb.errors import HdslbError

    out = out or sys.stdout
    p = build_parser()
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 < ns.interval < float("inf"):  # (nan too: time.sleep() refuses it with a traceback)
        p.error("--interval must be a number of seconds, more than 0")
    if ns.count < 0:
        p.error("--count must be 0 (forever) or more")
    live = out.isatty() and os.environ.get("TERM") != "dumb"
    path = protocol.resolve_socket(ns.ctl_socket or ctl_socket)
    prev, prev_t, frames, client, took = None, None, 0, None, 0.0
    try:
        while True:
            try:
                if client is None:
                    client = Client(path, timeout=10)
                    client.connect()
                t0 = _clock()
                data = fetch(client.call)
                took = _clock() - t0
            except (DaemonUnreachable, TimeoutError, OSError, protocol.ProtocolError) as e:
                if client is not None:
                    client.close()
                    client = None
                if frames == 0:
                    raise
                reason = e.message if isinstance(e, HdslbError) else str(e)
                frame = (f"hdslb top  {time.strftime('%H:%M:%S')}  hdslbd is not answering ({reason}); "
                         f"asking again every {ns.interval:g}s\n")
            else:
                now = _clock()
                if prev is not None:
                    data["prev_counters"], data["interval"] = prev, now - prev_t
                prev, prev_t = (data["stats"] or {}).get("counters"), now
                frame = render(data, *_size(out)) if live else render(data)
            out.write((CLEAR + frame) if live else frame)
            out.flush()
            frames += 1
            if ns.count and frames >= ns.count:
                return 0
            if not live:
                out.write("\n")  # frames appended to a file or pipe stay apart
            _sleep(pause(ns.interval, took))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0  # `hdslb-ctl top | head`: the reader has what it wanted
    except DaemonUnreachable as e:
        print(f"hdslb-ctl: {e}", file=sys.stderr)
    except HdslbError as e:
        print(f"hdslb-ctl: {e.message}", file=sys.stderr)
    except (OSError, protocol.ProtocolError) as e:
        print(f"hdslb-ctl: {e}", file=sys.stderr)
    finally:
        if client is not None:
            client.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
