"""hdslb.conf parsing: golden configs load to known values, broken ones fail at a known file:line:col."""

import dataclasses
import errno
import ipaddress
import os
import re
from pathlib import Path

import pytest

from hdslb.config import ConfigError, check, diff, load, loads
from hdslb.config import model as m
from hdslb.config.schema import ROOT, Block, walk
from hdslb.errors import HdslbError

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
CONFIGS = Path(__file__).resolve().parent / "configs"
BROKEN = sorted((CONFIGS / "broken").glob("*.conf"))

ip = ipaddress.ip_address


def notices_by_keyword(cfg):
    out = {}
    for n in cfg.notices:
        out.setdefault(n.keyword, []).append(n.line)
    return out


# ---------------------------------------------------------------- golden: the seed's hdslb.conf, verbatim


@pytest.fixture(scope="module")
def seed():
    return load(str(CONF / "hdslb.conf"))


def test_seed_config_values(seed):
    assert seed.global_defs.log_level == "DEBUG"  # `log_level DEBUG # 方便调试`: the comment is stripped
    assert seed.global_defs.log_file is None  # commented out with `!`
    assert seed.netif_defs.interfaces == ("dpdk0",)
    dev = seed.netif_defs.device[0]
    assert (dev.rx.queue_number, dev.tx.queue_number, dev.promisc_mode) == (3, 3, False)
    assert seed.worker_defs.fastpath_cpus == frozenset({1})
    assert [(w.name, w.type, w.cpu_id) for w in seed.worker_defs.worker] == [("cpu0", "master", 0),
                                                                              ("cpu1", "slave", 1)]
    assert seed.neigh_defs == m.NeighDefs(unres_queue_length=128, timeout=60)
    assert seed.ipv4_defs.default_ttl == 64
    assert seed.ipv4_defs.fragment == m.FragmentPolicy(bucket_number=4096, bucket_entries=16, max_entries=4096,
                                                       ttl=1)
    assert seed.ipv6_defs.disable is False
    assert seed.ctrl_defs.ctl_socket == "/var/run/hdslb_ctrl"
    conn = seed.ipvs_defs.conn
    assert (conn.conn_pool_size, conn.conn_init_timeout, conn.expire_quiescent_template) == (2097152, 30, False)
    assert seed.ipvs_defs.udp.timeout == m.UdpTimeouts(normal=300, last=3)
    assert (seed.ipvs_defs.udp.uoa_mode, seed.ipvs_defs.udp.uoa_max_trail) == ("opp", 3)
    tcp = seed.ipvs_defs.tcp
    assert tcp.timeout.as_dict() == {"none": 2, "established": 90, "syn_sent": 3, "syn_recv": 30, "fin_wait": 7,
                                     "time_wait": 7, "close": 3, "close_wait": 7, "last_ack": 7, "listen": 120,
                                     "synack": 30, "last": 2}
    assert tcp.synproxy.synack_options == m.SynackOptions(mss=1452, ttl=63, sack=True, wscale=False,
                                                          timestamp=False)
    assert (tcp.synproxy.defer_rs_syn, tcp.synproxy.rs_syn_max_retry) == (False, 3)
    assert (tcp.synproxy.ack_storm_thresh, tcp.synproxy.max_ack_saved) == (10, 3)
    assert tcp.synproxy.conn_reuse_state == frozenset({"close", "time_wait"})
    assert seed.sa_pool.pool_hash_size == 16
    assert seed.virtual_servers == ()
    assert seed.files == (str(CONF / "hdslb.conf"),)


def test_seed_not_applicable_options_are_noticed_once_each(seed):
    assert notices_by_keyword(seed) == {
        "pktpool_size": [10], "pktpool_cache": [11],
        "descriptor_number": [15, 20],  # rx and tx
        "fdir": [22],  # one notice for the block, not one per option inside it
        "kni_name": [28],
        "worker": [42],  # the master lcore
        "port": [51, 57],
        "schedule_interval": [69],
        "forwarding": [80, 93],  # ipv4 and ipv6
        "route6": [94],
        "lcore_msg": [102],
        "conn_pool_cache": [116],
    }
    kni = next(n for n in seed.notices if n.keyword == "kni_name")
    assert "XDP_PASS to the kernel is the KNI" in kni.reason
    assert str(kni).startswith(f"{CONF / 'hdslb.conf'}:28: kni_name: XDP_PASS")


def test_seed_init_markers_are_recorded_per_option(seed):
    s = seed.settings
    assert s["netif_defs.pktpool_size"].marked_init
    assert s["netif_defs.device[dpdk0].rx.queue_number"].marked_init  # inherited from `<init> device`
    assert s["ipv6_defs.route6.method"].marked_init
    assert not s["ipv6_defs.route6.recycle_time"].marked_init
    assert not s["ipvs_defs.conn.conn_init_timeout"].marked_init
    assert s["ipvs_defs.conn.conn_pool_size"].marked_init and s["ipvs_defs.conn.conn_pool_size"].init_only
    assert s["ctrl_defs.ipc_msg.unix_domain"].needs_restart
    assert not s["netif_defs.pktpool_size"].applies and s["neigh_defs.timeout"].applies
    where = s["ipvs_defs.tcp.timeout.established"].where
    assert (where.line, where.col) == (137, 13)


# ---------------------------------------------------------------- golden: the samples


def test_single_nic_sample():
    cfg = load(str(CONF / "single-nic.conf"))
    assert cfg.notices == ()
    assert cfg.netif_defs.interfaces == ("eth0",)
    assert cfg.worker_defs.fastpath_cpus == frozenset({1, 2, 3})
    assert cfg.ipvs_defs.conn.conn_pool_size == 1048576
    assert cfg.ipvs_defs.tcp.timeout.established == 90
    assert cfg.ipvs_defs.tcp.timeout.listen == 120  # not written: DPVS's default
    assert [str(a) for a in cfg.local_address_groups["laddr_g1"].addresses] == [
        "192.168.100.200 eth0", "192.168.100.201 eth0", "192.168.100.202 eth0", "192.168.100.203 eth0"]
    vs = cfg.virtual_server("TCP", "192.168.100.254:80")
    assert (vs.lb_algo, vs.lb_kind, vs.delay_loop, vs.laddr_group_name) == ("wrr", "FNAT", 3.0, "laddr_g1")
    assert [(str(rs.ip), rs.port, rs.weight, rs.inhibit_on_failure) for rs in vs.real_servers] == [
        ("192.168.100.2", 80, 100, False), ("192.168.100.3", 80, 100, True)]
    chk = vs.real_servers[0].checkers[0]
    assert isinstance(chk, m.TcpCheck)
    assert (chk.connect_timeout, chk.retry, chk.delay_before_retry, chk.delay_loop) == (2.0, 2, 1.0, 3.0)
    assert chk.connect_ip is None and chk.connect_port is None


def test_two_arm_sample():
    cfg = load(str(CONF / "two-arm.conf"))
    assert cfg.netif_defs.interfaces == ("eth0", "eth1")
    assert cfg.netif_defs.device[0].promisc_mode and not cfg.netif_defs.device[1].promisc_mode
    assert cfg.worker_defs.fastpath_cpus == frozenset({1, 2, 3, 4})
    assert cfg.ctrl_defs.ctl_socket == "/run/hdslb/ctrl.sock"
    assert cfg.ipv6_defs.disable is True
    assert cfg.ipv4_defs.fragment == m.FragmentPolicy(4096, 16, 8192, 2)  # two written, two defaults
    assert cfg.ipvs_defs.udp.defence_udp_drop and cfg.ipvs_defs.tcp.defence_tcp_drop
    assert cfg.ipvs_defs.tcp.synproxy.synack_options == m.SynackOptions(1452, 63, True, True, True)
    assert len(cfg.local_address_groups["laddr_lan"].addresses) == 16
    web = cfg.virtual_server("TCP", "203.0.113.10:80")
    assert (web.lb_algo, web.syn_proxy, web.establish_timeout) == ("mh", True, 600)
    http = web.real_servers[0].checkers[0]
    assert isinstance(http, m.HttpCheck) and http.kind == "HTTP_GET"
    assert http.retry == 3  # spelled nb_get_retry
    assert http.url == (m.HttpUrl("/healthz", ((200, 200),), None),)
    dns = cfg.virtual_server("udp", "203.0.113.10:53")
    assert dns.ops and dns.protocol == "UDP"
    udp = dns.real_servers[0].checkers[0]
    assert isinstance(udp, m.UdpCheck)
    assert udp.payload[12:20] == b"\x07example" and udp.require_reply == b""


def test_keepalived_sample():
    cfg = load(str(CONF / "keepalived-lb.conf"))
    assert set(notices_by_keyword(cfg)) == {"router_id", "notification_email", "notification_email_from",
                                            "smtp_server", "smtp_connect_timeout", "vrrp_instance", "kni_name"}
    assert cfg.global_defs.script_user == "nobody" and cfg.global_defs.enable_script_security
    assert [str(v) for v in cfg.virtual_servers] == ["group web/TCP", "198.51.100.10:443/TCP",
                                                     "[2001:db8::10]:80/TCP", "198.51.100.11:53/UDP"]
    web = cfg.virtual_servers[0]
    assert (web.lb_algo, web.lb_kind) == ("wlc", "FNAT")  # lvs_sched / lvs_method
    assert [str(e) for e in cfg.endpoints(web)] == ["198.51.100.10:80", "198.51.100.11:80"]
    assert (web.persistence_timeout, web.persistence_granularity) == (300, 24)
    assert (web.alpha, web.omega, web.quorum, web.hysteresis) == (True, True, 2, 1)
    assert web.quorum_up == m.NotifyScript("/usr/local/bin/vip-up web")
    assert web.sorry_server == m.Endpoint(ip("10.10.16.250"), 8080)
    assert (web.daddr_group_name, web.syn_proxy) == ("blocked", True)
    rs = web.real_servers[0]
    assert (rs.uthreshold, rs.lthreshold, rs.inhibit_on_failure) == (20000, 15000, True)
    http = rs.checkers[0]
    assert http.virtualhost == "www.example.com"  # inherited from the virtual_server
    assert http.url[0].digest == "9b3a0c85a887a256d6939da88aabd8cd"
    assert http.url[1].accepts(304) and http.url[1].accepts(204) and not http.url[1].accepts(302)
    assert http.url[0].accepts(200) and not http.url[0].accepts(404)  # no status_code: any 2xx
    assert [str(n) for n in cfg.deny_address_groups["blocked"].networks] == [
        "192.0.2.0/24", "203.0.113.7/32", "203.0.113.100/30", "203.0.113.104/29", "203.0.113.112/29"]
    https = cfg.virtual_servers[1]
    assert https.real_servers[0].checkers[0].kind == "SSL_GET" and https.waddr_group_name == "partners"
    v6 = cfg.virtual_servers[2]
    assert v6.ip.version == 6 and v6.real_servers[0].ip.version == 4
    dns = cfg.virtual_servers[3]
    assert dns.lb_kind == "TUNNEL"  # keepalived's TUN
    misc = dns.real_servers[0].checkers[0]
    assert isinstance(misc, m.MiscCheck)
    assert misc.misc_path == "/usr/bin/dig +time=1 +tries=1 @10.10.17.1 example.com"
    assert (misc.misc_timeout, misc.misc_dynamic, misc.delay_loop) == (3.0, True, 5.0)


# ---------------------------------------------------------------- broken inputs


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_config_fails_at_the_expected_place(path, monkeypatch):
    # Each file's first line says what the first error must be: `! expect: FILE:LINE:COL: KEYWORD: reason…`.
    monkeypatch.chdir(path.parent)
    expected = path.read_text(encoding="utf-8").splitlines()[0].split("expect: ", 1)[1].strip()
    with pytest.raises(ConfigError) as ei:
        load(path.name)
    assert str(ei.value).startswith(expected)
    e = ei.value
    file, line, col, keyword = re.match(r"([^:]+):(\d+):(\d+): ([^:]+):", expected).groups()
    assert (e.file, e.line, e.col, e.keyword) == (file, int(line), int(col), keyword)
    assert isinstance(e, HdslbError) and e.errno == errno.EINVAL


def test_include_cycle_is_detected():
    with pytest.raises(ConfigError) as ei:
        load(str(CONFIGS / "cycle" / "a.conf"))
    e = ei.value
    assert (Path(e.file).name, e.line, e.col, e.keyword) == ("b.conf", 2, 9, "include")
    assert e.reason == "include cycle: a.conf -> b.conf -> a.conf"


def test_check_reports_every_error_and_load_raises_the_first(tmp_path):
    f = tmp_path / "two-errors.conf"
    f.write_text("virtual_server 10.0.0.1 80 {\n"
                 "    lb_algo bogus\n"
                 "    real_server 10.0.0.2 80 {\n"
                 "        weight -1\n"
                 "    }\n"
                 "}\n"
                 "frobnicate yes\n")
    problems = check(str(f))
    assert [p.split(": ", 2)[:2] for p in problems] == [
        [f"{f}:2:13", "lb_algo"], [f"{f}:4:16", "weight"], [f"{f}:7:1", "frobnicate"]]
    with pytest.raises(ConfigError) as ei:
        load(str(f))
    assert str(ei.value) == problems[0] and len(ei.value.errors) == 3
    assert check(str(CONF / "keepalived-lb.conf")) == []
    assert check(str(tmp_path / "absent.conf"))[0].endswith("file: cannot read: No such file or directory")


# ---------------------------------------------------------------- include


def test_include_resolves_relative_to_the_including_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near the files: paths must not depend on the cwd
    main = CONFIGS / "include" / "main.conf"
    cfg = load(str(main))
    assert cfg.global_defs.log_level == "NOTICE"
    assert [str(v) for v in cfg.virtual_servers] == ["10.0.0.1:80/TCP", "10.0.0.1:53/UDP"]
    assert cfg.virtual_servers[0].where.file.endswith("services/10-web.conf")
    assert [os.path.basename(f) for f in cfg.files] == ["main.conf", "laddr.conf", "10-web.conf", "20-dns.conf"]


def test_include_inside_a_block_and_from_loads(tmp_path):
    (tmp_path / "rs.conf").write_text("real_server 10.0.0.2 80 {\n    weight 7\n}\n")
    text = "virtual_server 10.0.0.1 80 {\n    include rs.conf\n}\n"
    cfg = loads(text, name="inline", base_dir=str(tmp_path))
    assert cfg.virtual_servers[0].real_servers[0].weight == 7
    with pytest.raises(ConfigError) as ei:
        loads(text.replace("rs.conf", "rs.conf extra"), base_dir=str(tmp_path))
    assert str(ei.value) == "<string>:2:5: include: expects exactly one file name or glob"


def _vs_file(path, ip):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"virtual_server {ip} 80 {{\n    real_server 10.9.0.1 80 {{\n    }}\n}}\n")


def test_include_glob_skips_directories_and_executables_with_a_notice(tmp_path):
    # keepalived's read_conf_file: what a glob matches that is a directory, or not a regular non-executable file,
    # is skipped; here each skip is a notice (`check`, start, reload), not a refusal of the whole file
    _vs_file(tmp_path / "conf.d" / "10-web.conf", "10.0.0.1")
    (tmp_path / "conf.d" / "old").mkdir()
    (tmp_path / "conf.d" / "old" / "x.conf").write_text("frobnicate yes\n")
    script = tmp_path / "conf.d" / "gen.sh"
    script.write_text("#!/bin/sh\necho 'virtual_server 10.0.0.9 80 {'\n")
    script.chmod(0o755)
    os.mkfifo(tmp_path / "conf.d" / "pipe")
    main = tmp_path / "main.conf"
    main.write_text("! services\ninclude conf.d/*\n")
    cfg = load(str(main))
    assert [str(v) for v in cfg.virtual_servers] == ["10.0.0.1:80/TCP"]
    assert [os.path.basename(f) for f in cfg.files] == ["main.conf", "10-web.conf"]
    skipped = [str(n) for n in cfg.notices]
    assert skipped == [f"{main}:2: include: skipped {tmp_path}/conf.d/{name}: {why} (as keepalived does; only "
                       f"regular, non-executable files are read)"
                       for name, why in (("gen.sh", "is executable"), ("old", "is a directory"),
                                         ("pipe", "is not a regular file"))]
    from hdslb.config.apply import inactive_notices
    assert inactive_notices(cfg)[:3] == skipped  # what `hdslb-ctl check` prints as notices


def test_include_of_a_named_directory_or_executable_is_an_error_at_its_line(tmp_path):
    (tmp_path / "conf.d").mkdir()
    script = tmp_path / "gen.sh"
    script.write_text("virtual_server 10.0.0.9 80 {\n}\n")
    script.chmod(0o700)
    main = tmp_path / "main.conf"
    main.write_text("global_defs {\n}\n  include conf.d\n")
    with pytest.raises(ConfigError) as ei:
        load(str(main))
    assert str(ei.value) == (f"{main}:3:11: include: {tmp_path}/conf.d is a directory: keepalived reads only "
                             f"regular, non-executable files as config; include the files in it (`include "
                             f"conf.d/*.conf`)")
    main.write_text("include gen.sh\n")
    with pytest.raises(ConfigError) as ei:
        load(str(main))
    assert str(ei.value).startswith(f"{main}:1:9: include: {tmp_path}/gen.sh is executable:")


def test_include_expands_braces_as_glob_brace(tmp_path):
    for name, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("web/1", "10.0.0.3"), ("web/2", "10.0.0.4"),
                     ("db/1", "10.0.0.5"), ("other/1", "10.0.0.6"), ("c", "10.0.0.7")):
        _vs_file(tmp_path / f"{name}.conf", ip)
    main = tmp_path / "main.conf"
    # the alternatives in the order written, each one's matches sorted; a missing alternative is no error
    main.write_text("include {b,a,missing}.conf\ninclude {web,db}/*.conf ! a comment ends it\n")
    cfg = load(str(main))
    assert [str(v.ip) for v in cfg.virtual_servers] == ["10.0.0.2", "10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"]
    # nested, with an empty alternative (keepalived.conf(5)'s `{foo/{,cat,dog},bar}`); `web/` is a directory
    main.write_text("include {web/{,1.conf},c.conf}\n")
    cfg = load(str(main))
    assert [str(v.ip) for v in cfg.virtual_servers] == ["10.0.0.3", "10.0.0.7"]
    assert [n.reason.split(":")[0] for n in cfg.notices] == [f"skipped {tmp_path}/web/"]
    # inside a block on one line, and before a `;`, the braces are still the block's
    (tmp_path / "rs.conf").write_text("real_server 10.1.0.1 80 {\n    weight 4\n}\n")
    (tmp_path / "rs2.conf").write_text("real_server 10.1.0.2 80 {\n    weight 5\n}\n")
    cfg = loads("virtual_server 10.0.0.8 80 { include rs{,2}.conf }\nvirtual_server 10.0.0.9 80 {\n"
                "    include rs.conf; lb_algo rr\n}\n", base_dir=str(tmp_path))
    assert [(str(rs.ip), rs.weight) for rs in cfg.virtual_servers[0].real_servers] == [("10.1.0.1", 4),
                                                                                       ("10.1.0.2", 5)]
    assert cfg.virtual_servers[1].lb_algo == "rr"


def test_include_with_an_unclosed_brace_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as ei:
        loads("global_defs {\n}\ninclude conf.d/{web,db/*.conf\n", name="t.conf", base_dir=str(tmp_path))
    assert str(ei.value) == "t.conf:3:9: include: 'conf.d/{web,db/*.conf': '{' without a matching '}'"


# ---------------------------------------------------------------- syntax and values


def test_syntax_variants():
    cfg = loads("""
virtual_server 10.0.0.1 80
{                                   # keepalived allows the brace on the next line
    lb_kind fnat; lb_algo RR        ! `;` separates, values are case-insensitive
    real_server 10.0.0.2 80 { weight 0 }
    real_server 10.0.0.3 80 {
        HTTP_GET { url { path /a\\#b#c
        } }
    }
    persistence_timeout
}
virtual_server match out { lb_kind SNAT; src-range 192.168.1.1-192.168.1.9; real_server 10.0.0.9 0 { } }
""")
    vs, snat = cfg.virtual_servers
    assert (vs.lb_kind, vs.lb_algo, vs.persistence_timeout) == ("FNAT", "rr", 360)
    assert vs.real_servers[0].weight == 0
    # as in keepalived, `#` starts a comment even inside a word; `\#` is the character itself
    assert vs.real_servers[1].checkers[0].url[0].path == "/a#b"
    assert snat.key == ("TCP", "match out") and snat.src_range == "192.168.1.1-192.168.1.9"
    assert snat.real_servers[0].port == 0


def test_dpvs_inline_range_comments_are_comments():
    """dpvs.conf's own header: 'inline range comment: using < and >, put comment in between' (its items file writes
    `queue_number 6 <16, 0-16>`). hdslb read them as extra values and refused the line; `<init>` stays a marker,
    a quoted "<x>" a value, and a `<` whose `>` never comes on its line is an error there."""
    cfg = loads("netif_defs {\n    <init> device eth0 {\n        rx {\n            queue_number 6 <16, 0-16>\n"
                "        }\n    }\n}\nneigh_defs {\n    <init> unres_queue_length 64 <128, 16-8192>\n"
                "    timeout <60, 1-3600> 30\n}\nglobal_defs {\n    log_level INFO <none>\n    log_file \"/tmp/<x>\"\n}\n")
    assert cfg.netif_defs.device[0].rx.queue_number == 6
    assert (cfg.neigh_defs.unres_queue_length, cfg.neigh_defs.timeout) == (64, 30)
    assert cfg.settings["neigh_defs.unres_queue_length"].marked_init
    assert (cfg.global_defs.log_level, cfg.global_defs.log_file) == ("INFO", "/tmp/<x>")
    with pytest.raises(ConfigError, match=r"<string>:2:16: <: unterminated"):
        loads("neigh_defs {\n    timeout 30 <60, 1-3600\n}\n")


@pytest.mark.parametrize("text,where", [
    ("neigh_defs {{\n timeout {n}\n}}\n", "2:10"),
    ("virtual_server 10.0.0.1 {n} {{\n}}\n", "1:25"),
    ("virtual_server 10.0.0.1 80 {{\n persistence_granularity {n}\n}}\n", "2:26"),
    ("worker_defs {{\n worker a {{\n type slave\n cpu_id 1\n port eth0 {{\n rx_queue_ids 1,{n}\n }}\n }}\n}}\n", "6:15"),
])
def test_a_number_of_thousands_of_digits_is_out_of_range_not_a_crash(text, where):
    """Python refuses to read an integer of more than 4300 digits (ValueError, not a refusal): check, a start and
    a reload died with a traceback instead of naming the line (a SIGHUP reload's exception was never retrieved)."""
    with pytest.raises(ConfigError) as e:
        loads(text.format(n="9" * 5000), "t.conf")
    assert str(e.value).startswith(f"t.conf:{where}:") and "out of range" in str(e.value)
    assert len(str(e.value)) < 300  # the value is not echoed whole


@pytest.mark.parametrize("mask", ["0.0.0.255", "0.0.255.255", "255.0.255.0"])
def test_persistence_granularity_is_a_mask_of_ones_then_zeros(mask):
    """A host mask (0.0.0.255) was read as the /24 it is the inverse of (ipaddress takes either), where ipvsadm -M,
    REST and the model refuse it: refused, naming the line."""
    with pytest.raises(ConfigError) as e:
        loads(f"virtual_server 10.0.0.1 80 {{\n persistence_granularity {mask}\n}}\n", "t.conf")
    assert str(e.value).startswith("t.conf:2:26: persistence_granularity:") and mask in str(e.value)
    good = loads("virtual_server 10.0.0.1 80 {\n persistence_granularity 255.255.254.0\n}\n", "t.conf")
    assert good.virtual_servers[0].persistence_granularity == 23


V6_VS = """virtual_server 2001:db8::100 80 {{
    lb_algo rr
    lb_kind DR
    persistence_timeout 300
    persistence_granularity {g}
    real_server 2001:db8::2 80 {{
        weight 1
    }}
}}
"""


@pytest.mark.parametrize("g, why", [("255.255.255.0", "takes a prefix length 1..128, not an IPv4 netmask"),
                                    ("0", "0 is not an IPv6 prefix length 1..128")])
def test_an_ipv6_virtual_server_takes_a_prefix_length_for_its_granularity(g, why):
    """keepalived's pgr_handler reads an IPv6 virtual server's persistence_granularity as a prefix length 1..128. A
    dotted netmask there (a block copied from an IPv4 service) was taken as /24 of IPv6: nearly every client in one
    template, so every IPv6 client on one real server. Refused naming the line, for a group's IPv6 member too."""
    from hdslb.config.apply import desired
    from hdslb.errors import HdslbError

    with pytest.raises(ConfigError) as e:
        loads(V6_VS.format(g=g), "t.conf")
    assert str(e.value).startswith("t.conf:5:29: persistence_granularity:") and why in str(e.value)
    cfg = loads(V6_VS.format(g="64"), "t.conf")
    assert [s.netmask for s in desired(cfg, lambda ip: "eth0").values()] == ["64"]
    group = """virtual_server_group g {{\n    10.0.0.1 80\n    2001:db8::100 80\n}}
virtual_server group g {{\n    lb_kind FNAT\n    persistence_granularity {g}
    real_server 192.168.1.2 80 {{\n        weight 1\n    }}\n}}\n"""
    cfg = loads(group.format(g="255.255.255.0"), "t.conf")
    with pytest.raises(HdslbError) as e:
        desired(cfg, lambda ip: "eth0")
    assert e.value.message.startswith("t.conf:5:") and "not an IPv4 netmask (member 2001:db8::100)" in e.value.message
    want = desired(loads(group.format(g="24"), "t.conf"), lambda ip: "eth0")
    assert sorted(str(s.netmask) for s in want.values()) == ["24", "255.255.255.0"]


def test_address_ranges():
    cfg = loads("""
virtual_server_group g6 {
    2001:db8::fe-101 443
}
local_address_group lg {
    10.0.0.1-10.0.0.3
}
""")
    assert [str(e) for e in cfg.virtual_server_groups["g6"].members] == [
        "[2001:db8::fe]:443", "[2001:db8::ff]:443", "[2001:db8::100]:443", "[2001:db8::101]:443"]
    assert [str(a.ip) for a in cfg.local_address_groups["lg"].addresses] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    for entry, why in (("10.0.0.9-3 80", "end before start"), ("10.0.0.0-10.1.0.1 80", "more than 65536"),
                       ("10.0.0.1 80 eth0", "expects `IP PORT`"), ("10.0.0.1 80 {\n}", "takes no '{ }' block")):
        with pytest.raises(ConfigError, match=re.escape(why)):
            loads("virtual_server_group g {\n    " + entry + "\n}\n")


def test_flags_take_explicit_on_off_and_nothing_else():
    cfg = loads("ipvs_defs { tcp { synproxy { synack_options { sack off\n wscale on } } } }")
    assert (cfg.ipvs_defs.tcp.synproxy.synack_options.sack, cfg.ipvs_defs.tcp.synproxy.synack_options.wscale) \
        == (False, True)
    with pytest.raises(ConfigError, match="'maybe' is not on or off"):
        loads("virtual_server 10.0.0.1 80 {\n alpha maybe\n}")


def test_defaults_when_sections_are_absent():
    cfg = loads("")
    assert cfg.netif_defs.interfaces == () and cfg.worker_defs.fastpath_cpus == frozenset()
    assert cfg.ctrl_defs.ctl_socket == "/var/run/hdslb_ctrl"
    assert cfg.ipvs_defs.tcp.synproxy.conn_reuse_state == frozenset({"close", "time_wait"})
    assert cfg.ipvs_defs.conn.conn_pool_size == 2097152
    vs = loads("virtual_server 10.0.0.1 80 {\n real_server 10.0.0.2 80 {\n TCP_CHECK {\n }\n }\n}").virtual_servers[0]
    assert (vs.lb_algo, vs.lb_kind, vs.protocol, vs.delay_loop) == ("wlc", "NAT", "TCP", 60.0)
    assert vs.real_servers[0].weight == 1 and vs.real_servers[0].checkers[0].connect_timeout == 5.0


def test_semantic_rules():
    cases = [
        ("virtual_server 10.0.0.1 80 {\n protocol SCTP\n}", "2:11: protocol: 'SCTP' is not handled"),
        ("virtual_server 10.0.0.1 80 {\n ops\n}", "2:2: ops: one-packet scheduling is for protocol UDP"),
        ("virtual_server 10.0.0.1 53 {\n protocol UDP\n syn_proxy\n}", "3:2: syn_proxy: needs protocol TCP"),
        ("virtual_server 10.0.0.1 80 {\n lb_kind DR\n real_server 10.0.0.2 8080 {\n }\n}",
         "3:2: real_server: DR cannot rewrite ports"),
        ("virtual_server 10.0.0.1 80 {\n real_server 10.0.0.2 80 {\n uthreshold 5\n lthreshold 9\n }\n}",
         "4:13: lthreshold: 9 is above uthreshold 5"),
        ("virtual_server 10.0.0.1 80 {\n establish_timeout 7200\n}", "2:20: establish_timeout: 7200 is out"),
        ("worker_defs {\n worker a {\n type slave\n cpu_id 2\n }\n worker b {\n type slave\n cpu_id 2\n }\n}",
         "6:2: cpu_id: cpu 2 is already used by worker a"),
        ("virtual_server group nope {\n}", "1:22: virtual_server: no virtual_server_group named 'nope'"),
        ("local_address_group lg {\n 10.0.0.1\n 10.0.0.1\n}", "3:2: 10.0.0.1: 10.0.0.1 is listed twice"),
        ("netif_defs {\n device this-name-is-too-long {\n }\n}", "2:9: device: 'this-name-is-too-long'"),
        ("ipvs_defs {\n tcp {\n synproxy {\n conn_reuse_state {\n established\n }\n }\n }\n}",
         "5:2: established: 'established' is not one of close|"),
        ("<init>\nglobal_defs {\n}", "1:1: <init>: must be followed by an option"),
        ("global_defs {\n log_level 3 <init>\n}", "2:14: <init>: must come first on its line"),
        ("global_defs\n", "1:1: global_defs: needs a '{ … }' block"),
        ("virtual_server 10.0.0.1 80 {\n real_server 10.0.0.2 80 {\n HTTP_GET {\n url {\n digest 12\n }\n }\n }\n}",
         "5:9: digest: '12' is not an md5 digest"),
    ]
    for text, expected in cases:
        with pytest.raises(ConfigError) as ei:
            loads(text)
        assert str(ei.value).startswith("<string>:" + expected), (text, str(ei.value))


# ---------------------------------------------------------------- reload diff

OLD = """
ipvs_defs {
    conn {
        <init> conn_pool_size 1048576
    }
    tcp {
        timeout {
            established 90
        }
    }
}
local_address_group lg {
    10.0.1.1
    10.0.1.2
}
virtual_server 10.0.0.1 80 {
    lb_kind FNAT
    laddr_group_name lg
    real_server 10.0.0.11 80 {
        weight 1
    }
    real_server 10.0.0.12 80 {
        weight 1
    }
}
virtual_server 10.0.0.1 443 {
    lb_kind FNAT
}
"""


def test_diff_reports_what_a_reload_changes():
    new_text = (OLD.replace("conn_pool_size 1048576", "conn_pool_size 2097152")
                   .replace("established 90", "established 300")
                   .replace("    10.0.1.2\n", "    10.0.1.3\n")
                   .replace("real_server 10.0.0.12 80 {\n        weight 1", "real_server 10.0.0.12 80 {\n        weight 5")
                   .replace("virtual_server 10.0.0.1 443 {\n    lb_kind FNAT\n}", "virtual_server 10.0.0.1 53 {\n"
                            "    protocol UDP\n}")
                   .replace("    lb_kind FNAT\n    laddr_group_name lg\n", "    lb_kind FNAT\n    lb_algo rr\n"
                            "    laddr_group_name lg\n    real_server 10.0.0.13 80 {\n    }\n"))
    old, new = loads(OLD), loads(new_text)
    d = diff(old, new)
    assert [str(v) for v in d.vs_added] == ["10.0.0.1:53/UDP"]
    assert [str(v) for v in d.vs_removed] == ["10.0.0.1:443/TCP"]
    assert [(a.lb_algo, b.lb_algo) for a, b in d.vs_changed] == [("wlc", "rr")]
    assert [(k, str(rs.ip)) for k, rs in d.rs_added] == [(("TCP", "10.0.0.1:80"), "10.0.0.13")]
    assert d.rs_removed == ()
    assert [(str(a.ip), a.weight, b.weight) for _, a, b in d.rs_changed] == [("10.0.0.12", 1, 5)]
    assert [(g, str(la)) for g, la in d.laddr_added] == [("lg", "10.0.1.3")]
    assert [(g, str(la)) for g, la in d.laddr_removed] == [("lg", "10.0.1.2")]
    assert [(c.path, c.old, c.new) for c in d.options_changed] == [
        ("ipvs_defs.tcp.timeout.established", 90, 300)]
    assert [(c.path, c.old, c.new) for c in d.init_changed] == [
        ("ipvs_defs.conn.conn_pool_size", 1048576, 2097152)]
    assert d.restart_needed
    assert diff(old, loads(OLD)).empty


def test_diff_restart_follows_init_marks_and_the_table():
    a = loads("ipvs_defs {\n udp {\n <init> uoa_max_trail 3\n }\n}\nneigh_defs {\n timeout 60\n}")
    b = loads("ipvs_defs {\n udp {\n uoa_max_trail 4\n }\n}\nneigh_defs {\n timeout 30\n}")
    d = diff(a, b)
    # uoa_max_trail is live in the table but was written `<init>`; neigh timeout is init-only in the table.
    assert sorted(c.path for c in d.init_changed) == ["ipvs_defs.udp.uoa_max_trail", "neigh_defs.timeout"]
    assert d.options_changed == ()


def test_diff_sees_a_changed_virtual_server_group():
    a = loads("virtual_server_group g {\n 10.0.0.1 80\n}\nvirtual_server group g {\n}")
    b = loads("virtual_server_group g {\n 10.0.0.1 80\n 10.0.0.2 80\n}\nvirtual_server group g {\n}")
    assert [str(x) for x, _ in diff(a, b).vs_changed] == ["group g/TCP"]


def test_moving_a_block_is_not_a_change():
    a = loads("virtual_server 10.0.0.1 80 {\n}\nvirtual_server 10.0.0.2 80 {\n}")
    b = loads("\n\nvirtual_server 10.0.0.2 80 {\n}\n! moved\nvirtual_server 10.0.0.1 80 {\n}")
    assert diff(a, b).empty


# ---------------------------------------------------------------- the keyword table itself


def test_every_keyword_is_mapped_or_explained():
    for path, spec in walk():
        if spec.na is not None:
            assert len(spec.na) > 20, path  # a reason a person can act on, not a placeholder
        if isinstance(spec, Block) and spec.opaque:
            assert spec.na, path


def test_table_fields_match_the_dataclasses():
    def visit(block, path):
        if block.build is not None and dataclasses.is_dataclass(block.build) and block.entries is None:
            names = {f.name for f in dataclasses.fields(block.build)}
            # script_security: MiscCheck's copy of global_defs enable_script_security, set by the health manager;
            # tls: an SSL_GET's copy of the top-level SSL block, set by the loader
            given = set(block.fixed) | {"where", "ip", "port", "group", "name", "match", "script_security", "tls"}
            filled = set()
            for kw, child in block.children.items():
                if child.na or (isinstance(child, Block) and child.build is None):
                    continue
                fname = child.field or kw
                assert fname in names, f"{path}.{kw} fills {block.build.__name__}.{fname}, which does not exist"
                filled.add(fname)
            missing = names - filled - given
            assert not missing, f"{block.build.__name__} fields no keyword fills: {missing}"
        for kw, child in block.children.items():
            if isinstance(child, Block):
                visit(child, f"{path}.{kw}")

    visit(ROOT, "")
    top = {f.name for f in dataclasses.fields(m.Config)} - {"source", "files", "notices", "settings", "text"}
    assert top == {c.field or kw for kw, c in ROOT.children.items()
                   if not (isinstance(c, Block) and c.build is None)}


# Keywords of DPVS's own dpvs.conf (its conf/dpvs.conf.items and samples) beyond the seed's HDSLB file, written
# here as an operator coming from DPVS has them. DPVS's parser skips what it does not know; hdslb refuses unknown
# keywords so a typo cannot pass, and so used to refuse these as "unknown keyword": a dpvs.conf did not load.
DPVS_ONLY = """global_defs {
    <init> pdump off
    kni on
    daemon
}
netif_defs {
    <init> fdir_mode perfect
    <init> device eth0 {
        rx {
            max_burst_size 32
        }
        fdir {
            <init> filter on
            mode perfect_mac_vlan
        }
        tx {
            <init> mbuf_fast_free on
        }
        allmulticast
    }
    <init> bonding bond0 {
        slave eth0
        options dedicated_queues=off
    }
}
worker_defs {
    <init> worker cpu1 {
        type slave
        cpu_id 1
        icmp_redirect_core
    }
    <init> worker cpu5 {
        type kni
        cpu_id 5
    }
}
ipset_defs {
    <init> ipset_hash_pool_size 131072
}
ipv6_defs {
    addr_gen_mode stable-privacy
    stable_secret 2001:db8::1
    route6 {
        recycle_time 36000
        lpm {
            <init> lpm6_max_rules 1024
            <init> lpm6_num_tbl8s 65536
            <init> rt6_array_size 65536
            <init> rt6_hash_bucket 256
        }
    }
}
ctrl_defs {
    lcore_msg {
        bucket_number 256
    }
}
ipvs_defs {
    tcp {
        synproxy {
            close_client_window
        }
    }
}
sa_pool {
    flow_enable on
}
"""


def test_dpvs_own_keywords_load_with_the_reason_they_do_nothing():
    from hdslb.config.apply import inactive_notices

    cfg = loads(DPVS_ONLY, "dpvs.conf")
    assert cfg.netif_defs.interfaces == ("eth0",) and cfg.worker_defs.fastpath_cpus == frozenset({1})
    said = {n.keyword: n.line for n in cfg.notices}

    def line_of(*words):  # the line whose statement starts with these words (`<init>` aside)
        return next(i for i, ln in enumerate(DPVS_ONLY.splitlines(), 1)
                    if ln.replace("<init>", "").split()[:len(words)] == list(words))

    for kw in ("pdump", "kni", "daemon", "fdir_mode", "max_burst_size", "fdir", "mbuf_fast_free", "allmulticast",
               "bonding", "icmp_redirect_core", "ipset_defs", "addr_gen_mode", "stable_secret", "route6",
               "lcore_msg", "close_client_window", "flow_enable"):
        assert said.get(kw) == line_of(kw), (kw, said.get(kw))
    lines = inactive_notices(cfg)
    assert any(x.startswith(f"dpvs.conf:{line_of('type', 'kni')}:9: type: accepted, not acted on") for x in lines)
    # still type-checked: a bad value is refused at its line
    with pytest.raises(ConfigError, match=rf"dpvs.conf:{line_of('fdir_mode')}:22: fdir_mode: 'exact' is not one of"):
        loads(DPVS_ONLY.replace("fdir_mode perfect", "fdir_mode exact"), "dpvs.conf")
    with pytest.raises(ConfigError, match=rf"dpvs.conf:{line_of('flow_enable')}:5: flow_enabel: unknown keyword in "
                                          rf"sa_pool; did you mean"):
        loads(DPVS_ONLY.replace("flow_enable", "flow_enabel"), "dpvs.conf")


def test_samples_stay_in_the_repo():
    # conf/hdslb.conf is the seed document's config, verbatim; guard against "tidying" it.
    text = (CONF / "hdslb.conf").read_text(encoding="utf-8")
    assert "log_level   DEBUG # 方便调试" in text and "           }\n" in text
