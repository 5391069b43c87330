"""hdslb-ctl: start, stop and inspect a balancer instance (up / down / status); decap on real servers."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from hdslb import __version__
from hdslb.ctl import protocol
from hdslb.ctl.client import Client, DaemonUnreachable
from hdslb.daemon import add_daemon_options
from hdslb.errors import HdslbError

UP_TIMEOUT_S = 90.0  # a bcc compile takes ~2 s alone, much more on a loaded 2-core CI machine


RUN_DIR = "/run/hdslb"


def log_path(ctl_socket: str, instance: str | None = None) -> str:
    """The default daemon log, /run/hdslb/<instance>.log: --instance when given, else the name the control
    socket gives (as hdslbd names its instance), so two instances never share a log."""
    from hdslb.daemon import instance_error, instance_name

    if instance is None or instance_error(instance):  # (a bad one is hdslbd's to refuse, into the socket's log)
        instance = instance_name(ctl_socket)
    return os.path.join(RUN_DIR, instance + ".log")


def config_paths(path: str | None, config_id: str | None = None) -> dict:
    """The paths a config file names that `up` must know before hdslbd runs: its control socket (`ctrl_defs {
    ipc_msg { unix_domain PATH } }`) and its log (`global_defs { log_file PATH }`), as {"unix_domain": …,
    "log_file": …} for those written once with an absolute path. Empty if the file does not read (hdslbd then
    refuses it, naming the line). Read as hdslbd reads it (includes, `@ID` lines, `$NAME` parameters), statements
    only: up must use what hdslbd -f will, without building the whole file twice (seconds for thousands of
    virtual servers)."""
    if not path:
        return {}
    from hdslb.config.model import ConfigError
    from hdslb.config.syntax import Reader, parse

    try:
        nodes = parse(Reader(config_id=config_id).read_file(path))
    except (ConfigError, OSError):
        return {}
    out = {}
    for *blocks, key in (("ctrl_defs", "ipc_msg", "unix_domain"), ("global_defs", "log_file")):
        level = nodes
        for name in blocks:
            level = [c for n in level if n.name == name for c in (n.body or ())]
        found = [n for n in level if n.name == key and len(n.args) == 1 and n.body is None]
        # (one written twice, or not a path, is refused by hdslbd at its line: nothing to guess then)
        if len(found) == 1 and found[0].args[0].text.startswith("/"):
            out[key] = found[0].args[0].text
    return out


def cmd_up(ns) -> int:
    # --ctl-socket, else the file's unix_domain, else $HDSLB_CTRL, else the default: the order hdslbd -f FILE
    # resolves it in. The socket is always passed on (hdslbd's own --ctl-socket), so it has to be this one.
    named = config_paths(getattr(ns, "config_file", None), getattr(ns, "config_id", None))
    ctl = ns.ctl_socket or named.get("unix_domain") or protocol.resolve_socket(None)
    try:
        st = Client(ctl, timeout=5).call("daemon.status")
        print(f"hdslb-ctl: hdslbd (pid {st['pid']}) already serves {ctl}", file=sys.stderr)
        return 1
    except DaemonUnreachable:
        pass
    argv = [sys.executable, "-m", "hdslb.daemon", *ns.interfaces, "--ctl-socket", ctl]
    for dest, (opt, takes_value) in ns.forward.items():  # the options given, as given
        if hasattr(ns, dest):
            argv += [opt, str(getattr(ns, dest))] if takes_value else [opt] if getattr(ns, dest) else []
    # (absolute: a bare file name's directory is '', which makedirs refuses, and the path is printed)
    logfile = os.path.abspath(ns.log_file or log_path(ctl, getattr(ns, "instance", None)))
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    # The file's log_file is where hdslbd logs (the redirected output then holds little but a crash): a failed
    # start's reason is shown from there, not from an empty --log-file.
    daemon_log = named.get("log_file")
    logs = [(p, _size(p)) for p in dict.fromkeys(x for x in (daemon_log, logfile) if x)]
    with open(logfile, "ab") as lf:
        logs = [(p, os.fstat(lf.fileno()).st_size if p == logfile else off) for p, off in logs]  # earlier runs' lines
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        return _wait_ready(proc, ctl, logs, logfile, daemon_log)
    except KeyboardInterrupt:  # Ctrl-C: hdslbd, in a session of its own, is not interrupted with us
        print(f"hdslb-ctl: interrupted; hdslbd pid {proc.pid} goes on starting in the background (log "
              f"{daemon_log or logfile}; hdslb-ctl status shows it, hdslb-ctl down stops it)", file=sys.stderr)
        return 130


def _wait_ready(proc, ctl: str, logs: list, logfile: str, daemon_log: str | None) -> int:
    """Until hdslbd answers ready (0) or exits (its exit, with what it wrote to its logs), or UP_TIMEOUT_S."""
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = [(p, _log_since(p, off)) for p, off in logs if os.path.exists(p)]
            said = [(p, lines) for p, lines in said if lines] or [(logfile, [])]
            if proc.returncode == 2:
                # hdslbd refused its command line or config (argparse's exit 2): its own "hdslbd: ..." lines say
                # why, without the usage text above them, and up exits 2 as a bad command does
                why = [ln for _, lines in said for ln in lines if ln.startswith("hdslbd: ")]
                if why:
                    sys.stderr.writelines(why[-5:])
                    return 2
            for p, lines in said:
                print(f"hdslb-ctl: hdslbd exited with status {proc.returncode}; last lines it wrote to {p}:",
                      file=sys.stderr)
                sys.stderr.writelines(lines[-15:])
            return 1
        try:
            st = Client(ctl, timeout=5).call("daemon.status")
            # ready: the start finished (the socket answers while the REST server, the config and the health
            # checks still start, any of which can fail); an older hdslbd without it says attached
            if st.get("ready", st.get("attached")):
                modes = ", ".join(f"{k} ({v})" for k, v in st["interfaces"].items())
                print(f"hdslbd pid {st['pid']} attached to {modes}; control socket {ctl}; log {daemon_log or logfile}")
                return 0
        except DaemonUnreachable:
            pass
        time.sleep(0.2)
    print(f"hdslb-ctl: hdslbd did not answer on {ctl} within {UP_TIMEOUT_S:.0f} s (log: {logfile})", file=sys.stderr)
    return 1


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _log_since(path: str, offset: int) -> list[str]:
    """The lines of the log from byte `offset` on: what the daemon just started wrote, without an earlier run's
    lines above them (a reused --log-file showed old errors as this start's). A log truncated or rotated meanwhile
    is read whole."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size >= offset:
            f.seek(offset)
        return f.read().decode(errors="replace").splitlines(keepends=True)


def _not_this_daemon(ns, st: dict) -> str | None:
    """Why the hdslbd answering on the control socket is not the instance `down`'s options name, or None. The
    options name an instance for the case of no daemon; with one running they must agree with it, else `down
    --instance b` without b's socket would stop whichever instance the default socket reaches."""
    pin_dir, state_file = st.get("pin_dir") or "", st.get("state_file")
    instance = st.get("instance") or os.path.basename(pin_dir.rstrip("/"))
    if ns.instance is not None and ns.instance != instance:
        return f"--instance {ns.instance}, but it serves instance {instance}"
    if ns.pin_root is not None and os.path.realpath(ns.pin_root) != os.path.realpath(os.path.dirname(pin_dir)):
        return f"--pin-root {ns.pin_root}, but its pins are in {pin_dir}"
    if ns.state_dir is not None and state_file and \
            os.path.realpath(ns.state_dir) != os.path.realpath(os.path.dirname(state_file)):
        return f"--state-dir {ns.state_dir}, but its saved model is {state_file}"
    return None


def _orphans() -> list[tuple[str, str, int]]:
    from hdslb.fastpath import loader

    try:
        return loader.orphaned_fastpaths()
    except OSError:  # an interface or map went meanwhile: nothing to name
        return []


def cmd_down(ns) -> int:
    from hdslb.daemon import instance_error

    if ns.instance is not None and instance_error(ns.instance):  # ("..": the pin root's parent, removed)
        print(f"hdslb-ctl: --instance: {instance_error(ns.instance)}", file=sys.stderr)
        return 2
    ctl = protocol.resolve_socket(ns.ctl_socket)
    try:
        st = Client(ctl, timeout=10).call("daemon.status")
        why = _not_this_daemon(ns, st)
        if why:
            print(f"hdslb-ctl: the hdslbd on {ctl} (pid {st['pid']}) is not the instance given: {why}; nothing "
                  "was stopped (name that instance's control socket with --ctl-socket or HDSLB_CTRL)",
                  file=sys.stderr)
            return 2
        Client(ctl, timeout=10).call("daemon.shutdown", {"detach": True})
    except DaemonUnreachable as e:
        # No daemon (kill -9, a crash): what it left behind is taken down all the same.
        from hdslb.daemon import Settings, down_offline, instance_name

        from hdslb.daemon import DEFAULT_PIN_ROOT, DEFAULT_STATE_DIR

        settings = Settings(interfaces=[], ctl_socket=ctl, instance=ns.instance or instance_name(ctl),
                            pin_root=ns.pin_root or os.environ.get("HDSLB_PIN_ROOT", DEFAULT_PIN_ROOT),
                            state_dir=ns.state_dir or DEFAULT_STATE_DIR)
        done = down_offline(settings)
        # Nothing of the instance attached here: is an hdslb fast path still forwarding that nothing can reach
        # (its pins removed or gone with a mount namespace, no daemon holding its maps)? `down` cannot tell whose
        # it was, so it is named with the command that detaches it rather than taken down unasked.
        orphans = [] if any(ln.startswith("detached") for ln in done) else _orphans()
        if not done:
            print(f"hdslb-ctl: {e}; and nothing of instance {settings.instance} is left (no pins in "
                  f"{settings.pin_dir}, no {settings.state_file})", file=sys.stderr)
        else:
            print(f"hdslbd is not running ({e}); " + "; ".join(done))
        for name, mode, prog_id in orphans:
            off = "xdpgeneric" if mode == "generic" else "xdp"
            print(f"hdslb-ctl: {name} still runs XDP program id {prog_id}, an hdslb fast path nothing can reach: "
                  f"none of its maps is pinned on a bpffs here or held by a process, so no hdslbd can adopt or "
                  f"detach it and it forwards with the tables it had. Detach it with `ip link set dev {name} {off} "
                  f"off`", file=sys.stderr)
        return 1 if orphans or not done else 0
    pid = st["pid"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"hdslbd pid {pid} stopped; XDP detached from {', '.join(st['interfaces'])}")
            return 0
        time.sleep(0.1)
    print(f"hdslb-ctl: hdslbd pid {pid} still running after 30 s", file=sys.stderr)
    return 1


def cmd_reload(ns) -> int:
    ctl = protocol.resolve_socket(ns.ctl_socket)
    try:
        if ns.datapath:
            r = Client(ctl, timeout=UP_TIMEOUT_S).call("daemon.reload_datapath")
            print(f"datapath reloaded on {', '.join(r['interfaces'])}; {r['conn_entries']} connection entries kept")
            return 0
        r = Client(ctl, timeout=UP_TIMEOUT_S).call("config.reload")
    except DaemonUnreachable as e:
        print(f"hdslb-ctl: {e}", file=sys.stderr)
        return 1
    print(f"configuration reloaded: {len(r['applied'])} changes")
    for line in r["applied"]:
        print(f"  {line}")
    for opt in r["needs_restart"]:
        print(f"  needs a restart to take effect: {opt}")
    for opt in r.get("not_acted_on", ()):
        print(f"  accepted, not acted on: {opt}")
    for line in r.get("warnings", ()):
        print(f"  warning: {line}")
    if r.get("note"):
        print(f"  {r['note']}")
    return 0


def cmd_check(ns) -> int:
    """Validate a config without running it, like `keepalived -t`."""
    from hdslb.config import check

    try:
        errors = check(ns.config, ns.config_id)
    except OSError as e:
        errors = [f"{ns.config}: {e.strerror}"]
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return 1
    from hdslb.config import load
    from hdslb.config.apply import desired, dry_run, inactive_notices, laddr_warnings

    cfg = load(ns.config, ns.config_id)
    try:
        # what the model refuses, as a start or reload would, at the limits hdslbd will have
        errors = dry_run(cfg, max_services=ns.max_services, max_dests=ns.max_dests,
                         max_hash_cells=ns.max_hash_cells)
    except HdslbError as e:  # the plan itself (an undefined group, ...)
        errors = [e.message]
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return 1
    for n in inactive_notices(cfg):
        print(f"notice: {n}")
    for w in laddr_warnings(desired(cfg, lambda addr: "-")):  # what a start or reload would warn of, too
        print(f"warning: {w}")
    conn = cfg.ipvs_defs.conn
    ncpus = _possible_cpus()
    from hdslb.fastpath.loader import conn_table_refusal

    why = conn_table_refusal(conn.conn_table, ncpus)
    if why:  # hdslbd refuses to start with it (unless its --conn-table stands over the file's)
        print(f"{cfg.settings['ipvs_defs.conn.conn_table'].where}: conn_table {conn.conn_table}: {why}",
              file=sys.stderr)
        return 1
    print(conn_table_line(conn.conn_pool_size, conn.conn_table, ncpus, entries6=conn.conn6_pool_size))
    print(f"{ns.config}: OK")
    return 0


def _possible_cpus() -> int:
    from hdslb.fastpath import loader

    try:
        return loader.possible_cpus()
    except Exception:  # no bcc here: the CPUs this process sees, a lower bound
        return os.cpu_count() or 1


def conn_table_line(entries: int, table: str, ncpus: int | None = None, mem_total: int | None = None,
                    entries6: int | None = None) -> str:
    """What the config's connection tables will take on this machine (and a notice when that is a lot), so the
    memory is known before hdslbd starts. hdslbd --max-conns / --max-conns6 override conn_pool_size /
    conn6_pool_size."""
    from hdslb.fastpath import loader

    if ncpus is None:
        ncpus = _possible_cpus()
    mem_total = loader._mem_total() if mem_total is None else mem_total
    label = table
    if table == "auto":  # what hdslbd will pick on this machine
        table = loader.resolve_conn_table("auto", ncpus)
        label = conn_kind_text({"kind": table, "auto_cpus": ncpus})
    sizes = loader.Sizes(max_conns=entries, max_conns6=entries6 or 0, conn_table=table)
    need = loader.conn_tables_estimate(sizes, ncpus)
    line = (f"connection tables: {entries} IPv4 entries (conn_pool_size) + {sizes.conn6_entries()} IPv6 "
            f"(conn6_pool_size), {label}: ~{need / 2**20:.0f} MiB of kernel memory"
            + (f" on {ncpus} possible CPUs" if table == "percpu" and label == table else ""))
    advice = loader.conn_table_advice(sizes, ncpus, table, mem_total)
    return line + (f"\nnotice: {advice}" if advice else "")


class _Usage(Exception):
    """A bad `health add/del` argument: printed, exit 2 (as argparse's own usage errors)."""


def _port_of(text: str, spec: str, what: str) -> int:
    # ASCII digits: int() also reads "٨٠", " 80" and "8_0"
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise _Usage(f"hdslb-ctl: invalid {what} {spec!r}: {text!r} is not a port (0..65535)")
    return int(text)


def _svc_arg(ns) -> dict:
    import ipaddress

    spec, proto = (ns.tcp, "tcp") if ns.tcp else (ns.udp, "udp")
    host, _, port = spec.rpartition(":")
    try:
        addr = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        raise _Usage(f"hdslb-ctl: invalid service {spec!r} (VIP:PORT)") from None
    return {"proto": proto, "addr": addr, "port": _port_of(port, spec, "service")}


def _rs_arg(spec: str) -> tuple:
    import ipaddress

    host, sep, port = spec.rpartition(":") if spec.count(":") == 1 or spec.startswith("[") else ("", "", spec)
    if not sep:
        host, port = spec, "0"
    try:
        addr = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        raise _Usage(f"hdslb-ctl: invalid real server {spec!r} (RS[:PORT])") from None
    return addr, _port_of(port, spec, "real server")


HEALTH_DEFAULTS = {"delay_loop": 6}  # and --kind: UDP_CHECK for a -u service, else TCP_CHECK (cmd_health)


def _health_unused(ns) -> str | None:
    """What a `health` command line gives that its action would not use, as ipvsadm refuses an option its command
    does not take: `show -t VIP` read like a filter and listed every check, `del ... --kind HTTP_GET` like removing
    that kind only (del removes the server's check.add check whatever its kind), -t with -u took -t."""
    if ns.tcp and ns.udp:
        return "give one of -t and -u"
    given = {"-t": ns.tcp, "-u": ns.udp, "-r": ns.real_server, "--kind": ns.kind, "--delay-loop": ns.delay_loop,
             "--inhibit": ns.inhibit, "KEY=VALUE": ns.params}
    unused = {"show": list(given), "del": ["--kind", "--delay-loop", "--inhibit", "KEY=VALUE"]}.get(ns.action, [])
    for opt in unused:
        if given[opt] not in (None, False, []):
            return f"health {ns.action} takes no {opt}" + (" (it shows every check)" if ns.action == "show" else "")
    return None


def cmd_health(ns) -> int:
    ctl = protocol.resolve_socket(ns.ctl_socket)
    unused = _health_unused(ns)
    if unused:
        print(f"hdslb-ctl: {unused}", file=sys.stderr)
        return 2
    for k, v in HEALTH_DEFAULTS.items():
        if getattr(ns, k) is None:
            setattr(ns, k, v)
    if ns.kind is None:  # a TCP_CHECK of a UDP service (DNS, syslog) is refused by every healthy server: all down
        ns.kind = "UDP_CHECK" if ns.udp else "TCP_CHECK"
    try:
        if ns.action == "show":
            st = Client(ctl).call("health.list")["health"]
            if not st:
                print("no health checks")
            for vs, v in st.items():
                # the live weight beside the quorum: "up/3" alone hid why a service kept (or lost) it, 2 being within
                # a hysteresis of 1 (gained at 4, lost below 2)
                live = f" (weight {v['weight']}" + (f", hysteresis {v['hysteresis']}" if v.get("hysteresis") else "") \
                    + ")" if v.get("weight") is not None else ""
                print(f"{vs}  quorum {v.get('quorum')}/{v.get('quorum_needed')}{live}")
                for rs, r in v.get("real_servers", {}).items():
                    why = [r.get("reason")] if r.get("reason") else []
                    if r.get("held"):  # up, at weight 0: the lost quorum, not its check, keeps it out
                        why.insert(0, "held out while the sorry server stands in")
                    reason = f"  ({'; '.join(why)})" if why else ""
                    # the pool's weight (ipvsadm -e -w since start changes it); the checks' own copy of the
                    # configured weight only when the daemon does not say (older, or the pool lacks the server)
                    weight = r["pool_weight"] if r.get("pool_weight") is not None else \
                        f"{r.get('weight')} (configured)"
                    print(f"  -> {rs:<28} {r.get('state', '?'):<5} weight {weight}{reason}")
            return 0
        if not (ns.tcp or ns.udp) or not ns.real_server:
            print("hdslb-ctl: health add/del need -t|-u VIP:PORT and -r RS[:PORT]", file=sys.stderr)
            return 2
        addr, port = _rs_arg(ns.real_server)
        args = {"svc": _svc_arg(ns), "addr": addr, "port": port}
        if ns.action == "del":
            Client(ctl).call("check.del", args)
            return 0
        params = {}
        for kv in ns.params:
            k, sep, v = kv.partition("=")
            if not sep:
                print(f"hdslb-ctl: parameter {kv!r} is not KEY=VALUE", file=sys.stderr)
                return 2
            if k in ("path", "status_code", "digest"):
                params.setdefault("url", {})[k] = v
            else:
                params[k] = v
        args.update(kind=ns.kind, delay_loop=ns.delay_loop, inhibit_on_failure=ns.inhibit, params=params)
        print(f"check added: {Client(ctl).call('check.add', args)['key']}")
        return 0
    except DaemonUnreachable as e:
        print(f"hdslb-ctl: {e}", file=sys.stderr)
        return 1
    except _Usage as e:
        print(e, file=sys.stderr)
        return 2


def _delay_loop(text: str) -> float:
    """--delay-loop: seconds, more than 0. Refused here so the message names the option and echoes what was typed:
    argparse's float passed -1 on as -1.0, and the daemon said "'-1.0' is not a number"."""
    import math

    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if math.isnan(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is out of range: seconds, more than 0")
    return v


def health_parser() -> argparse.ArgumentParser:
    hc = argparse.ArgumentParser(prog="hdslb-ctl health", description="show health checks, or add/del one at run time")
    # (alone, as ipvsadm alone lists: show; a required one read "required: action, KEY=VALUE", KEY=VALUE being optional)
    hc.add_argument("action", nargs="?", default="show", choices=("show", "add", "del"))
    hc.add_argument("-t", "--tcp-service", dest="tcp")
    hc.add_argument("-u", "--udp-service", dest="udp")
    hc.add_argument("-r", "--real-server", dest="real_server")
    # (no argparse defaults for --kind and --delay-loop: add fills them in, show and del refuse them when given)
    hc.add_argument("--kind", help="TCP_CHECK (the default for -t), HTTP_GET, SSL_GET, UDP_CHECK (the default for -u), "
                    "SMTP_CHECK, MISC_CHECK")
    hc.add_argument("--delay-loop", type=_delay_loop, metavar="SECONDS",
                    help="seconds between checks, more than 0 (default 6)")
    hc.add_argument("--inhibit", action="store_true", help="inhibit_on_failure: weight 0 instead of removal")
    hc.add_argument("params", nargs="*", metavar="KEY=VALUE",
                    help="checker options, e.g. connect_timeout=1 connect_port=8080 path=/health status_code=200")
    return hc


def decap_parser() -> argparse.ArgumentParser:
    """`hdslb-ctl decap`: the real-server side of TUNNEL mode. Runs on the real server; needs no hdslbd."""
    from hdslb.fastpath.decap import DEFAULT_PIN_ROOT, HOST_ADDRS, XDP_MODES

    dp = argparse.ArgumentParser(prog="hdslb-ctl decap",
                                 description="decapsulate the balancer's TUNNEL-mode packets (IPIP, IPv6-in-IPv6, "
                                             "4in6, 6in4) in XDP on a real server, for kernels without tunnel modules")
    sp = dp.add_subparsers(dest="action", required=True, metavar="{up,down,show,zero}")

    def common(p):
        # absolute: bcc cannot make or open pins by a relative PIN_DIR (the compile failed, blaming a map layout)
        p.add_argument("--pin-root", default=DEFAULT_PIN_ROOT, type=os.path.abspath,
                       help=f"bpffs root for the pins (default {DEFAULT_PIN_ROOT})")

    up = sp.add_parser("up", help="attach (or refresh) the decap program on IFACE")
    up.add_argument("iface", metavar="IFACE")
    up.add_argument("--xdp-mode", choices=XDP_MODES, default="auto",
                    help="auto: native where the driver supports XDP, else generic (default auto)")
    up.add_argument("--addr", action="append", default=[], metavar="A",
                    help="also decapsulate for this address (repeatable); e.g. a real-server address not on this host yet")
    up.add_argument("--host-addrs", choices=HOST_ADDRS, default="all",
                    help="which host addresses are outer destinations: all of this namespace's, IFACE's, or none "
                         "(only --addr); default all")
    common(up)
    down = sp.add_parser("down", help="detach the decap program from IFACE and remove its pins")
    down.add_argument("iface", metavar="IFACE")
    common(down)
    show = sp.add_parser("show", help="decap instances of this network namespace: state, addresses, counters")
    show.add_argument("iface", nargs="?", metavar="IFACE")
    show.add_argument("-j", "--json", action="store_true", help="JSON output")
    common(show)
    zero = sp.add_parser("zero", help="zero IFACE's decap counters")
    zero.add_argument("iface", metavar="IFACE")
    common(zero)
    return dp


def _decap_usage(ns) -> str | None:
    """What is wrong with a decap command line that argparse cannot see, or None."""
    from hdslb.fastpath.decap import check_ifname, parse_addr

    if ns.iface is not None:
        try:
            check_ifname(ns.iface)
        except ValueError as e:
            return str(e)
    for a in getattr(ns, "addr", []):
        try:
            parse_addr(a)
        except ValueError as e:
            return f"invalid --addr {a!r}: {e}"
    return None


def format_decap(st) -> list[str]:
    """One instance as `show` prints it."""
    if st.attached:
        state = f"{st.attached_mode} XDP, prog id {st.prog_id}"
    elif st.moved_to is not None:
        state = (f"NOT ATTACHED to {st.ifname}: its program runs on {st.moved_to} ({st.moved_mode} XDP; renamed?); "
                 f"`hdslb-ctl decap down {st.ifname}` detaches it there")
    elif not st.iface_exists:
        state = "NOT ATTACHED: the interface is gone (hdslb-ctl decap down removes the pins)"
    elif st.attached_prog_id is not None:
        state = f"NOT ATTACHED: XDP program id {st.attached_prog_id} of another tool runs there"
    else:
        state = "NOT ATTACHED: no XDP program on the interface"
    lines = [f"{st.ifname}: {state}", f"  pinned:    {st.pin_dir}",
             f"  addresses: {' '.join(str(a) for a in st.addrs) or '(none)'}"]
    width = max((len(k) for k in st.counters), default=0)
    lines += [f"  {k:<{width}}  {v}" for k, v in st.counters.items()]
    return lines


def cmd_decap(ns) -> int:
    import json

    from hdslb.fastpath import decap

    if ns.action == "up":
        st = decap.up(ns.iface, ns.xdp_mode, ns.addr, ns.host_addrs, ns.pin_root)
        print(f"decap on {st.ifname} ({st.attached_mode} XDP), prog id {st.prog_id}, network namespace {st.netns}")
        print(f"  decapsulating for: {' '.join(str(a) for a in st.addrs)}")
        print(f"  pinned at {st.pin_dir}")
    elif ns.action == "down":
        st = decap.down(ns.iface, ns.pin_root)
        what = f"detached from {st.ifname}" if st.attached else \
            f"detached from {st.moved_to} ({st.ifname} renamed)" if st.moved_to else \
            f"was no longer attached to {st.ifname}"
        print(f"decap {what}; pins removed from {st.pin_dir}")
    elif ns.action == "zero":
        decap.zero(ns.iface, ns.pin_root)
        print(f"decap counters of {ns.iface} zeroed")
    else:
        states = decap.show(ns.iface, ns.pin_root)
        if ns.json:
            print(json.dumps([s.as_dict() for s in states], indent=2))
            return 0
        if not states:
            print(f"no decap instance in network namespace {decap.netns_name()}")
        for s in states:
            print("\n".join(format_decap(s)))
    return 0


def decap_main(argv: list[str]) -> int:
    ns = decap_parser().parse_args(argv)
    problem = _decap_usage(ns)
    if problem:
        print(f"hdslb-ctl decap {ns.action}: {problem}", file=sys.stderr)
        return 2
    from pyroute2 import NetlinkError

    from hdslb.fastpath.decap import DecapError

    try:
        return cmd_decap(ns)
    except DecapError as e:
        print(f"hdslb-ctl: decap {ns.action}: {e}", file=sys.stderr)
    except NetlinkError as e:  # the interface vanished between two netlink calls, or a permission
        print(f"hdslb-ctl: decap {ns.action}: netlink: {os.strerror(e.code) if e.code else e}", file=sys.stderr)
    except BrokenPipeError:  # our stdout's reader went away (| head): main ends quietly
        raise
    except OSError as e:
        print(f"hdslb-ctl: decap {ns.action}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
    return 1


def cmd_status(ns) -> int:
    try:
        st = Client(protocol.resolve_socket(ns.ctl_socket), timeout=10).call("daemon.status")
    except DaemonUnreachable as e:
        print(f"hdslb-ctl: {e}", file=sys.stderr)
        return 3  # like systemctl status: not running
    print(f"hdslbd {st['version']} pid {st['pid']} up {st['uptime_s']} s")
    if st.get("ready") is False:  # the socket answers before the start has finished
        print("  starting:       not ready yet: the config file, REST API and health checks are still being started")
    print(f"  control socket: {st['ctl_socket']}")
    print(f"  pinned maps:    {st['pin_dir']}")
    for ifname, mode in st["interfaces"].items():
        if ifname in st.get("gone", ()):
            print(f"  NOT ATTACHED:   {ifname}: the interface is gone (attached again when it comes back)")
        elif ifname in st.get("lost", {}):
            other = st["lost"][ifname]
            print(f"  NOT ATTACHED:   {ifname}: " + (f"XDP program id {other} of another tool runs there (once it is "
                                                     f"stopped, " if other else "no XDP program on the interface (")
                  + "hdslb-ctl reload --datapath attaches it again)")
        else:
            print(f"  attached:       {ifname} ({mode} XDP)")
    print(f"  services:       {st['services']}")
    kept = st.get("retired_laddrs") or []
    if kept:  # taken out of every service while connections used them: still answered until those end
        shown = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        print(f"  local addresses kept for their connections (no service has them): {shown}")
    if st.get("save_error"):
        print(f"  SAVED MODEL BEHIND: {st['state_file']}: {st['save_error']}; a restart now would drop what it lacks "
              f"(retried every few seconds)")
    ct = st.get("conn_table")
    if ct:
        mem = f", {ct['memlock_bytes'] / 2**20:.1f} MiB" if ct.get("memlock_bytes") else ""
        six = f" + {ct['size6']} IPv6" if ct.get("size6") else ""
        print(f"  conn table:     {conn_kind_text(ct)}, {ct['size']} IPv4{six} entries{mem}")
    try:
        stats = Client(protocol.resolve_socket(ns.ctl_socket), timeout=10).call("stats.get")
    except (HdslbError, DaemonUnreachable, protocol.ProtocolError, OSError):
        return 0  # what status said above stands
    ct = stats.get("conn_table") or {}
    if "entries" in ct:
        line = f"  connections:    {ct['entries']} entries in use"
        if ct.get("evicted"):
            line += (f"; {ct['evicted']} evicted by the full table's LRU since it was made (idle connections cut:"
                     f" --max-conns)")
        print(line)
    print(f"  slow path:      {slowpath_line(stats.get('slowpath'))}")
    return 0


def conn_kind_text(ct: dict) -> str:
    """The conn table kind in use, and what auto picked it by: "shared (auto: 64 possible CPUs)"."""
    n = ct.get("auto_cpus")
    return ct["kind"] + (f" (auto: {n} possible CPUs)" if n is not None else "")


def slowpath_line(sp: dict | None) -> str:
    """The slow path in one line: its neighbour table against the bound, unresolved bytes against theirs."""
    if not sp:
        return "off (--no-slowpath, or AF_XDP unavailable)"
    n, c = sp.get("neigh") or {}, sp.get("counters") or {}
    line = f"{len(sp.get('sockets') or {})} AF_XDP socket(s)"
    if n:
        line += (f"; {n.get('entries', 0)} neighbours ({n.get('learned', 0)} learned, at most {n.get('gc_thresh3')})"
                 f"; {n.get('unres_bytes', 0)} of {n.get('unres_qbytes')} bytes queued for unresolved next hops")
    refused = {k: c[k] for k in ("neigh_table_full", "neigh_unsolicited", "neigh_write_failed", "unres_bytes_full")
               if c.get(k)}
    if refused:
        line += "; " + ", ".join(f"{k} {v}" for k, v in refused.items())
    return line


def _limit(opt: str):
    """check's --max-services, --max-dests, --max-hash-cells: refused where hdslbd refuses them (exit 2), since a
    verdict at a limit hdslbd does not start with says nothing about the start."""
    from hdslb.daemon import limit_error

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        why = limit_error(opt, value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdslb-ctl", description="control an hdslb balancer instance")
    p.add_argument("--version", action="version", version=f"hdslb-ctl {__version__}")
    p.add_argument("--ctl-socket", help=f"control socket (default ${protocol.ENV_CTL_SOCKET} or {protocol.DEFAULT_CTL_SOCKET})")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="compile and attach the XDP program, start hdslbd in the background")
    up.add_argument("--log-file", help="daemon log (default /run/hdslb/<instance>.log)")
    up.set_defaults(func=cmd_up, forward=add_daemon_options(up, defaults=False))  # every hdslbd option
    rl = sub.add_parser("reload", help="re-read the config file (like SIGHUP); --datapath: swap the XDP program")
    rl.add_argument("--datapath", action="store_true", help="recompile and swap the XDP program, keeping all maps")
    rl.set_defaults(func=cmd_reload)
    sub.add_parser("health", help="health checks: show, or add/del one at run time (see hdslb-ctl health -h)")
    ck = sub.add_parser("check", help="validate a config file without running it (like keepalived -t)")
    ck.add_argument("-f", "--config", required=True)
    ck.add_argument("-i", "--config-id", metavar="ID", help="as keepalived -i: which `@ID` lines apply (default: the "
                                                            "node name, up to its first dot)")
    # the model's limits hdslbd will run with: a file past them is refused at start, so check says so first
    from hdslb.balancer import DEFAULT_HASH_CELLS
    from hdslb.daemon import DEFAULT_MAX_DESTS, DEFAULT_MAX_SERVICES

    ck.add_argument("--max-services", type=_limit("--max-services"), default=DEFAULT_MAX_SERVICES,
                    help=f"as given to hdslbd (default {DEFAULT_MAX_SERVICES})")
    ck.add_argument("--max-dests", type=_limit("--max-dests"), default=DEFAULT_MAX_DESTS,
                    help=f"as given to hdslbd (default {DEFAULT_MAX_DESTS})")
    ck.add_argument("--max-hash-cells", type=_limit("--max-hash-cells"), default=DEFAULT_HASH_CELLS,
                    help=f"as given to hdslbd (default {DEFAULT_HASH_CELLS})")
    ck.set_defaults(func=cmd_check)
    dn = sub.add_parser("down", help="detach the XDP program, remove pinned state, stop hdslbd")
    dn.set_defaults(func=cmd_down)
    # Where the instance's pins and model are, for a down with no daemon to ask (as given to up / hdslbd).
    from hdslb.daemon import DEFAULT_PIN_ROOT, DEFAULT_STATE_DIR

    # No defaults here: with a daemon answering, only the options given are held against what it reports (a
    # daemon started with --state-dir D is stopped by a plain `down`); the defaults serve the no-daemon case.
    dn.add_argument("--pin-root", help="with no hdslbd running: the --pin-root it was started with (default "
                                       f"$HDSLB_PIN_ROOT, else {DEFAULT_PIN_ROOT})")
    dn.add_argument("--state-dir", help=f"with no hdslbd running: the --state-dir it was started with (default "
                                        f"{DEFAULT_STATE_DIR})")
    dn.add_argument("--instance", help="with no hdslbd running: the --instance it was started with")
    sub.add_parser("status", help="what runs where").set_defaults(func=cmd_status)
    sub.add_parser("top", help="live view of services, real servers, rates and drops (--interval, --count)")
    sub.add_parser("decap", help="real-server side of TUNNEL mode: XDP decapsulation, no hdslbd needed "
                                 "(up/down/show, see hdslb-ctl decap -h)")
    return p


def main(argv: list[str] | None = None) -> int:
    from cli.common import closed_stdout_quiet

    try:
        return closed_stdout_quiet(lambda: _main(argv))  # `hdslb-ctl status | head -1`: no "Broken pipe"
    except KeyboardInterrupt:  # Ctrl-C while waiting on the daemon or a compile: one line, a shell's SIGINT status
        print("hdslb-ctl: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from cli.common import UsageError, take_ctl_socket

    argv = list(sys.argv[1:] if argv is None else argv)
    # --ctl-socket PATH or --ctl-socket=PATH, anywhere on the line, as for ipvsadm and dpip (the same code). Only
    # the spaced form was taken out here: the = form went on to argparse, whose value was then overwritten with
    # None, so `hdslb-ctl --ctl-socket=B down` stopped the instance on the default socket.
    try:
        ctl, argv = take_ctl_socket(argv)
    except UsageError as e:
        print(f"hdslb-ctl: {e}", file=sys.stderr)
        return 2
    if argv[:1] == ["top"]:
        from hdslb import top

        return top.main(argv[1:], ctl_socket=ctl)
    if argv[:1] == ["decap"]:
        return decap_main(argv[1:])
    if argv[:1] == ["health"]:
        hns = health_parser().parse_intermixed_args(argv[1:])
        hns.ctl_socket = ctl
        try:
            return cmd_health(hns)
        except HdslbError as e:
            print(f"hdslb-ctl: {e.message}", file=sys.stderr)
            return 1
    ns = build_parser().parse_args(argv)
    ns.ctl_socket = ctl
    if ns.cmd == "up" and not ns.interfaces and not getattr(ns, "config_file", None):
        print("hdslb-ctl: up needs at least one interface (or -f CONF)", file=sys.stderr)
        return 2
    try:
        return ns.func(ns)
    except HdslbError as e:
        print(f"hdslb-ctl: {e.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # our stdout's reader went away (| head): main ends quietly
        raise
    except (protocol.ProtocolError, OSError) as e:  # a daemon that does not answer, a garbled reply, EACCES
        print(f"hdslb-ctl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
