"""keepalived.conf as keepalived's own reader (lib/parser.c) sees it: comments anywhere, `@ID` conditional lines,
`$NAME` parameters; keepalived's own global_defs keywords and the checkers hdslb does not run; HTTP basic
authentication in HTTP_GET/SSL_GET urls."""

from __future__ import annotations

import base64

import pytest
from aiohttp import web

from hdslb.config import ConfigError, loads
from hdslb.config import load as config_load
from hdslb.config.apply import inactive_notices
from hdslb.config.model import HttpCheck, HttpUrl
from hdslb.health import check_http

VS = "virtual_server 10.0.0.1 80 {{\n{body}\n}}\n"


def load(text, **kw):
    return loads(text, name="k.conf", **kw)


def refused(text, **kw):
    with pytest.raises(ConfigError) as ei:
        load(text, **kw)
    return [str(e) for e in ei.value.errors]


def weights(cfg):
    return [(str(rs.ip), rs.weight) for vs in cfg.virtual_servers for rs in vs.real_servers]


# ---------------------------------------------------------------- comments


def test_comment_starts_anywhere_outside_quotes():
    cfg = load(VS.format(body=' real_server 10.1.0.1 80 { weight 3#three\n HTTP_GET { url { path "/a#b"!x\n'
                              ' status_code 200!ok\n } }\n }\n real_server 10.1.0.2 80 { weight 4! four\n }'))
    rs1, rs2 = cfg.virtual_servers[0].real_servers
    assert (rs1.weight, rs2.weight) == (3, 4)
    url = rs1.checkers[0].url[0]
    assert (url.path, url.status_code) == ("/a#b", ((200, 200),))  # inside quotes `#` is a character


def test_escaped_comment_characters_are_characters():
    cfg = load(VS.format(body=' real_server 10.1.0.1 80 {\n MISC_CHECK { misc_path /bin/check\\#1\\!x#not\n }\n }'))
    assert cfg.virtual_servers[0].real_servers[0].checkers[0].misc_path == "/bin/check#1!x"


def test_columns_after_a_comment_are_the_files():
    errs = refused(VS.format(body="   lb_algo nope # a comment"))
    assert errs[0].startswith("k.conf:2:12: lb_algo: 'nope' is not one of")


# ---------------------------------------------------------------- @ID conditional lines


CONDITIONAL = VS.format(body=" real_server 10.1.0.1 80 {\n@lb1  weight 11\n@lb2 weight 33\n"
                              "@^lb1 inhibit_on_failure\n }")


def read_conditional(**kw):
    rs = load(CONDITIONAL, **kw).virtual_servers[0].real_servers[0]
    return rs.weight, rs.inhibit_on_failure


@pytest.mark.parametrize("config_id,want", [("lb1", (11, False)), ("lb2", (33, True)), ("other", (1, True))])
def test_at_lines_follow_the_config_id(config_id, want):
    assert read_conditional(config_id=config_id) == want


def test_config_id_defaults_to_the_node_name(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "lb2.example.net")
    assert read_conditional() == (33, True)


def test_at_line_keeps_its_columns_and_a_bare_tag_is_nothing():
    errs = refused(VS.format(body="@lb1 lb_algo nope\n@lb1"), config_id="lb1")
    assert errs == ["k.conf:2:14: lb_algo: 'nope' is not one of rr|wrr|lc|wlc|sh|dh|mh|conhash|fo"]


# ---------------------------------------------------------------- $NAME parameters


def test_parameters_are_substituted():
    cfg = load("$VIP=10.0.0.1\n$W = 5\n$PORT=80\n"
               "virtual_server $VIP ${PORT} {\n real_server 10.1.0.1 $PORT { weight $W }\n}\n")
    vs = cfg.virtual_servers[0]
    assert vs.key == ("TCP", "10.0.0.1:80") and weights(cfg) == [("10.1.0.1", 5)]


def test_parameter_names_end_where_keepalived_ends_them():
    # `$W0` is not `$W` followed by 0; an undefined parameter stays as written (and is then refused as a value)
    errs = refused("$W=5\n" + VS.format(body=" real_server 10.1.0.1 80 { weight $W0 }"))
    assert errs[0].startswith("k.conf:3:") and "weight" in errs[0] and "$W0" in errs[0]


def test_multiline_parameter_becomes_lines():
    text = ("$RS=real_server 10.1.0.1 80 { \\\n   weight 7 \\\n   }\n"
            "$CHECK=\\\n TCP_CHECK {\\\n connect_timeout 2\\\n }\n"
            "virtual_server 10.0.0.1 80 {\n $RS\n real_server 10.1.0.2 80 {\n  $CHECK\n }\n}\n")
    cfg = load(text)
    rs1, rs2 = cfg.virtual_servers[0].real_servers
    assert rs1.weight == 7 and not rs1.checkers
    assert rs2.checkers[0].kind == "TCP_CHECK" and rs2.checkers[0].connect_timeout == 2.0


def test_a_comment_does_not_end_a_continued_definition():
    # keepalived's decomment() still sees the trailing `\` after a comment: the definition goes on
    text = ("$CHECK=TCP_CHECK { \\\n connect_timeout 2 # two seconds \\\n }\n"
            "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.2 80 {\n  $CHECK\n }\n}\n")
    assert load(text).virtual_servers[0].real_servers[0].checkers[0].connect_timeout == 2.0


def test_parameters_reach_included_files(tmp_path):
    (tmp_path / "rs.conf").write_text("real_server $RIP 80 { weight 9 }\n")
    (tmp_path / "main.conf").write_text("$RIP=10.1.0.9\nvirtual_server 10.0.0.1 80 {\n include rs.conf\n}\n")
    from hdslb.config import load as load_file
    assert weights(load_file(str(tmp_path / "main.conf"))) == [("10.1.0.9", 9)]


def test_parameters_are_read_in_file_order_across_includes(tmp_path):
    """keepalived reads an included file where its `include` line is (lib/parser.c): the file sees the values defined
    above that line, and what it defines holds below it. hdslb read the whole including file first: a site file of
    definitions included at the top left `$VIP` unreplaced ("'$VIP' is not an IPv4 or IPv6 address"), and a template
    included twice with `$PORT` set before each got the last value both times (both real servers on 443)."""
    from hdslb.config import load as load_file

    (tmp_path / "site.conf").write_text("$VIP=10.0.0.9\n")
    (tmp_path / "rs.tmpl").write_text("real_server 10.1.0.1 $PORT {\n weight $W\n}\n$W=2\n")
    (tmp_path / "main.conf").write_text("include site.conf\n$W=1\n"
                                        "$PORT=80\nvirtual_server $VIP $PORT {\n include rs.tmpl\n}\n"
                                        "$PORT=443\nvirtual_server $VIP $PORT {\n include rs.tmpl\n}\n")
    cfg = load_file(str(tmp_path / "main.conf"))
    assert [(vs.key[1], [(str(rs.ip), rs.port, rs.weight) for rs in vs.real_servers]) for vs in cfg.virtual_servers] \
        == [("10.0.0.9:80", [("10.1.0.1", 80, 1)]), ("10.0.0.9:443", [("10.1.0.1", 443, 2)])]


def test_standard_parameters(tmp_path):
    (tmp_path / "check.sh").write_text("")
    body = ' real_server 10.1.0.1 80 {\n MISC_CHECK {\n  misc_path "${_PWD}/check.sh ${_INSTANCE} $_INSTANCE"\n }\n }'
    (tmp_path / "main.conf").write_text(VS.format(body=body))
    from hdslb.config import load as load_file
    cfg = load_file(str(tmp_path / "main.conf"), config_id="lb7")
    # as in keepalived, `$NAME` ends at a blank, `,`, `)` or the line's end: before a `"` it needs `${NAME}`
    assert cfg.virtual_servers[0].real_servers[0].checkers[0].misc_path == f"{tmp_path}/check.sh lb7 $_INSTANCE"


def test_a_parameter_defined_through_itself_is_refused():
    errs = refused("$A=x $A\n" + VS.format(body=" real_server 10.1.0.1 80 { weight $A }"))
    assert errs == ["k.conf:3:1: $: parameters still unexpanded after 64 substitutions (a parameter defined "
                    "through itself?)"]


def test_seq_lines_are_refused():
    errs = refused("~SEQ(I,1,3) $X=1\n")
    assert errs == ["k.conf:1:1: ~SEQ: keepalived's ~SEQ line generator is not supported: write the lines out "
                    "(or generate the file)"]


# ---------------------------------------------------------------- keepalived's own keywords


def test_keepalived_globals_are_accepted_with_their_reason():
    cfg = load("global_defs {\n lvs_id LVS_1\n vrrp_strict\n vrrp_garp_interval 0.1\n enable_snmp_checker\n"
               " lvs_sync_daemon eth0 VI_1\n checker_priority -5\n process_names\n}\nvrrp_track_process p {\n}\n")
    notes = inactive_notices(cfg)
    for line, kw, reason in ((2, "lvs_id", "hdslb sends no mail"), (3, "vrrp_strict", "VRRP is not part of hdslb"),
                             (4, "vrrp_garp_interval", "VRRP is not part"), (5, "enable_snmp_checker", "not over SNMP"),
                             (6, "lvs_sync_daemon", "no connection sync daemon"),
                             (7, "checker_priority", "process tuning"), (8, "process_names", "process tuning"),
                             (10, "vrrp_track_process", "VRRP is not part")):
        assert any(n.startswith(f"k.conf:{line}: {kw}: ") and reason in n for n in notes), (kw, notes)


def test_keepalived_2_globals_and_root_keywords_load_with_their_reason():
    """keepalived 2.2's own keywords (core/global_parser.c init_global_keywords) that were refused as unknown: the
    current spelling lvs_flush_on_stop (lvs_flush_onstop is deprecated since 2.1.5), its nftables options, the mail
    option no_checker_emails, VRRP's vmac prefixes, the deprecated *_rlimit_rtime and lvs_process_name, and the
    root keywords instance, use_pid_dir, child_wait_time and namespace_with_ipsets (hdslb took instance and use_pid_dir
    inside global_defs only, where keepalived does not read them)."""
    cfg = load("instance lb1\nuse_pid_dir\nchild_wait_time 5\nnamespace_with_ipsets\nglobal_defs {\n"
               " lvs_flush_on_stop VS\n nftables keepalived\n nftables_ipvs\n no_checker_emails\n vmac_prefix 02:00\n"
               " checker_rlimit_rtime 10000\n lvs_process_name lvs\n}\n")
    notes = inactive_notices(cfg)
    for line, kw, reason in ((1, "instance", "process tuning"), (2, "use_pid_dir", "process tuning"),
                             (3, "child_wait_time", "process tuning"), (4, "namespace_with_ipsets", "process tuning"),
                             (6, "lvs_flush_on_stop", "no kernel IPVS table"), (7, "nftables", "VRRP is not part"),
                             (8, "nftables_ipvs", "no netfilter rules"), (9, "no_checker_emails", "no mail"),
                             (10, "vmac_prefix", "VRRP is not part"), (11, "checker_rlimit_rtime", "process tuning"),
                             (12, "lvs_process_name", "process tuning")):
        assert any(n.startswith(f"k.conf:{line}: {kw}: ") and reason in n for n in notes), (kw, notes)


def test_unknown_globals_are_still_refused():
    assert refused("global_defs {\n router_idd x\n}\n") == [
        "k.conf:2:2: router_idd: unknown keyword in global_defs; did you mean `router_id`?"]


NOT_RUN = "health checker hdslb does not implement"


@pytest.mark.parametrize("text,where,why", [
    ("global_defs {\n startup_script /bin/true\n}\n", "2:2: startup_script", "hdslb runs no script at start"),
    ("net_namespace blue\n", "1:1: net_namespace", "serves the network namespace it is started in"),
    ("net_namespace_ipvs blue\n", "1:1: net_namespace_ipvs", "balances in the network namespace it is started in"),
    ("global_defs {\n rs_init_notifies\n}\n", "2:2: rs_init_notifies", "for the state a real server starts in"),
    (VS.format(body=" real_server 10.1.0.1 80 {\n  DNS_CHECK {\n  }\n }"), "3:3: DNS_CHECK", NOT_RUN),
    (VS.format(body=" real_server 10.1.0.1 80 {\n  BFD_CHECK {\n  }\n }"), "3:3: BFD_CHECK", NOT_RUN),
    (VS.format(body=" real_server 10.1.0.1 80 {\n  FILE_CHECK {\n  }\n }"), "3:3: FILE_CHECK", NOT_RUN),
    (VS.format(body=" backup_real_server 10.1.0.1 80 {\n }"), "2:2: backup_real_server", "failover pool"),
])
def test_what_would_change_traffic_if_ignored_is_refused(text, where, why):
    (err,) = refused(text)
    assert err.startswith(f"k.conf:{where}: ") and why in err


def test_keepalived_service_and_server_options_that_do_nothing_here_are_noticed():
    cfg = load("virtual_server 10.0.0.1 80 {\n ip_family inet\n hashed\n weight 3\n snmp_name web\n"
               " real_server 10.1.0.1 80 {\n  snmp_name w1\n  TCP_CHECK {\n   log_all_failures true\n  }\n }\n}\n")
    assert [n.split(": ")[1] for n in inactive_notices(cfg)] == ["ip_family", "hashed", "weight", "snmp_name",
                                                                 "snmp_name", "log_all_failures"]


@pytest.mark.parametrize("body,where,why", [
    (" flag-1", "2:2: flag-1", "sh-fallback / mh-fallback (flag-1)"),
    (" persistence_engine sip", "2:2: persistence_engine", "persistence engines (sip) are not implemented"),
    (" sorry_server_lvs_method DR", "2:2: sorry_server_lvs_method", "forwarded one way, the service's lb_kind"),
    (" real_server 10.1.0.1 80 {\n  lvs_method DR\n }", "3:3: lvs_method", "forwarded one way, the service's lb_kind"),
    (" real_server 10.1.0.1 80 {\n  alpha\n }", "3:3: alpha", "set it there"),
    (" real_server 10.1.0.1 80 {\n  TCP_CHECK {\n   alpha\n  }\n }", "4:4: alpha", "set it there"),
    (" real_server 10.1.0.1 80 {\n  TCP_CHECK {\n   bind_if eth1\n  }\n }", "4:4: bind_if", "bindto an address"),
    (" real_server 10.1.0.1 80 {\n  HTTP_GET {\n   fwmark 7\n  }\n }", "4:4: fwmark", "SO_MARK"),
])
def test_keepalived_service_and_server_options_hdslb_cannot_honour_are_refused(body, where, why):
    (err,) = refused(VS.format(body=body))
    assert err.startswith(f"k.conf:{where}: ") and why in err


def test_dpvs_group_names_may_hold_colons():
    cfg = load("virtual_server_group 2001::1-80-TCP {\n 2001::1 80\n}\n"
               "virtual_server group 2001::1-80-TCP {\n lb_kind FNAT\n}\n")
    assert cfg.virtual_servers[0].group == "2001::1-80-TCP"


def test_url_credentials():
    def conf(creds):
        return VS.format(body=" real_server 10.1.0.1 80 {\n  HTTP_GET {\n   url {\n    path /\n" + creds +
                         "\n   }\n  }\n }")

    url = load(conf("    username u\n    password \"p w:x\"")).virtual_servers[0].real_servers[0].checkers[0].url[0]
    assert (url.username, url.password) == ("u", "p w:x")
    assert refused(conf("    password p")) == ["k.conf:6:14: password: needs a username (HTTP basic authentication)"]
    assert refused(conf("    username a:b"))[0].startswith("k.conf:6:14: username: ")


def test_a_real_or_sorry_server_without_a_port_takes_the_virtual_servers():
    # keepalived (check_data.c): `real_server IP` and `sorry_server IP` use the virtual server's port
    vs = load("virtual_server 10.0.0.1 443 {\n lb_kind DR\n sorry_server 10.9.9.9\n real_server 10.1.0.1 {\n"
              "  weight 2\n  TCP_CHECK {\n  }\n }\n real_server 10.1.0.2 443 {\n }\n}\n").virtual_servers[0]
    assert [(str(rs.ip), rs.port, rs.weight) for rs in vs.real_servers] == [("10.1.0.1", 443, 2), ("10.1.0.2", 443, 1)]
    assert str(vs.sorry_server) == "10.9.9.9:443"
    # the same server once with and once without its port is one server given twice
    assert refused(VS.format(body=" real_server 10.1.0.1 {\n }\n real_server 10.1.0.1 80 {\n }")) == [
        "k.conf:4:2: real_server: duplicate real_server 10.1.0.1:80 in virtual_server 10.0.0.1 80 (first at "
        "k.conf:2:2)"]
    # a group has no one port to give: each member gives its own (kept as port 0, keepalived's "the virtual port"),
    # and the server's checks must say where to connect
    cfg = load("virtual_server_group g {\n 10.0.0.1 80\n 10.0.0.2 81\n}\nvirtual_server group g {\n"
               " real_server 10.1.0.1 {\n }\n}\n")
    assert [(str(rs.ip), rs.port) for rs in cfg.virtual_servers[0].real_servers] == [("10.1.0.1", 0)]
    assert refused("virtual_server_group g {\n 10.0.0.1 80\n 10.0.0.2 81\n}\nvirtual_server group g {\n"
                   " real_server 10.1.0.1 {\n  TCP_CHECK {\n  }\n }\n}\n") == [
        "k.conf:7:3: connect_port: real_server 10.1.0.1 has no port of its own (it takes each member's of group g): "
        "its TCP_CHECK needs a connect_port"]


def test_group_members_may_be_networks():
    # keepalived 2.2 (check_data.c alloc_vsg_entry): IP/LEN is every address of the network, written as the network
    cfg = load("virtual_server_group g {\n 10.1.0.0/30 80\n 10.9.9.9/32 53\n 2001:db8::/127 80\n}\n")
    assert [str(e) for e in cfg.virtual_server_groups["g"].members] == [
        "10.1.0.0:80", "10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80", "10.9.9.9:53", "[2001:db8::]:80",
        "[2001:db8::1]:80"]
    assert refused("virtual_server_group g {\n 10.1.0.1/30 80\n}\n") == [
        "k.conf:2:2: 10.1.0.1/30: '10.1.0.1/30' is not a network (10.1.0.1/30 has host bits set)"]


def test_a_virtual_servers_delay_loop_may_be_fractional():
    # keepalived 2 (check_parser.c vs_delay_handler: read_timer), as a checker's own
    cfg = load(VS.format(body=" delay_loop 0.5\n real_server 10.1.0.1 80 {\n  TCP_CHECK {\n  }\n }"))
    vs = cfg.virtual_servers[0]
    assert vs.delay_loop == 0.5 and vs.real_servers[0].checkers[0].delay_loop == 0.5


def test_checker_defaults_are_keepalived_s():
    # check_api.c queue_checker: retry 1, delay_before_retry 1 s; check_http.c: 3 s; check_misc.c: retry 0
    cfg = load(VS.format(body=" real_server 10.1.0.1 80 {\n  TCP_CHECK {\n  }\n  HTTP_GET {\n  }\n"
                              "  SSL_GET {\n  }\n  UDP_CHECK {\n  }\n  MISC_CHECK {\n   misc_path /bin/true\n  }\n }"))
    got = [(c.kind, c.retry, c.delay_before_retry) for c in cfg.virtual_servers[0].real_servers[0].checkers]
    assert got == [("TCP_CHECK", 1, 1.0), ("HTTP_GET", 1, 3.0), ("SSL_GET", 1, 3.0), ("UDP_CHECK", 1, 1.0),
                   ("MISC_CHECK", 0, 1.0)]


def test_checker_options_on_the_real_or_virtual_server_are_its_checkers_defaults():
    # keepalived 2 (check_parser.c, check_api.c): checker, else real_server, else virtual_server, else the kind's
    cfg = load("virtual_server 10.0.0.1 80 {\n delay_loop 20\n retry 4\n connect_timeout 2\n warmup 1\n"
               " virtualhost vs.example\n smtp_alert\n"
               " real_server 10.1.0.1 80 {\n  delay_loop 7\n  delay_before_retry 0.5\n  connect_timeout 9\n"
               "  virtualhost rs.example\n  HTTP_GET {\n   retry 2\n  }\n  TCP_CHECK {\n   connect_timeout 3\n  }\n"
               "  MISC_CHECK {\n   misc_path /bin/true\n  }\n }\n"
               " real_server 10.1.0.2 80 {\n  HTTP_GET {\n  }\n }\n}\n")
    rs1, rs2 = cfg.virtual_servers[0].real_servers
    http, tcp, misc = rs1.checkers
    assert (http.delay_loop, http.retry, http.delay_before_retry, http.connect_timeout, http.warmup,
            http.virtualhost) == (7.0, 2, 0.5, 9.0, 1.0, "rs.example")
    assert (tcp.retry, tcp.connect_timeout, misc.retry, misc.misc_timeout) == (4, 3.0, 4, 7.0)
    (http2,) = rs2.checkers
    assert (http2.delay_loop, http2.retry, http2.delay_before_retry, http2.connect_timeout, http2.virtualhost) == \
        (20.0, 4, 3.0, 2.0, "vs.example")
    assert any(n.startswith("k.conf:7: smtp_alert: hdslb sends no mail") for n in inactive_notices(cfg))


# ---------------------------------------------------------------- HTTP basic authentication on the wire


@pytest.fixture
async def auth_port():
    want = "Basic " + base64.b64encode(b"myuser:my pass").decode()

    async def secret(request):
        return web.Response(status=200 if request.headers.get("Authorization") == want else 401)

    app = web.Application()
    app.add_routes([web.get("/secret", secret)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]
    await runner.cleanup()


async def test_http_get_sends_basic_authentication(auth_port):
    cfg = load(f"virtual_server 10.0.0.1 80 {{\n real_server 127.0.0.1 {auth_port} {{\n  HTTP_GET {{\n"
               "   url {\n    path /secret\n    status_code 200\n    username myuser\n    password \"my pass\"\n"
               "   }\n   connect_timeout 2\n  }\n }\n}\n")
    rs = cfg.virtual_servers[0].real_servers[0]
    check: HttpCheck = rs.checkers[0]
    assert (await check_http(check, rs)).ok
    anonymous = HttpUrl(path="/secret", status_code=((200, 200),), digest=None)
    r = await check_http(HttpCheck(**{**check.__dict__, "url": (anonymous,)}), rs)
    assert not r.ok and r.reason == "HTTP 401 from /secret (want 200)"


# ---------------------------------------------------------------- the config id from the command lines

ONLY_LB1 = "@lb1 no_such_keyword\nvirtual_server 10.0.0.1 80 {\n}\n"


def test_hdslbd_config_id_selects_the_lines(tmp_path, monkeypatch):
    from hdslb.daemon import settings_from_args

    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    conf = tmp_path / "k.conf"
    conf.write_text(ONLY_LB1)
    s = settings_from_args(["eth0", "-f", str(conf), "-i", "lb2", "--state-dir", str(tmp_path)])
    assert s.config_id == "lb2"
    with pytest.raises(SystemExit) as e:
        settings_from_args(["eth0", "-f", str(conf), "--config-id", "lb1", "--state-dir", str(tmp_path)])
    assert e.value.code == 2


async def test_reload_reads_the_file_with_the_daemons_config_id(tmp_path):
    from tests.unit.test_config_reload import make

    d, conf = await make(tmp_path, ONLY_LB1, "-i", "lb2")
    assert d.settings.config_id == "lb2"
    conf.write_text(ONLY_LB1.replace("@lb1", "@lb2"))
    with pytest.raises(Exception) as e:
        await d.reload_config()
    assert "no_such_keyword: unknown keyword at the top level" in str(e.value)


def test_hdslb_ctl_check_config_id(tmp_path, capsys):
    from cli.hdslb_ctl import main

    conf = tmp_path / "k.conf"
    conf.write_text(ONLY_LB1)
    assert main(["check", "-f", str(conf), "-i", "lb2"]) == 0
    assert main(["check", "-f", str(conf), "--config-id", "lb1"]) == 1
    assert f"{conf}:1:6: no_such_keyword: unknown keyword at the top level" in capsys.readouterr().err


# ---------------------------------------------------------------- HTTP_GET / SSL_GET request forms


@pytest.fixture
async def echo_port():
    """Answers 200 with the request's HTTP version and Host header in the body."""
    async def echo(request):
        return web.Response(text=f"{request.version.major}.{request.version.minor} {request.headers.get('Host')}")

    app = web.Application()
    app.add_routes([web.get("/{tail:.*}", echo)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]
    await runner.cleanup()


def http_get(port, body):
    cfg = load(f"virtual_server 10.0.0.1 80 {{\n virtualhost vs.example\n real_server 127.0.0.1 {port} {{\n"
               f"  HTTP_GET {{\n{body}\n   connect_timeout 2\n  }}\n }}\n}}\n")
    rs = cfg.virtual_servers[0].real_servers[0]
    return rs.checkers[0], rs


async def test_http_protocol_and_per_url_virtualhost(echo_port):
    import hashlib

    def digest(text):
        return hashlib.md5(text.encode()).hexdigest()

    # keepalived's http_protocol 1.1 asks in HTTP/1.1; a url's own virtualhost is its Host header
    check, rs = http_get(echo_port, f"   http_protocol 1.1\n   url {{\n    path /a\n"
                                    f"    digest {digest('1.1 vs.example')}\n   }}\n   url {{\n    path /b\n"
                                    f"    virtualhost url.example\n    digest {digest('1.1 url.example')}\n   }}")
    assert check.http_protocol == "1.1"
    r = await check_http(check, rs)
    assert r.ok, r.reason
    check, rs = http_get(echo_port, f"   url {{\n    path /a\n    digest {digest('1.0 vs.example')}\n   }}")
    assert check.http_protocol == "1.0C" and (await check_http(check, rs)).ok  # the default form


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="needs openssl to make a certificate")
async def test_ssl_get_enable_sni_sends_the_virtualhost(tmp_path):
    import ssl
    import subprocess

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=rs1"],
                   check=True, capture_output=True)
    seen = []
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.sni_callback = lambda sock, name, c: seen.append(name)

    async def ok(request):
        return web.Response(text="ok")

    app = web.Application()
    app.add_routes([web.get("/", ok)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        for sni, want in (("   enable_sni\n", "vs.example"), ("", None)):
            cfg = load(f"virtual_server 10.0.0.1 443 {{\n virtualhost vs.example\n real_server 127.0.0.1 {port} {{\n"
                       f"  SSL_GET {{\n{sni}   url {{\n    path /\n   }}\n   connect_timeout 2\n  }}\n }}\n}}\n")
            rs = cfg.virtual_servers[0].real_servers[0]
            assert (await check_http(rs.checkers[0], rs)).ok
            assert seen[-1] == want
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("kw", ["regex ^ok", "regex_no_match down"])
def test_body_regexes_are_refused(kw):
    (err,) = refused(VS.format(body=f" real_server 10.1.0.1 80 {{\n  HTTP_GET {{\n   url {{\n    path /\n    {kw}\n"
                                    "   }\n  }\n }"))
    assert err.startswith(f"k.conf:6:5: {kw.split()[0]}: matching the body with a regex is not implemented")


# ---------------------------------------------------------------- bytes that are not UTF-8


def test_bytes_that_are_not_utf8_in_a_comment_are_ignored(tmp_path):
    # keepalived reads bytes: a Latin-1 comment (an old file's author name, say) means nothing to it
    f = tmp_path / "k.conf"
    f.write_bytes(b"! Ren\xe9's services\nvirtual_server 10.0.0.1 80 { # \xff\xfe\n real_server 10.1.0.1 80 {\n"
                  b"  weight 3 ! caf\xe9\n }\n}\n")
    cfg = config_load(str(f))
    assert weights(cfg) == [("10.1.0.1", 3)]


def test_bytes_that_are_not_utf8_elsewhere_are_refused_where_they_are(tmp_path):
    f = tmp_path / "k.conf"
    f.write_bytes(b"virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n  weight 3\n"
                  b"  MISC_CHECK { misc_path \"/bin/chk caf\xe9\xff\" } # \xe9\n }\n}\n")
    with pytest.raises(ConfigError) as ei:
        config_load(str(f))
    e = ei.value
    assert (e.file, e.line, e.col, e.keyword) == (str(f), 4, 39, "encoding")
    assert e.reason.startswith("bytes \\xe9\\xff are not UTF-8")
    # in an included file too, and in a parameter's definition
    (tmp_path / "inc.conf").write_bytes(b"$W=3\xa0\nvirtual_server 10.0.0.1 80 {\n}\n")
    f.write_text("include inc.conf\n")
    with pytest.raises(ConfigError) as ei:
        config_load(str(f))
    assert str(ei.value).startswith(f"{tmp_path / 'inc.conf'}:1:5: encoding: bytes \\xa0 are not UTF-8")


async def test_config_get_shows_a_file_with_a_stray_byte_in_a_comment(tmp_path):
    from tests.unit.test_api_security import BASE, HarnessDaemon

    conf = tmp_path / "hdslb.conf"
    conf.write_bytes(b"# \xe9\n" + BASE.encode())
    d = HarnessDaemon(conf, tmp_path)
    await d.reload_config()
    assert d.config_text() == "# \ufffd\n" + BASE


# ---------------------------------------------------------------- UDP_CHECK reply lengths (check_udp.c)


def udp(body):
    return VS.format(body=f" protocol UDP\n real_server 10.1.0.1 53 {{\n  UDP_CHECK {{\n   {body}\n  }}\n }}")


def test_udp_reply_lengths_are_read_and_default_as_keepalived():
    [c] = load(udp("require_reply 01\n   min_reply_length 4\n   max_reply_length 1400")) \
        .virtual_servers[0].real_servers[0].checkers
    assert (c.min_reply_length, c.max_reply_length) == (4, 1400)
    [c] = load(udp("require_reply 01")).virtual_servers[0].real_servers[0].checkers
    assert (c.min_reply_length, c.max_reply_length) == (0, 255)  # udp_check_handler's defaults (max UINT8_MAX)
    assert not [n for n in inactive_notices(load(udp("require_reply 01\n   max_reply_length 0")))]


@pytest.mark.parametrize("body,error", [
    ("max_reply_length 65536", "k.conf:6:21: max_reply_length: 65536 is out of range, expects an integer 0..65535 "
                               "(bytes)"),
    ("min_reply_length -1", "k.conf:6:21: min_reply_length: -1 is out of range, expects an integer 0..65535 (bytes)"),
    ("min_reply_length 300", "k.conf:6:21: min_reply_length: 300 is above max_reply_length 255: every reply would "
                             "fail the check"),
    ("max_reply_length 8\n   min_reply_length 9", "k.conf:7:21: min_reply_length: 9 is above max_reply_length 8: "
                                                  "every reply would fail the check"),
])
def test_udp_reply_lengths_are_checked(body, error):
    assert refused(udp(f"require_reply 01\n   {body}"))[0] == error


def test_udp_reply_lengths_without_reply_data_are_noticed():
    # keepalived reads them only when a reply is compared with require_reply DATA (udp_check_thread)
    for head in ("", "require_reply\n   "):
        got = inactive_notices(load(udp(f"{head}min_reply_length 2\n   max_reply_length 9")))
        assert [n.split(": ")[1] for n in got] == ["min_reply_length", "max_reply_length"]
        assert "only with `require_reply DATA`" in got[0]


# ---------------------------------------------------------------- the SSL block (check_parser.c, check_ssl.c)

SSL_VS = VS.format(body=" real_server 10.1.0.1 443 {\n  SSL_GET {\n   url { path / }\n  }\n  HTTP_GET {\n"
                        "   url { path / }\n  }\n }")


@pytest.fixture
def client_cert(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    key, cert = tmp_path / "lb-key.pem", tmp_path / "lb.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=lb", "-passout",
                    "pass:s3cret"], check=True, capture_output=True)
    return str(cert), str(key)


def test_ssl_block_is_every_ssl_gets_tls_context(client_cert):
    cert, key = client_cert
    cfg = load(f"SSL {{\n password s3cret\n ca {cert}\n certificate {cert}\n key {key}\n}}\n" + SSL_VS)
    ssl_get, http_get = cfg.virtual_servers[0].real_servers[0].checkers
    assert (ssl_get.tls.certificate, ssl_get.tls.key, ssl_get.tls.password, ssl_get.tls.ca) == (cert, key, "s3cret",
                                                                                                cert)
    assert http_get.tls is None
    assert "s3cret" not in repr(ssl_get)
    # the CA verifies nothing, in keepalived either: said, not hidden
    assert [n.split(": ", 2)[1] for n in inactive_notices(cfg)] == ["ca"]
    # without an SSL_GET the block does nothing, and says so
    got = inactive_notices(load(f"SSL {{\n certificate {cert}\n key {key}\n password s3cret\n}}\n"))
    assert got == ["k.conf:1: SSL: accepted, not acted on: no SSL_GET in this configuration uses it (checks added "
                   "with check.add do not either)"]


def test_ssl_block_files_that_do_not_load_are_refused_at_their_line(client_cert, tmp_path):
    cert, key = client_cert
    errs = refused(f"SSL {{\n certificate {cert}\n key {key}\n password wrong\n}}\n" + SSL_VS)
    assert errs[0].startswith(f"k.conf:2:14: certificate: {cert} with key {key} does not load:")
    assert errs[0].endswith("(a PEM certificate and its private key, and the key's password)")
    assert refused(f"SSL {{\n key {key}\n}}\n")[0] == "k.conf:2:6: key: needs `certificate`: it is the client " \
                                                     "certificate's key"
    assert refused(f"SSL {{\n certificate {tmp_path}/none.pem\n}}\n")[0] == \
        f"k.conf:2:14: certificate: cannot read {tmp_path}/none.pem: No such file or directory"
    assert refused(f"SSL {{\n ca {key}\n}}\n")[0].startswith(f"k.conf:2:5: ca: {key} does not load as PEM CA "
                                                             f"certificates")
    assert refused("SSL {\n ca etc/ca.pem\n}\n")[0] == "k.conf:2:5: ca: 'etc/ca.pem' is not an absolute path"


def test_ssl_block_is_not_an_unknown_keyword_and_a_posted_config_may_not_have_one(client_cert):
    cert, key = client_cert
    errs = refused(f"SSL {{\n certificate {cert}\n key {key}\n password s3cret\n}}\n", posted=True)
    assert errs == ["k.conf:1:1: SSL: reads certificate and key files: a configuration sent over the API may not "
                    "read files or run programs; put it in the config file on disk and reload from the file "
                    "(SIGHUP / systemctl reload hdslb)"]


def test_a_changed_ssl_block_restarts_the_ssl_gets_and_lists_no_password(client_cert):
    from hdslb.config import diff

    cert, key = client_cert
    block = f"SSL {{\n certificate {cert}\n key {key}\n password s3cret\n}}\n"
    a, b = load(block + SSL_VS), load(SSL_VS)
    d = diff(a, b)
    assert [(old.checkers[0].tls is not None, new.checkers[0].tls) for _, old, new in d.rs_changed] == [(True, None)]
    assert d.options_changed == () and d.init_changed == ()


# ---------------------------------------------------------------- TUN's encapsulation (keepalived 2.1+)


@pytest.mark.parametrize("method", ["TUN type ipip", "TUN type ipip nocsum", "TUN nocsum", "TUN"])
def test_a_tun_service_may_name_its_ipip_encapsulation(method):
    """keepalived 2.1+ writes a TUN service's encapsulation after the method (check_parser.c svr_forwarding_handler):
    `lvs_method TUN type ipip` was refused as "got extra 'type'", though ipip is what TUNNEL does here."""
    for kw in ("lb_kind", "lvs_method"):
        cfg = load(VS.format(body=f" {kw} {method}\n real_server 10.1.0.1 80 {{\n }}"))
        assert cfg.virtual_servers[0].lb_kind == "TUNNEL"


@pytest.mark.parametrize("method,word,says", [
    ("TUN type gue port 6080", "gue", "tunnel type gue is not implemented"),
    ("TUN type gre", "gre", "tunnel type gre is not implemented"),
    ("TUN type ipip csum", "csum", "an ipip tunnel takes no checksum option"),
    ("TUN port 6080", "port", "`port` is a GUE tunnel's"),
    ("TUN type", "type", "`type` needs a tunnel type"),
    ("DR type ipip", "type", "got extra 'type' (tunnel options follow TUN only)"),
])
def test_another_encapsulation_is_refused_at_its_word(method, word, says):
    errs = refused(VS.format(body=f" lvs_method {method}\n real_server 10.1.0.1 80 {{\n }}"))
    col = len(" lvs_method ") + method.index(word) + 1
    assert errs[0].startswith(f"k.conf:2:{col}: lvs_method: ") and says in errs[0], errs


# ---------------------------------------------------------------- braces gone missing


def test_real_server_blocks_missing_their_closing_braces_are_named_not_a_traceback(tmp_path):
    """A generated file whose real_server blocks lack their `}` nests each in the one before: 1,200 of them ended the
    parser's recursion with a RecursionError traceback (hdslb-ctl check, hdslbd -f; a reload logged "a bug"), where
    every parse error names its FILE:LINE."""
    from hdslb.config import check

    rs = "".join(f" real_server 10.1.{i // 250}.{i % 250 + 1} 80 {{\n  weight 1\n" for i in range(1200))
    conf = tmp_path / "lb.conf"
    conf.write_text("virtual_server 10.0.0.1 80 {\n" + rs + "}\n")
    errs = check(str(conf))
    assert len(errs) == 1 and errs[0].startswith(f"{conf}:64:27: real_server: blocks nested more than 32 deep: a "
                                                 f"'}}' is missing above (still open: virtual_server at line 1, "
                                                 f"real_server at line 2, real_server at line 4"), errs
    # nesting as deep as any real file goes is fine
    assert load(VS.format(body=" real_server 10.1.0.1 80 {\n HTTP_GET {\n url {\n path /\n }\n }\n }")).virtual_servers


# ---------------------------------------------------------------- DPVS keepalived's own service keywords


def test_dpvs_keepalived_service_keywords_load_with_their_reason():
    """DPVS's keepalived (tools/keepalived check_parser.c) has a virtual server's vip_bind_dev, bps, limit_proportion
    and hash_target, and a top-level tunnel_group: a DPVS keepalived.conf using them did not load ("unknown
    keyword"), though the README says one loads as it is."""
    cfg = load("tunnel_group tg {\n tunnel_entry t1 {\n  kind ipip\n  remote 10.9.0.1\n }\n}\n"
               "virtual_server 10.0.0.1 80 {\n lb_algo conhash\n lb_kind FNAT\n vip_bind_dev dpdk0\n bps 1000\n"
               " limit_proportion 50\n hash_target sip\n real_server 10.1.0.1 80 {\n }\n}\n"
               "virtual_server 10.0.0.1 81 {\n hash_target sip\n real_server 10.1.0.1 81 {\n }\n}\n")
    notes = inactive_notices(cfg)
    for line, kw, reason in ((1, "tunnel_group", "no tunnel devices"), (10, "vip_bind_dev", "every interface"),
                             (11, "bps", "bandwidth limits are not implemented"),
                             (12, "limit_proportion", "bandwidth limits are not implemented"),
                             (18, "hash_target", "conhash's hash key, and lb_algo is wlc")):
        assert any(n.startswith(f"k.conf:{line}:") and f" {kw}: " in n and reason in n for n in notes), (kw, notes)
    assert not any(n.startswith("k.conf:13:") for n in notes), "conhash hashes the source address: sip acts"
    assert cfg.virtual_servers[0].hash_target == "sip"
    (err,) = refused(VS.format(body=" lb_algo conhash\n hash_target qid\n real_server 10.1.0.1 80 {\n }"))
    assert err.startswith("k.conf:3:14: hash_target: 'qid' (QUIC connection id) is not implemented")
