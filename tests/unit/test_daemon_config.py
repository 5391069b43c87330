"""How hdslbd resolves its settings: socket, instance, pin directory, ranges."""

import pytest

from hdslb.daemon import arp_frame, instance_name, parse_lport_range, settings_from_args


def test_defaults(monkeypatch):
    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    s = settings_from_args(["eth0"])
    assert s.ctl_socket == "/var/run/hdslb_ctrl"
    assert s.instance == "hdslb_ctrl"
    assert s.pin_dir == "/run/hdslb/bpffs/hdslb_ctrl"
    assert (s.lport_min, s.lport_max) == (1025, 65535)
    assert s.xdp_mode == "auto"


def test_slow_path_is_on_unless_refused(monkeypatch):
    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    assert settings_from_args(["eth0"]).slowpath is True
    assert settings_from_args(["eth0", "--slowpath"]).slowpath is True
    assert settings_from_args(["eth0", "--no-slowpath"]).slowpath is False
    assert settings_from_args(["eth0", "--slowpath", "--no-slowpath"]).slowpath is False


def test_env_and_flags_select_the_instance(monkeypatch):
    monkeypatch.setenv("HDSLB_CTRL", "/run/hdslb/lab1.ctrl")
    s = settings_from_args(["veth-lb0", "--xdp-mode", "native"])
    assert (s.ctl_socket, s.instance, s.xdp_mode) == ("/run/hdslb/lab1.ctrl", "lab1", "native")
    s = settings_from_args(["a", "b", "--ctl-socket", "/tmp/x.sock", "--pin-root", "/mnt/bpf", "--instance", "blue"])
    assert s.interfaces == ["a", "b"] and s.ctl_socket == "/tmp/x.sock" and s.pin_dir == "/mnt/bpf/blue"


@pytest.mark.parametrize("argv", [[], ["eth0", "--lport-range", "5-2"], ["eth0", "--lport-range", "x"],
                                  ["eth0", "--xdp-mode", "turbo"], ["eth0", "--max-conns", "10"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        settings_from_args(argv)
    assert e.value.code == 2


def test_instance_name_is_path_safe():
    assert instance_name("/var/run/hdslb_ctrl") == "hdslb_ctrl"
    assert instance_name("/run/a b.sock") == "a_b"


def test_lport_range():
    assert parse_lport_range("1024-2048") == (1024, 2048)
    with pytest.raises(ValueError):
        parse_lport_range("0-10")


def test_arp_request_layout():
    f = arp_frame(1, bytes.fromhex("020000000001"), "10.0.0.1", b"\xff" * 6, "10.0.0.2")
    assert len(f) == 42 and f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x01"
    assert f[28:32] == bytes([10, 0, 0, 1]) and f[38:42] == bytes([10, 0, 0, 2])


def test_config_file_supplies_interfaces_socket_and_table_size(tmp_path, monkeypatch):
    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    conf = tmp_path / "lb.conf"
    conf.write_text("netif_defs {\n  <init> device eth7 {\n  }\n}\n"
                    "ctrl_defs {\n  ipc_msg {\n    <init> unix_domain /run/hdslb/x.ctrl\n  }\n}\n"
                    "ipvs_defs {\n  conn {\n    <init> conn_pool_size 4096\n  }\n}\n")
    s = settings_from_args(["-f", str(conf)])
    assert (s.interfaces, s.ctl_socket, s.max_conns) == (["eth7"], "/run/hdslb/x.ctrl", 4096)
    s = settings_from_args(["-f", str(conf), "eth1", "--ctl-socket", "/tmp/y"])
    assert (s.interfaces, s.ctl_socket) == (["eth1"], "/tmp/y")
    # the command line wins, also when it names the built-in default (it used to lose to the file then)
    assert settings_from_args(["-f", str(conf), "--max-conns", "262144"]).max_conns == 262144
    assert settings_from_args(["eth0"]).max_conns == 262144


def test_hdslb_ctrl_selects_the_socket_when_the_file_names_none(tmp_path, monkeypatch):
    """$HDSLB_CTRL selects the instance of `hdslbd -f FILE` whose file has no `unix_domain`: unix_domain's default
    used to stand over it, so hdslbd served /var/run/hdslb_ctrl (another instance's socket and pins) while every
    tool given the same environment talked to the socket it named. A file that names its socket still wins over
    the environment, the command line over both."""
    conf = tmp_path / "lb.conf"
    conf.write_text("netif_defs {\n  <init> device eth7 {\n  }\n}\n")
    monkeypatch.setenv("HDSLB_CTRL", "/run/hdslb/blue.ctrl")
    s = settings_from_args(["-f", str(conf)])
    assert (s.ctl_socket, s.instance) == ("/run/hdslb/blue.ctrl", "blue")
    monkeypatch.delenv("HDSLB_CTRL")
    assert settings_from_args(["-f", str(conf)]).ctl_socket == "/var/run/hdslb_ctrl"
    conf.write_text("netif_defs {\n  <init> device eth7 {\n  }\n}\n"
                    "ctrl_defs {\n  ipc_msg {\n    <init> unix_domain /run/hdslb/x.ctrl\n  }\n}\n")
    monkeypatch.setenv("HDSLB_CTRL", "/run/hdslb/blue.ctrl")
    assert settings_from_args(["-f", str(conf)]).ctl_socket == "/run/hdslb/x.ctrl"
    assert settings_from_args(["-f", str(conf), "--ctl-socket", "/tmp/y"]).ctl_socket == "/tmp/y"


def test_a_log_file_that_cannot_be_opened_exits_2_naming_the_line(tmp_path, capsys):
    """global_defs log_file in a directory that does not exist (or is not writable): hdslbd used to die in
    logging.basicConfig with a Python traceback and no line, while a reload of the same file names the line and
    refuses it. Now the start is refused the same way, before anything is attached."""
    conf = tmp_path / "lb.conf"
    conf.write_text(f"global_defs {{\n    log_file {tmp_path}/no/such/dir/hdslb.log\n}}\n")
    with pytest.raises(SystemExit) as e:
        settings_from_args(["-f", str(conf), "eth0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{conf}:2:" in err and "log_file: cannot open" in err and "Traceback" not in err
    conf.write_text(f"global_defs {{\n    log_file {tmp_path}/hdslb.log\n}}\n")
    assert settings_from_args(["-f", str(conf), "eth0"]).log_file == f"{tmp_path}/hdslb.log"


def test_conn_table_kind_from_the_command_line_or_the_config(tmp_path, capsys, monkeypatch):
    """--conn-table picks the conn map's values (per CPU, the default on this many CPUs, or one shared); the
    config's conn_table supplies it when the command line does not, and a bad value is refused with the line."""
    from hdslb.fastpath import loader

    monkeypatch.setattr(loader, "possible_cpus", lambda: 2)
    assert settings_from_args(["eth0"]).conn_table == "percpu"
    assert settings_from_args(["eth0", "--conn-table", "shared"]).conn_table == "shared"
    conf = tmp_path / "lb.conf"
    conf.write_text("ipvs_defs {\n  conn {\n    <init> conn_table shared\n  }\n}\n")
    assert settings_from_args(["-f", str(conf), "eth0"]).conn_table == "shared"
    assert settings_from_args(["-f", str(conf), "eth0", "--conn-table", "percpu"]).conn_table == "percpu"
    with pytest.raises(SystemExit) as e:
        settings_from_args(["eth0", "--conn-table", "mine"])
    assert e.value.code == 2 and "--conn-table" in capsys.readouterr().err
    conf.write_text("ipvs_defs {\n  conn {\n    <init> conn_table everywhere\n  }\n}\n")
    with pytest.raises(SystemExit) as e:
        settings_from_args(["-f", str(conf), "eth0"])
    assert e.value.code == 2 and f"{conf}:3:" in capsys.readouterr().err


def test_the_daemon_sizes_its_conn_table_as_told(monkeypatch):
    from hdslb.daemon import Daemon
    from hdslb.fastpath import loader

    monkeypatch.setattr(loader, "possible_cpus", lambda: 2)

    assert Daemon(settings_from_args(["eth0", "--conn-table", "shared"])).sizes.conn_table == "shared"
    assert Daemon(settings_from_args(["eth0"])).sizes.conn_table == "percpu"
    d = Daemon(settings_from_args(["eth0", "--max-conns", "65536", "--max-conns6", "4096"]))
    assert (d.sizes.max_conns, d.sizes.conn6_entries()) == (65536, 4096)
    assert Daemon(settings_from_args(["eth0", "--max-conns", "65536"])).sizes.conn6_entries() == 16384


@pytest.mark.parametrize("ncpus,kind", [(1, "percpu"), (2, "percpu"), (4, "percpu"), (5, "shared"), (12, "shared"),
                                         (64, "shared"), (256, "shared")])
def test_auto_picks_the_conn_table_kind_by_the_possible_cpus(tmp_path, monkeypatch, ncpus, kind):
    """The per-CPU table is built for at most 4 possible CPUs (its program grows with the count: refused by the
    kernel from 7): with no --conn-table, hdslbd on most servers died in a verifier dump.
    auto, the default and the config's, is percpu up to 4 possible CPUs and shared above; the count auto went by
    is kept for the log and status; an explicit kind is taken as asked (auto_cpus None)."""
    from hdslb.daemon import Daemon
    from hdslb.fastpath import loader

    monkeypatch.setattr(loader, "possible_cpus", lambda: ncpus)
    for argv in (["eth0"], ["eth0", "--conn-table", "auto"]):
        s = settings_from_args(argv)
        assert (s.conn_table, s.conn_table_auto_cpus) == (kind, ncpus)
        assert Daemon(s).sizes.conn_table == kind
    conf = tmp_path / "lb.conf"
    for text in ("ipvs_defs {\n  conn {\n    conn_table auto\n  }\n}\n", "ipvs_defs {\n  conn {\n  }\n}\n"):
        conf.write_text(text)
        s = settings_from_args(["-f", str(conf), "eth0"])
        assert (s.conn_table, s.conn_table_auto_cpus) == (kind, ncpus)
    s = settings_from_args(["eth0", "--conn-table", "shared"])
    assert (s.conn_table, s.conn_table_auto_cpus) == ("shared", None)


def test_a_per_cpu_table_on_more_cpus_than_it_is_built_for_is_refused_before_the_start(tmp_path, monkeypatch,
                                                                                        capsys):
    """--conn-table percpu on 64 possible CPUs compiled, then died in a 1M-instruction verifier dump naming
    nothing an operator can act on. It is refused while the command line is read (exit 2, as hdslb-ctl up reports
    hdslbd's own refusals: its "hdslbd: " line), one line naming the CPU count, the limit and the shared table;
    from the config, naming its line; the command line's shared stands over the file's percpu."""
    from hdslb.fastpath import loader

    monkeypatch.setattr(loader, "possible_cpus", lambda: 64)
    monkeypatch.setattr(loader.FastPath, "load", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        settings_from_args(["eth0", "--conn-table", "percpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("hdslbd: --conn-table percpu: ")
    assert "64 possible CPUs" in err and "more than the 4" in err and "--conn-table shared" in err
    conf = tmp_path / "lb.conf"
    conf.write_text("ipvs_defs {\n  conn {\n    conn_table percpu\n  }\n}\n")
    with pytest.raises(SystemExit) as e:
        settings_from_args(["-f", str(conf), "eth0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"hdslbd: {conf}:3:5: conn_table percpu: this host has 64 possible")
    assert settings_from_args(["-f", str(conf), "eth0", "--conn-table", "shared"]).conn_table == "shared"
    monkeypatch.setattr(loader, "possible_cpus", lambda: 4)  # at the limit: taken
    assert settings_from_args(["eth0", "--conn-table", "percpu"]).conn_table == "percpu"


def test_check_says_which_table_auto_picks_and_refuses_a_per_cpu_one_on_too_many_cpus(tmp_path, monkeypatch, capsys):
    from cli import hdslb_ctl
    from hdslb.fastpath import loader

    monkeypatch.setattr(loader, "possible_cpus", lambda: 64)
    conf = tmp_path / "lb.conf"
    conf.write_text("ipvs_defs {\n  conn {\n    conn_pool_size 1048576\n  }\n}\n")
    assert hdslb_ctl.main(["check", "-f", str(conf)]) == 0
    assert ("connection tables: 1048576 IPv4 entries (conn_pool_size) + 262144 IPv6 (conn6_pool_size), shared (auto: "
            "64 possible CPUs): ~172 MiB of kernel memory\n") in capsys.readouterr().out
    conf.write_text("ipvs_defs {\n  conn {\n    conn_table percpu\n  }\n}\n")
    assert hdslb_ctl.main(["check", "-f", str(conf)]) == 1
    out = capsys.readouterr()
    assert out.err.startswith(f"{conf}:3:5: conn_table percpu: this host has 64 possible CPUs, more than the 4")
    assert "OK" not in out.out
    monkeypatch.setattr(loader, "possible_cpus", lambda: 2)
    assert hdslb_ctl.main(["check", "-f", str(conf)]) == 0
    assert "percpu: ~" in capsys.readouterr().out


def test_ipv6_table_size_from_the_command_line_or_the_config(tmp_path, capsys):
    """--max-conns6 / conn6_pool_size size the IPv6 and NAT64 table; the command line wins; out of range is
    refused (exit 2, the config's file:line)."""
    assert settings_from_args(["eth0"]).max_conns6 == 0  # a quarter of --max-conns
    conf = tmp_path / "c.conf"
    conf.write_text("ipvs_defs {\n  conn {\n    <init> conn6_pool_size 8192\n  }\n}\n")
    assert settings_from_args(["-f", str(conf), "eth0"]).max_conns6 == 8192
    assert settings_from_args(["-f", str(conf), "eth0", "--max-conns6", "1024"]).max_conns6 == 1024
    with pytest.raises(SystemExit) as e:
        settings_from_args(["eth0", "--max-conns6", "100"])
    assert e.value.code == 2 and "--max-conns6 must be at least 256" in capsys.readouterr().err
    conf.write_text("ipvs_defs {\n  conn {\n    <init> conn6_pool_size 10\n  }\n}\n")
    with pytest.raises(SystemExit) as e:
        settings_from_args(["-f", str(conf), "eth0"])
    assert e.value.code == 2 and f"{conf}:3:" in capsys.readouterr().err


def test_broken_config_exits_2_naming_the_line(tmp_path, capsys):
    conf = tmp_path / "bad.conf"
    conf.write_text("ipvs_defs {\n  conn {\n    conn_pool_size lots\n  }\n}\n")
    with pytest.raises(SystemExit) as e:
        settings_from_args(["-f", str(conf)])
    assert e.value.code == 2
    assert f"{conf}:3:" in capsys.readouterr().err


def test_sd_notify_speaks_to_systemd(tmp_path, monkeypatch):
    import socket as s

    from hdslb.daemon import sd_notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    path = str(tmp_path / "notify")
    with s.socket(s.AF_UNIX, s.SOCK_DGRAM) as srv:
        srv.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify("READY=1\nSTATUS=ok") is True
        assert srv.recv(100) == b"READY=1\nSTATUS=ok"


def test_systemd_unit_is_notify_and_reloads_with_sighup():
    from pathlib import Path

    unit = (Path(__file__).parents[2] / "conf" / "hdslb.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "hdslbd -f" in unit


def test_options_without_effect_are_reported_never_ignored(tmp_path):
    from hdslb.config import load
    from hdslb.config.apply import inactive_notices

    notices = inactive_notices(load(str(Path_conf())))
    text = "\n".join(notices)
    for kw in ("SYN proxy", "uoa_mode", "descriptor_number", "time_wait"):
        assert kw in text, kw
    for kw in ("default_ttl", "conn_pool_size"):  # these act
        assert f"{kw}: accepted, not acted on" not in text, kw


def Path_conf():
    from pathlib import Path

    return Path(__file__).parents[2] / "conf" / "hdslb.conf"


def test_global_defs_logging_applies(tmp_path):
    conf = tmp_path / "g.conf"
    conf.write_text(f"global_defs {{\n  log_level DEBUG\n  log_file {tmp_path}/d.log\n}}\n")
    s = settings_from_args(["-f", str(conf), "eth0"])
    assert (s.log_level, s.log_file) == ("debug", f"{tmp_path}/d.log")
    assert settings_from_args(["-f", str(conf), "eth0", "--log-level", "error"]).log_level == "error"


def test_check_block_renders_a_parsable_one_server_config():
    from hdslb.config import loads
    from hdslb.daemon import check_block

    svc = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
    text = check_block(svc, "192.168.100.2", 80, {"kind": "HTTP_GET", "delay_loop": 1, "inhibit_on_failure": True,
                                                   "params": {"connect_timeout": 1, "url": {"path": "/health", "status_code": 200}}})
    vs = loads(text, name="t").virtual_servers[0]
    rs = vs.real_servers[0]
    assert vs.delay_loop == 1 and rs.inhibit_on_failure and rs.checkers[0].url[0].path == "/health"


def test_check_block_carries_udp_reply_lengths():
    from hdslb.config import loads
    from hdslb.daemon import check_block

    svc = {"proto": "udp", "addr": "10.0.0.100", "port": 53}
    text = check_block(svc, "192.168.100.2", 53, {"kind": "UDP_CHECK", "params": {
        "payload": "01", "require_reply": "01", "min_reply_length": 12, "max_reply_length": 512}})
    [c] = loads(text, name="t").virtual_servers[0].real_servers[0].checkers
    assert (c.require_reply, c.min_reply_length, c.max_reply_length) == (b"\x01", 12, 512)


def test_check_block_without_a_kind_checks_the_services_protocol():
    """check.add without a kind: a TCP_CHECK for a TCP service, a UDP_CHECK for a UDP one (a TCP_CHECK of a UDP-only
    server is refused however healthy it is)."""
    from hdslb.config import loads
    from hdslb.daemon import check_block

    for proto, kind in (("tcp", "TCP_CHECK"), ("udp", "UDP_CHECK")):
        text = check_block({"proto": proto, "addr": "10.0.0.100", "port": 53}, "192.168.100.2", 53, {})
        assert [c.kind for c in loads(text, name="t").virtual_servers[0].real_servers[0].checkers] == [kind]


@pytest.mark.parametrize("a", [
    {"kind": "PING"},
    {"kind": "TCP_CHECK", "params": {"connect_timeout": "1 }\nvirtual_server 1.2.3.4 1 {"}},
    {"kind": "TCP_CHECK", "params": {"misc_path": "/bin/true"}},
    {"kind": "MISC_CHECK", "params": {"misc_path": 'x" }'}},
    {"kind": "TCP_CHECK", "params": {"url": {"path": "/"}}},
])
def test_check_block_refuses_bad_or_injected_input(a):
    from hdslb.daemon import check_block
    from hdslb.errors import HdslbError

    with pytest.raises(HdslbError):
        check_block({"proto": "tcp", "addr": "10.0.0.1", "port": 80}, "10.0.0.2", 80, a)


def test_a_per_cpu_conn_table_taking_much_memory_is_warned_about_with_the_shared_size():
    from hdslb.fastpath.loader import Sizes, conn_table_advice, conn_tables_estimate

    gib = 1 << 30
    # DPVS's default conn_pool_size on a 64-CPU host with 64 GiB: ~8.5 GiB per CPU, ~0.3 GiB shared
    big = Sizes(max_conns=1 << 21)
    msg = conn_table_advice(big, 64, "percpu", 64 * gib)
    assert msg and "per CPU on 64 possible CPUs" in msg and "--conn-table shared would take 0.3 GiB" in msg
    assert f"{conn_tables_estimate(big, 64, 'percpu') / gib:.1f} GiB" in msg
    assert conn_table_advice(big, 2, "percpu", 64 * gib) is None      # 0.5 GiB of 64: fine
    assert conn_table_advice(big, 64, "shared", 64 * gib) is None     # already shared
    assert conn_table_advice(Sizes(max_conns=1 << 18), 2, "percpu", 0) is None  # memory unknown


def test_conn_tables_are_sized_apart_and_the_ipv4_one_is_compact():
    """IPv4 flows take 256 bytes a connection in a shared table (two 128-byte entries), IPv6 flows their own
    table, a quarter of the IPv4 one unless sized (conn6_pool_size / --max-conns6)."""
    from hdslb.fastpath.loader import Sizes, conn_table_estimate, conn_tables_estimate

    assert conn_table_estimate(1 << 21, 2, "shared", 4) == 256 << 20      # 1M connections, 2M entries
    assert conn_table_estimate(1 << 21, 2, "percpu", 4) == 368 << 20      # 184 B an entry on 2 CPUs
    assert conn_table_estimate(1 << 21, 2, "shared", 6) == 352 << 20      # the wide entries: 176 B
    assert Sizes(max_conns=1 << 21).conn6_entries() == 1 << 19
    assert Sizes(max_conns=1 << 21, max_conns6=4096).conn6_entries() == 4096
    assert Sizes(max_conns=512).conn6_entries() == 256                    # never below the minimum
    assert conn_tables_estimate(Sizes(max_conns=1 << 21), 2, "shared") == (256 + 88) << 20


def test_check_says_what_the_configs_conn_table_will_take():
    """hdslb-ctl check -f prints the connection table's kernel memory for the config on this machine, with the
    same notice hdslbd logs when a per-CPU table takes a large share of memory."""
    from cli.hdslb_ctl import conn_table_line

    gib = 1 << 30
    assert conn_table_line(1 << 21, "percpu", 2, 64 * gib) == (
        "connection tables: 2097152 IPv4 entries (conn_pool_size) + 524288 IPv6 (conn6_pool_size), percpu: "
        "~496 MiB of kernel memory on 2 possible CPUs")
    assert conn_table_line(1 << 21, "shared", 64, 64 * gib, entries6=4096) == (
        "connection tables: 2097152 IPv4 entries (conn_pool_size) + 4096 IPv6 (conn6_pool_size), shared: "
        "~257 MiB of kernel memory")
    big = conn_table_line(1 << 21, "percpu", 64, 64 * gib).splitlines()
    assert big[0].endswith("on 64 possible CPUs") and big[1].startswith("notice: the connection tables take 8.5 GiB")


@pytest.mark.parametrize("env,token", [("s3cret\n", "s3cret"), ("  s3cret  ", "s3cret"), (" \n", None)])
def test_the_api_token_from_the_environment_is_read_as_from_a_file(monkeypatch, env, token):
    """--api-token-file's token is stripped; HDSLB_API_TOKEN's was not: a trailing newline (EnvironmentFile, a
    token pasted with its line end) made a token no client can send (it strips what it sends), every request
    401, and a blank one a token required but never matched."""
    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    monkeypatch.setenv("HDSLB_API_TOKEN", env)
    assert settings_from_args(["eth0"]).api_token == token


def test_a_relative_pin_root_and_state_dir_are_taken_from_where_hdslbd_was_started(tmp_path, monkeypatch):
    """`hdslb-ctl up eth0 --pin-root pins` passed the relative path on to the program's PIN_DIR, which bcc cannot
    open: a fresh start died in a compile-error traceback, and a restart over the pins was refused as "a map layout
    or size changed? start with --fresh" (which discards every flow). Both directories are made absolute as given,
    so status and down name them wherever they run."""
    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    monkeypatch.chdir(tmp_path)
    s = settings_from_args(["eth0", "--pin-root", "pins", "--state-dir", "./state"])
    assert s.pin_dir == str(tmp_path / "pins" / "hdslb_ctrl")
    assert s.state_file == str(tmp_path / "state" / "hdslb_ctrl.state")
    monkeypatch.setenv("HDSLB_PIN_ROOT", "bpf")  # the environment's default alike
    assert settings_from_args(["eth0"]).pin_dir == str(tmp_path / "bpf" / "hdslb_ctrl")


@pytest.mark.parametrize("where", ["no such path", "nobody listening"])
def test_sd_notify_to_a_socket_that_is_gone_is_not_fatal(tmp_path, monkeypatch, where):
    """NOTIFY_SOCKET naming a socket that is gone (inherited from a unit by a shell, a container's stale one, a
    systemd restarted meanwhile): the READY=1 after a successful start raised out of Daemon.run(), and hdslbd died
    with a traceback, the fast path attached, no final save; a SIGHUP's RELOADING=1 killed the reload. As
    sd_notify(3), it now says it could not (False) and the daemon goes on."""
    import socket as s

    from hdslb.daemon import sd_notify

    path = str(tmp_path / "notify")
    if where == "nobody listening":
        with s.socket(s.AF_UNIX, s.SOCK_DGRAM) as srv:
            srv.bind(path)  # closed at once: the file stays, nobody reads it
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify("READY=1") is False


def test_a_rest_api_off_loopback_without_a_token_is_a_usage_error(monkeypatch, capsys):
    """`hdslb-ctl up eth0 --api-listen 0.0.0.0:53225` with no token: the refusal came from the REST server's start,
    after the compile and the attach (seconds later, exit 1, a restart leaving the daemon dead over its pins, and
    systemd restarting it in a loop). It is a bad command line, known before anything is touched: exit 2 in one
    line, as the other option errors."""
    monkeypatch.delenv("HDSLB_API_TOKEN", raising=False)
    with pytest.raises(SystemExit) as e:
        settings_from_args(["eth0", "--api-listen", "0.0.0.0:53225"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--api-listen 0.0.0.0:53225" in err and "--api-token-file" in err, err
    for ok in ("127.0.0.1:1", "[::1]:1", "localhost:1", "off"):
        settings_from_args(["eth0", "--api-listen", ok])
    monkeypatch.setenv("HDSLB_API_TOKEN", "s3cret")
    assert settings_from_args(["eth0", "--api-listen", "0.0.0.0:53225"]).api_token == "s3cret"


def test_a_netif_defs_device_that_does_not_exist_is_named_at_its_line(tmp_path, monkeypatch):
    """`hdslbd -f FILE` whose netif_defs names a device this host lacks (a renamed NIC, dpdk0 left from the seed):
    `check` passes it (the interface may come later) and the start was refused with "no such interface: dpdk0",
    naming neither the file nor the line to fix. The refusal names the device's line, as config errors do; an
    interface from the command line is named as before."""
    from hdslb.daemon import read_ifaces
    from hdslb.errors import HdslbError

    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    conf = tmp_path / "n.conf"
    conf.write_text("netif_defs {\n    <init> device nosuch0 {\n    }\n}\n")
    s = settings_from_args(["-f", str(conf)])
    with pytest.raises(HdslbError) as e:
        read_ifaces(s.interfaces, s.extra["iface_where"])
    assert e.value.message.startswith(f"{conf}:2:") and "nosuch0" in e.value.message, e.value.message
    s = settings_from_args(["nosuch1", "-f", str(conf)])  # the command line's, not the file's
    with pytest.raises(HdslbError, match="^no such interface: nosuch1$"):
        read_ifaces(s.interfaces, s.extra["iface_where"])


def test_a_config_id_without_a_config_file_is_a_usage_error(capsys):
    """`hdslbd eth0 -i lb2` (or `hdslb-ctl up eth0 -i lb2`): -i picks the `@ID` lines of -f's file, and without -f
    it was taken and did nothing, so an operator who meant `-f` (or thought -i named an instance) was told nothing.
    Refused as ipvsadm refuses an option its command does not take."""
    with pytest.raises(SystemExit) as e:
        settings_from_args(["eth0", "-i", "lb2"])
    assert e.value.code == 2 and "-i/--config-id" in capsys.readouterr().err


def test_log_level_takes_any_case_and_dpvs_names_and_both_tools_say_their_version(capsys):
    """`--log-level DEBUG` (global_defs log_level's spelling) was refused while the file's DEBUG was taken, and
    neither hdslbd nor hdslb-ctl had --version."""
    from cli import hdslb_ctl
    from hdslb import __version__

    assert [settings_from_args(["--log-level", v, "lo"]).log_level for v in ("DEBUG", "Warning", "ERR", "NOTICE")] \
        == ["debug", "warning", "error", "info"]
    with pytest.raises(SystemExit) as e:
        settings_from_args(["--log-level", "loud", "lo"])
    assert e.value.code == 2 and "invalid choice: 'loud'" in capsys.readouterr().err
    from hdslb.daemon import build_parser

    for parser, name in ((hdslb_ctl.build_parser(), "hdslb-ctl"), (build_parser(), "hdslbd")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--version"])
        assert e.value.code == 0 and capsys.readouterr().out == f"{name} {__version__}\n"
