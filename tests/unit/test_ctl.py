"""Control protocol framing and the socket server, without a fast path."""

import asyncio
import errno
import os
import socket

import msgpack
import pytest

from hdslb.ctl import protocol
from hdslb.ctl.client import Client, DaemonUnreachable
from hdslb.ctl.server import CtlServer
from hdslb.errors import HdslbError



def exited_popen(monkeypatch, hdslb_ctl) -> list:
    """hdslbd as `up` starts it, replaced by a process that has already exited 3: the argv of each start."""
    started = []

    class Exited:
        returncode = 3

        def __init__(self, argv, **kw):
            started.append(argv)

        def poll(self):
            return 3

    monkeypatch.setattr(hdslb_ctl.subprocess, "Popen", Exited)
    return started

def test_frame_round_trip():
    msg = protocol.request(7, "service.add", {"proto": "tcp", "addr": "10.0.0.1", "port": 80})
    raw = protocol.encode(msg)
    n = protocol.frame_length(raw[:protocol.HEADER_SIZE])
    assert n == len(raw) - protocol.HEADER_SIZE
    assert protocol.validate_request(protocol.decode_body(raw[protocol.HEADER_SIZE:])) == (7, "service.add", msg["args"])


@pytest.mark.parametrize("body,reason", [
    (msgpack.packb([1, 2]), "not a map"),
    (b"\xc1", "undecodable"),
    (msgpack.packb({"v": 9, "id": 1, "op": "x"}), "version"),
    (msgpack.packb({"v": 1, "id": "a", "op": "x"}), "id"),
    (msgpack.packb({"v": 1, "id": 1, "op": "x", "args": []}), "args"),
])
def test_bad_frames_are_refused_with_a_reason(body, reason):
    with pytest.raises(protocol.ProtocolError, match=reason):
        protocol.validate_request(protocol.decode_body(body))


def test_oversized_frame_header_is_refused():
    with pytest.raises(protocol.ProtocolError):
        protocol.frame_length((protocol.MAX_FRAME + 1).to_bytes(4, "big"))


def test_socket_resolution_order(monkeypatch):
    monkeypatch.delenv(protocol.ENV_CTL_SOCKET, raising=False)
    assert protocol.resolve_socket() == "/var/run/hdslb_ctrl"
    monkeypatch.setenv(protocol.ENV_CTL_SOCKET, "/run/x.ctrl")
    assert protocol.resolve_socket() == "/run/x.ctrl"
    assert protocol.resolve_socket("/tmp/y") == "/tmp/y"


async def test_server_dispatches_and_survives_errors(tmp_path):
    path = str(tmp_path / "ctl.sock")

    def dispatch(op, args):
        if op == "echo":
            return args
        if op == "refuse":
            raise HdslbError(errno.EEXIST, "Service already exists")
        raise RuntimeError("boom")

    srv = CtlServer(path, dispatch)
    await srv.start()
    try:
        def client_side():
            with Client(path) as c:
                assert c.call("echo", {"a": 1}) == {"a": 1}
                with pytest.raises(HdslbError) as e:
                    c.call("refuse")
                assert e.value.errno == errno.EEXIST and e.value.message == "Service already exists"
                with pytest.raises(HdslbError, match="internal error in crash"):
                    c.call("crash")
                assert c.call("echo", {"still": "alive"}) == {"still": "alive"}

        await asyncio.get_running_loop().run_in_executor(None, client_side)

        # garbage on the wire: an error reply, then the connection is closed; the server keeps serving
        r, w = await asyncio.open_unix_connection(path)
        w.write(b"\x00\x00\x00\x02\xc1\xc1")
        await w.drain()
        n = protocol.frame_length(await r.readexactly(4))
        rep = protocol.decode_body(await r.readexactly(n))
        assert rep["ok"] is False and rep["errno"] == errno.EPROTO
        w.close()
        await asyncio.get_running_loop().run_in_executor(None, lambda: Client(path).call("echo", {}))
    finally:
        await srv.stop()
    assert not os.path.exists(path)


def test_missing_daemon_names_the_socket(tmp_path):
    with pytest.raises(DaemonUnreachable, match=str(tmp_path / "none.sock")):
        Client(str(tmp_path / "none.sock")).call("daemon.status")


def test_a_daemon_dying_with_our_connection_queued_is_unreachable(tmp_path):
    """kill -9 leaves the socket file; a connection queued on the dead listener is reset, not served."""
    path = str(tmp_path / "dying.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    c = Client(path, timeout=5)
    c.connect()  # queued, never accepted
    listener.close()
    with pytest.raises(DaemonUnreachable, match="went away"):
        c.call("daemon.status")


def test_a_daemon_that_does_not_answer_is_named_and_hdslb_ctl_does_not_start_another(tmp_path, capsys,
                                                                                      monkeypatch):
    """A listener that never answers (a stopped or wedged daemon): the call times out with the socket named,
    and `hdslb-ctl up` reports it instead of starting a second daemon over the same pins."""
    from cli import hdslb_ctl

    path = str(tmp_path / "wedged.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    try:
        with pytest.raises(TimeoutError, match="did not answer daemon.status within 0.2 s"):
            Client(path, timeout=0.2).call("daemon.status")
        monkeypatch.setattr(hdslb_ctl, "Client", lambda p, timeout=5: Client(p, timeout=0.2))
        rc = hdslb_ctl.main(["--ctl-socket", path, "up", "nonexistent0"])
    finally:
        listener.close()
    err = capsys.readouterr().err
    assert rc == 1 and "did not answer" in err and "Traceback" not in err


def test_hdslb_ctl_up_passes_every_hdslbd_option_on_as_given(tmp_path, monkeypatch, capsys):
    """`hdslb-ctl up` takes each of hdslbd's options (one list: add_daemon_options) and starts hdslbd with
    those given, so the daemon parses the same settings as if started by hand; options not given are left
    to hdslbd's defaults (and to the config file, which only fills what the command line leaves out)."""
    from cli import hdslb_ctl
    from hdslb import daemon

    given = ["eth7", "eth8", "-f", str(tmp_path / "x.conf"), "--config-id", "lb2", "--xdp-mode", "native",
             "--instance", "i1",
             "--pin-root", "/sys/fs/bpf/x", "--max-conns", "1048576", "--max-conns6", "4096", "--conn-table", "shared",
             "--max-hash-cells", "4096", "--max-services", "16", "--max-dests", "64", "--max-persist", "128",
             "--lport-range", "2000-3000", "--log-level", "debug", "--fresh", "--state-dir", str(tmp_path / "st"),
             "--aging-interval", "0.5", "--api-listen", "off", "--api-token-file", str(tmp_path / "tok"),
             "--no-slowpath"]
    every = {a.dest for a in daemon.build_parser()._actions if a.option_strings} - {"help", "version", "ctl_socket", "slowpath"}
    named = {a.dest for a in daemon.build_parser()._actions for o in a.option_strings if o in given}
    assert named == every, f"options this test does not give: {every - named}"  # a new option joins the test

    started = exited_popen(monkeypatch, hdslb_ctl)
    sock = str(tmp_path / "none.sock")
    log = str(tmp_path / "d.log")
    assert hdslb_ctl.main(["--ctl-socket", sock, "up", "--log-file", log, *given]) == 1
    assert "hdslbd exited with status 3" in capsys.readouterr().err
    argv = started[-1]
    assert argv[1:3] == ["-m", "hdslb.daemon"]
    assert vars(daemon.build_parser().parse_args(argv[3:])) == \
        vars(daemon.build_parser().parse_args(["--ctl-socket", sock, *given]))

    # nothing but an interface: hdslbd sees its own defaults, not hdslb-ctl's
    hdslb_ctl.main(["--ctl-socket", sock, "up", "--log-file", log, "eth7"])
    assert started[-1][3:] == ["eth7", "--ctl-socket", sock]


def test_hdslb_ctl_up_serves_the_socket_the_config_names(tmp_path, monkeypatch, capsys):
    """`hdslb-ctl up -f FILE` whose FILE names its control socket (ctrl_defs { ipc_msg { unix_domain PATH } }) starts
    hdslbd on that socket, as `hdslbd -f FILE` does: up always passed its own resolved socket (the default, else
    $HDSLB_CTRL) as --ctl-socket, which beat the file's, so the socket the README says acts was silently ignored.
    --ctl-socket on up's command line still wins; a file that names none leaves $HDSLB_CTRL and the default."""
    from cli import hdslb_ctl

    started = exited_popen(monkeypatch, hdslb_ctl)
    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    named = str(tmp_path / "named.sock")
    conf = tmp_path / "lb.conf"
    conf.write_text(f"ctrl_defs {{\n  ipc_msg {{\n    <init> unix_domain {named}\n  }}\n}}\n")
    log = str(tmp_path / "d.log")

    def ctl_of(argv):
        assert hdslb_ctl.main(argv) == 1
        a = started[-1]
        return a[a.index("--ctl-socket") + 1]

    assert ctl_of(["up", "--log-file", log, "-f", str(conf), "eth7"]) == named
    monkeypatch.setenv("HDSLB_CTRL", str(tmp_path / "env.sock"))
    assert ctl_of(["up", "--log-file", log, "-f", str(conf), "eth7"]) == named
    assert ctl_of(["--ctl-socket", str(tmp_path / "cli.sock"), "up", "--log-file", log, "-f", str(conf), "eth7"]) == \
        str(tmp_path / "cli.sock")
    conf.write_text("neigh_defs {\n  timeout 30\n}\n")
    assert ctl_of(["up", "--log-file", log, "-f", str(conf), "eth7"]) == str(tmp_path / "env.sock")
    conf.write_text("neigh_defs {\n")  # broken: hdslbd refuses it, naming the line; up does not guess a socket
    assert ctl_of(["up", "--log-file", log, "-f", str(conf), "eth7"]) == str(tmp_path / "env.sock")
    capsys.readouterr()


def test_a_failed_up_shows_the_lines_hdslbd_wrote_to_the_configs_log_file(tmp_path, monkeypatch, capsys):
    """hdslbd logs to the file's global_defs log_file; what up redirects (--log-file, /run/hdslb/<instance>.log)
    then holds nothing of a refused start, and up printed 'last lines it wrote to …:' followed by nothing: the
    reason (a refused virtual_server, an interface running another program) was only in the other file."""
    from cli import hdslb_ctl

    daemon_log = tmp_path / "hdslb.log"
    daemon_log.write_text("an earlier run's line\n")
    conf = tmp_path / "lb.conf"
    conf.write_text(f"global_defs {{\n    log_file {daemon_log}\n}}\n")

    class Refused:
        returncode = 1

        def __init__(self, argv, **kw):
            with open(daemon_log, "a") as f:
                f.write("ERROR hdslb: lb.conf:9:1: service.add 10.0.0.1: refused\n")

        def poll(self):
            return 1

    monkeypatch.setattr(hdslb_ctl.subprocess, "Popen", Refused)
    rc = hdslb_ctl.main(["--ctl-socket", str(tmp_path / "s.sock"), "up", "--log-file", str(tmp_path / "out.log"),
                         "-f", str(conf), "eth7"])
    err = capsys.readouterr().err
    assert rc == 1 and f"last lines it wrote to {daemon_log}:" in err and "lb.conf:9:1: service.add" in err
    assert "an earlier run's line" not in err


def test_check_judges_the_file_at_hdslbds_limits(tmp_path, capsys):
    """check dry-ran the file on a model of a million services and 16M real servers, so a file past hdslbd's
    default --max-services (4096) or --max-dests was 'OK' and the start that followed (the unit's ExecStartPre
    then ExecStart) was refused. check now uses hdslbd's defaults and takes the same two options."""
    from cli import hdslb_ctl

    conf = tmp_path / "many.conf"
    conf.write_text("".join(f"virtual_server 10.0.{i // 250}.{i % 250 + 1} 80 {{\n lb_kind DR\n"
                            f" real_server 10.1.0.1 80 {{\n }}\n}}\n" for i in range(5)))
    assert hdslb_ctl.main(["check", "-f", str(conf), "--max-services", "4"]) == 1
    err = capsys.readouterr().err
    assert f"{conf}:21:1: service.add 10.0.0.5: no free service id (limit 4" in err
    assert hdslb_ctl.main(["check", "-f", str(conf), "--max-services", "5"]) == 0
    assert hdslb_ctl.main(["check", "-f", str(conf), "--max-dests", "4"]) == 1
    assert "--max-dests" in capsys.readouterr().err
    from hdslb.daemon import DEFAULT_MAX_DESTS, DEFAULT_MAX_SERVICES

    args = hdslb_ctl.build_parser().parse_args(["check", "-f", str(conf)])
    assert (args.max_services, args.max_dests) == (DEFAULT_MAX_SERVICES, DEFAULT_MAX_DESTS)


def test_status_shows_the_slow_path_against_its_bounds():
    from cli.hdslb_ctl import slowpath_line

    assert slowpath_line(None).startswith("off")
    line = slowpath_line({"sockets": {"eth0/0": {}, "eth0/1": {}},
                          "counters": {"neigh_table_full": 3, "arp_reply": 9},
                          "neigh": {"entries": 12, "learned": 10, "gc_thresh3": 8192, "unres_bytes": 0,
                                    "unres_qbytes": 8388608}})
    assert line == ("2 AF_XDP socket(s); 12 neighbours (10 learned, at most 8192); 0 of 8388608 bytes queued for "
                    "unresolved next hops; neigh_table_full 3")


def test_status_names_the_instance_its_pins_and_saved_model_so_down_can_tell_it_is_the_one_named(tmp_path):
    """hdslb-ctl down compares --instance/--pin-root/--state-dir with what the answering hdslbd reports."""
    import argparse

    from cli import hdslb_ctl
    from hdslb.balancer import Balancer
    from hdslb.ctl import commands
    from hdslb.daemon import Daemon, settings_from_args

    from .test_balancer import Recorder
    from .test_batch import IFACES

    d = Daemon(settings_from_args(["eth0", "--instance", "lb5", "--state-dir", str(tmp_path / "state"),
                                   "--pin-root", str(tmp_path / "bpffs")]))
    d.bal = Balancer(Recorder(), dict(IFACES), max_services=16, max_dests=64)
    st = commands.dispatch(d, "daemon.status", {})
    assert (st["instance"], st["pin_dir"], st["state_file"]) == (
        "lb5", str(tmp_path / "bpffs" / "lb5"), str(tmp_path / "state" / "lb5.state"))

    def ns(**kw):
        return argparse.Namespace(**{"instance": None, "pin_root": None, "state_dir": None, **kw})

    assert hdslb_ctl._not_this_daemon(ns(instance="lb5", pin_root=str(tmp_path / "bpffs"),
                                         state_dir=str(tmp_path / "state")), st) is None
    assert hdslb_ctl._not_this_daemon(ns(instance="lb6"), st) == "--instance lb6, but it serves instance lb5"
    assert "but its pins are in" in hdslb_ctl._not_this_daemon(ns(pin_root=str(tmp_path)), st)


def test_a_plain_down_stops_a_daemon_started_with_its_own_pin_root_and_state_dir(tmp_path):
    """Only the options `down` is given are held against the answering hdslbd: the parser's defaults (the default
    pin root and state directory, for the no-daemon case) made a plain `hdslb-ctl down` refuse every daemon started
    with --state-dir or --pin-root ("nothing was stopped"): make bench's peers were left running, and the next
    peer measured through them."""
    from cli import hdslb_ctl
    from hdslb.balancer import Balancer
    from hdslb.ctl import commands
    from hdslb.daemon import Daemon, settings_from_args

    from .test_balancer import Recorder
    from .test_batch import IFACES

    d = Daemon(settings_from_args(["eth0", "--state-dir", str(tmp_path / "state"), "--pin-root",
                                   str(tmp_path / "bpffs")]))
    d.bal = Balancer(Recorder(), dict(IFACES), max_services=16, max_dests=64)
    st = commands.dispatch(d, "daemon.status", {})
    parse = hdslb_ctl.build_parser().parse_args
    assert hdslb_ctl._not_this_daemon(parse(["down"]), st) is None
    assert hdslb_ctl._not_this_daemon(parse(["down", "--state-dir", str(tmp_path / "state")]), st) is None
    assert "but its saved model is" in hdslb_ctl._not_this_daemon(parse(["down", "--state-dir", "/run/x"]), st)
    assert "but its pins are in" in hdslb_ctl._not_this_daemon(parse(["down", "--pin-root", "/run/y"]), st)


def test_a_failed_up_shows_only_what_this_start_wrote_to_a_reused_log(tmp_path, monkeypatch, capsys):
    """`up --log-file` appends: the lines shown when hdslbd exits at once were the file's last 15, so an earlier
    run's errors (three "lb1 already runs XDP program") stood above this start's "no such interface"."""
    from cli import hdslb_ctl

    log = tmp_path / "d.log"
    log.write_text("".join(f"old run: lb1 already runs XDP program {i}\n" for i in range(3)))

    class Exits:
        returncode = 1

        def __init__(self, argv, stdout=None, **kw):
            stdout.write(b"hdslbd ERROR hdslb: no such interface: nosuch0\n")
            stdout.flush()

        def poll(self):
            return 1

    monkeypatch.setattr(hdslb_ctl.subprocess, "Popen", Exits)
    assert hdslb_ctl.main(["--ctl-socket", str(tmp_path / "none.sock"), "up", "--log-file", str(log), "nosuch0"]) == 1
    err = capsys.readouterr().err
    assert err.endswith("hdslbd ERROR hdslb: no such interface: nosuch0\n")
    assert "old run" not in err and "hdslbd exited with status 1" in err
    assert "old run: lb1 already runs XDP program 2" in log.read_text()  # the file keeps them

    log.write_text("")  # truncated meanwhile (logrotate's copytruncate): what is there is this start's
    assert hdslb_ctl._log_since(str(log), 1000) == []
    log.write_text("a\nb\n")
    assert hdslb_ctl._log_since(str(log), 100) == ["a\n", "b\n"] and hdslb_ctl._log_since(str(log), 2) == ["b\n"]


@pytest.mark.parametrize("argv", [
    ["--ctl-socket={sock}", "status"],
    ["status", "--ctl-socket={sock}"],
    ["status", "--ctl-socket", "{sock}"],
    ["--ctl-socket", "{sock}", "status"],
])
def test_hdslb_ctl_ctl_socket_equals_form_reaches_the_socket_named(argv, tmp_path, monkeypatch, capsys):
    """`--ctl-socket=PATH`, which ipvsadm and dpip take (argparse's own spelling too), must select that socket
    anywhere on the line. Before, `hdslb-ctl --ctl-socket=PATH down` parsed it and then dropped it for the
    default socket: it stopped whichever instance /var/run/hdslb_ctrl serves; after the subcommand it was an
    'unrecognized arguments' error."""
    from cli import hdslb_ctl

    sock = str(tmp_path / "b.sock")
    seen = []

    class FakeClient:
        def __init__(self, path, timeout=None):
            seen.append(path)

        def call(self, op, args=None):
            raise DaemonUnreachable(f"cannot reach hdslbd at {seen[-1]}")

    monkeypatch.delenv(protocol.ENV_CTL_SOCKET, raising=False)
    monkeypatch.setattr(hdslb_ctl, "Client", FakeClient)
    rc = hdslb_ctl.main([a.format(sock=sock) for a in argv])
    assert rc == 3 and seen == [sock], capsys.readouterr().err


def test_hdslb_ctl_ctl_socket_equals_empty_is_a_usage_error(capsys):
    from cli import hdslb_ctl

    assert hdslb_ctl.main(["--ctl-socket=", "status"]) == 2
    assert "--ctl-socket needs a path" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["health", "add", "-t", "10.0.0.1:80", "-u", "10.0.0.1:53", "-r", "10.0.0.2"], "one of -t and -u"),
    (["health", "del", "-t", "10.0.0.1:80", "-u", "10.0.0.1:53", "-r", "10.0.0.2"], "one of -t and -u"),
    (["health", "show", "-t", "10.0.0.1:80"], "health show takes no -t"),
    (["health", "show", "-r", "10.0.0.2"], "health show takes no -r"),
    (["health", "show", "--kind", "HTTP_GET"], "health show takes no --kind"),
    (["health", "show", "connect_timeout=1"], "health show takes no KEY=VALUE"),
    (["health", "del", "-t", "10.0.0.1:80", "-r", "10.0.0.2", "--kind", "HTTP_GET"], "health del takes no --kind"),
    (["health", "del", "-t", "10.0.0.1:80", "-r", "10.0.0.2", "--delay-loop", "3"], "health del takes no --delay-loop"),
    (["health", "del", "-t", "10.0.0.1:80", "-r", "10.0.0.2", "--inhibit"], "health del takes no --inhibit"),
])
def test_health_options_a_command_does_not_use_are_refused(argv, message, monkeypatch, capsys):
    """What `health show` or `health del` cannot act on is refused (exit 2, nothing sent), as ipvsadm refuses an
    option its command does not take: `health show -t VIP` looked like a filter and listed everything, `health
    del … --kind HTTP_GET` like deleting that kind only (del removes the server's check.add check whatever its
    kind), and -t with -u silently used -t."""
    from cli import hdslb_ctl

    monkeypatch.setattr(hdslb_ctl, "Client", lambda *a, **k: pytest.fail("nothing may be sent"))
    assert hdslb_ctl.main(argv) == 2
    assert message in capsys.readouterr().err


def test_health_add_defaults_still_apply(monkeypatch, capsys):
    from cli import hdslb_ctl

    sent = []

    class FakeClient:
        def __init__(self, *a, **k):
            pass

        def call(self, op, args=None):
            sent.append((op, args))
            return {"key": "k"}

    monkeypatch.setattr(hdslb_ctl, "Client", FakeClient)
    assert hdslb_ctl.main(["health", "add", "-t", "10.0.0.1:80", "-r", "10.0.0.2:80"]) == 0
    assert sent[0][1]["kind"] == "TCP_CHECK" and sent[0][1]["delay_loop"] == 6
    assert hdslb_ctl.main(["health", "del", "-t", "10.0.0.1:80", "-r", "10.0.0.2:80"]) == 0
    assert sent[1] == ("check.del", {"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": 80},
                                     "addr": "10.0.0.2", "port": 80})
    # a UDP service's check is a UDP_CHECK unless --kind says otherwise: a TCP_CHECK of a UDP-only server (DNS) is
    # refused by every healthy one, and took them all out of rotation
    assert hdslb_ctl.main(["health", "add", "-u", "10.0.0.1:53", "-r", "10.0.0.2:53"]) == 0
    assert sent[2][1]["kind"] == "UDP_CHECK"
    assert hdslb_ctl.main(["health", "add", "-u", "10.0.0.1:53", "-r", "10.0.0.2:53", "--kind", "TCP_CHECK"]) == 0
    assert sent[3][1]["kind"] == "TCP_CHECK"


def test_hdslb_ctl_up_logs_to_the_instance_named(tmp_path, monkeypatch, capsys):
    """The default log is /run/hdslb/<instance>.log (README): with --instance, that instance's name, not the one
    the control socket's name would give (two instances whose sockets share a base name wrote into one log)."""
    from cli import hdslb_ctl

    logs = []

    class Proc:
        returncode = 1

        def __init__(self, argv, stdout=None, **kw):
            logs.append(stdout.name)

        def poll(self):
            return 1

    monkeypatch.setattr(hdslb_ctl.subprocess, "Popen", Proc)
    monkeypatch.setattr(hdslb_ctl, "Client", lambda *a, **k: type("C", (), {
        "call": lambda self, op, args=None: (_ for _ in ()).throw(DaemonUnreachable("no"))})())
    monkeypatch.setattr(hdslb_ctl, "RUN_DIR", str(tmp_path))
    hdslb_ctl.main(["--ctl-socket", str(tmp_path / "a" / "ctl"), "up", "eth9", "--instance", "blue"])
    hdslb_ctl.main(["--ctl-socket", str(tmp_path / "a" / "ctl"), "up", "eth9"])
    hdslb_ctl.main(["--ctl-socket", str(tmp_path / "a" / "ctl"), "up", "eth9", "--instance", "../x"])
    assert logs == [str(tmp_path / "blue.log"), str(tmp_path / "ctl.log"), str(tmp_path / "ctl.log")]


def test_hdslb_ctl_up_says_why_hdslbd_refused_its_options_and_exits_2(tmp_path, monkeypatch, capsys):
    """An option hdslbd refuses (a range up's parser does not know) made up exit 1 and print hdslbd's whole usage
    text above the one line that says why; it prints that line and exits 2, as a bad command does."""
    from cli import hdslb_ctl

    class Refused:
        returncode = 2

        def __init__(self, argv, stdout=None, **kw):
            stdout.write(b"usage: hdslbd [-h] [--ctl-socket CTL_SOCKET]\n              [IFACE ...]\n"
                         b"hdslbd: error: --max-conns must be at least 256\n")
            stdout.flush()

        def poll(self):
            return 2

    monkeypatch.setattr(hdslb_ctl.subprocess, "Popen", Refused)
    rc = hdslb_ctl.main(["--ctl-socket", str(tmp_path / "none.sock"), "up", "lo", "--max-conns", "0",
                         "--log-file", str(tmp_path / "d.log")])
    err = capsys.readouterr().err
    assert rc == 2 and err == "hdslbd: error: --max-conns must be at least 256\n", (rc, err)


def test_check_takes_hdslbds_hash_cells_and_refuses_limits_hdslbd_refuses(tmp_path, capsys):
    """The unit runs `check` before `hdslbd`, given the same limits. check had no --max-hash-cells, so a file whose
    mh tables do not fit hdslbd's --max-hash-cells was OK and its start refused; and it took limits hdslbd refuses
    (--max-services 0, -5, 100000000: every file OK or every service refused, nothing said about the option)."""
    from cli import hdslb_ctl

    conf = tmp_path / "mh.conf"
    conf.write_text("virtual_server 10.0.0.1 80 {\n lb_algo mh\n lb_kind DR\n real_server 10.1.0.1 80 {\n }\n}\n")
    assert hdslb_ctl.main(["check", "-f", str(conf)]) == 0
    capsys.readouterr()
    assert hdslb_ctl.main(["check", "-f", str(conf), "--max-hash-cells", "1024"]) == 1
    assert f"{conf}:1:1: service.add 10.0.0.1: mh: table size 65537 exceeds" in capsys.readouterr().err
    for argv in (["--max-services", "0"], ["--max-services", "100000000"], ["--max-dests", "-5"],
                 ["--max-hash-cells", "10"]):
        with pytest.raises(SystemExit) as e:
            hdslb_ctl.main(["check", "-f", str(conf), *argv])
        assert e.value.code == 2
        assert f"argument {argv[0]}: must be within" in capsys.readouterr().err, argv


def test_ctrl_c_while_up_waits_says_the_daemon_goes_on_starting(tmp_path, monkeypatch, capsys):
    """Ctrl-C on `hdslb-ctl up` while it waited for hdslbd (a compile takes seconds) printed a KeyboardInterrupt
    traceback, and nothing said that the daemon, in a session of its own, went on starting and attaching. It now
    says so in one line (the pid, the log, how to stop it) and exits 130, as a shell reports SIGINT; the other
    commands end on Ctrl-C in one line as well."""
    from cli import hdslb_ctl

    class Starting:
        pid, returncode = 4242, None

        def __init__(self, argv, **kw):
            pass

        def poll(self):
            return None

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(hdslb_ctl.subprocess, "Popen", Starting)
    monkeypatch.setattr(hdslb_ctl.time, "sleep", interrupted)
    log = str(tmp_path / "d.log")
    assert hdslb_ctl.main(["--ctl-socket", str(tmp_path / "none.sock"), "up", "--log-file", log, "eth7"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "hdslbd pid 4242" in err and log in err and "hdslb-ctl down" in err, err

    def status_interrupted(ns):
        raise KeyboardInterrupt

    monkeypatch.setattr(hdslb_ctl, "cmd_status", status_interrupted)
    assert hdslb_ctl.main(["--ctl-socket", str(tmp_path / "none.sock"), "status"]) == 130
    assert capsys.readouterr().err == "hdslb-ctl: interrupted\n"


def test_up_takes_a_log_file_in_the_working_directory(tmp_path, monkeypatch, capsys):
    """`hdslb-ctl up eth0 --log-file up.log` failed before starting anything with "[Errno 2] No such file or
    directory: ''" (the directory of a bare file name is '', which makedirs refuses). The log is made in the working
    directory, and named by its absolute path."""
    from cli import hdslb_ctl

    exited_popen(monkeypatch, hdslb_ctl)
    monkeypatch.chdir(tmp_path)
    assert hdslb_ctl.main(["--ctl-socket", str(tmp_path / "none.sock"), "up", "--log-file", "up.log", "eth7"]) == 1
    err = capsys.readouterr().err
    assert f"hdslbd exited with status 3; last lines it wrote to {tmp_path / 'up.log'}" in err, err
    assert (tmp_path / "up.log").exists()


def answer_status(monkeypatch, hdslb_ctl, st: dict) -> None:
    """hdslb-ctl's client answers daemon.status with st (a dict the test may change between calls), nothing else."""
    class Fake:
        def __init__(self, path, timeout=None):
            pass

        def call(self, op, args=None):
            if op == "daemon.status":
                return st
            raise DaemonUnreachable("gone")

    monkeypatch.setattr(hdslb_ctl, "Client", Fake)


def test_status_says_a_daemon_that_is_still_starting_is_not_ready(monkeypatch, capsys):
    """The control socket answers before the start has finished (the config file, the REST API and the health checks
    come after it): `status` looked the same as for a running instance, so a script waiting on `hdslb-ctl status`
    went on before the file's services were there. It says the daemon is starting until it is ready (up waits for
    that)."""
    from cli import hdslb_ctl

    st = {"version": "0.1.0", "pid": 42, "uptime_s": 1.0, "ctl_socket": "/x", "pin_dir": "/p/x",
          "interfaces": {"eth0": "native"}, "services": 0, "ready": False}

    answer_status(monkeypatch, hdslb_ctl, st)
    assert hdslb_ctl.main(["status"]) == 0
    assert "starting" in capsys.readouterr().out
    st["ready"] = True
    assert hdslb_ctl.main(["status"]) == 0
    assert "starting" not in capsys.readouterr().out


def test_status_names_local_addresses_kept_for_their_connections(monkeypatch, capsys):
    """A local address taken out of every service stays the balancer's while connections use it (then is let go,
    logged); nothing showed it meanwhile (ipvsadm -G lists services' addresses, dpip addr show the interfaces'):
    `status` names them, at most 8 then a count."""
    from cli import hdslb_ctl

    st = {"version": "0.1.0", "pid": 42, "uptime_s": 1.0, "ctl_socket": "/x", "pin_dir": "/p/x",
          "interfaces": {"eth0": "native"}, "services": 1, "retired_laddrs": []}

    answer_status(monkeypatch, hdslb_ctl, st)
    assert hdslb_ctl.main(["status"]) == 0
    assert "kept for their connections" not in capsys.readouterr().out
    st["retired_laddrs"] = [f"192.168.100.{i}" for i in range(200, 210)]
    assert hdslb_ctl.main(["status"]) == 0
    assert ("  local addresses kept for their connections (no service has them): 192.168.100.200, 192.168.100.201, "
            "192.168.100.202, 192.168.100.203, 192.168.100.204, 192.168.100.205, 192.168.100.206, 192.168.100.207 "
            "and 2 more\n") in capsys.readouterr().out


def test_status_shows_the_conn_table_kind_auto_picked(monkeypatch, capsys):
    """--conn-table auto (the default) picks the kind by the possible CPUs: status says which, and why."""
    from cli import hdslb_ctl

    st = {"version": "0.1.0", "pid": 42, "uptime_s": 1.0, "ctl_socket": "/x", "pin_dir": "/p/x",
          "interfaces": {"eth0": "native"}, "services": 1,
          "conn_table": {"kind": "shared", "auto_cpus": 64, "size": 262144, "size6": 65536}}
    answer_status(monkeypatch, hdslb_ctl, st)
    assert hdslb_ctl.main(["status"]) == 0
    assert "  conn table:     shared (auto: 64 possible CPUs), 262144 IPv4 + 65536 IPv6 entries\n" in capsys.readouterr().out
    st["conn_table"] = {"kind": "percpu", "auto_cpus": None, "size": 262144, "size6": 65536}  # asked for
    assert hdslb_ctl.main(["status"]) == 0
    assert "  conn table:     percpu, 262144 IPv4 + 65536 IPv6 entries\n" in capsys.readouterr().out


async def test_daemon_status_says_what_auto_picked_the_conn_table_by(tmp_path):
    from tests.unit.test_fuzz_input import dispatch_async, make_daemon

    d = await make_daemon(tmp_path)
    try:
        d.settings.conn_table_auto_cpus = 64
        assert (await dispatch_async(d, "daemon.status", {}))["conn_table"]["auto_cpus"] == 64
        d.settings.conn_table_auto_cpus = None
        assert (await dispatch_async(d, "daemon.status", {}))["conn_table"]["auto_cpus"] is None
    finally:
        if d.health is not None:
            await d.health.stop()


async def test_daemon_status_lists_a_local_address_kept_for_its_connections(tmp_path):
    """What the status line above reads: `ipvsadm --del-laddr` of a service's only local address (its flows may
    still use it) leaves it listed by daemon.status until the sweep finds none."""
    from hdslb.ctl import commands
    from tests.unit.test_fuzz_input import SVC, dispatch_async, make_daemon

    d = await make_daemon(tmp_path)
    try:
        assert (await dispatch_async(d, "daemon.status", {}))["retired_laddrs"] == []
        commands.dispatch(d, "laddr.del", {"svc": SVC, "addr": "192.168.100.200"})
        assert (await dispatch_async(d, "daemon.status", {}))["retired_laddrs"] == ["192.168.100.200"]
        d.bal.release_laddrs(set())
        assert (await dispatch_async(d, "daemon.status", {}))["retired_laddrs"] == []
    finally:
        if d.health is not None:
            await d.health.stop()


def test_health_alone_shows_the_checks(monkeypatch, capsys):
    """`hdslb-ctl health` alone said "the following arguments are required: action, KEY=VALUE" (KEY=VALUE is
    optional); as ipvsadm alone lists, it shows."""
    from cli import hdslb_ctl

    sent = []

    class FakeClient:
        def __init__(self, *a, **k):
            pass

        def call(self, op, args=None):
            sent.append(op)
            return {"health": {}}

    monkeypatch.setattr(hdslb_ctl, "Client", FakeClient)
    assert hdslb_ctl.main(["health"]) == 0 and sent == ["health.list"]
    assert hdslb_ctl.main(["health", "-t", "10.0.0.1:80"]) == 2
    assert "health show takes no -t" in capsys.readouterr().err
