"""Real keepalived.conf files, as operators have them (configs/real/: keepalived's doc/samples, DPVS's docs and
other public repositories, each naming its source in its first line), pointed at hdslb's loader.

Each one either loads, with the services, real servers and checks keepalived would build from it (spot checked),
or is refused at the FILE:LINE of the keyword hdslb cannot honour, with the reason. Nothing in them is dropped
in silence: whatever loads but does nothing here is in the notices, at its line."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest

from hdslb.config import ConfigError
from hdslb.config.apply import inactive_notices
from hdslb.config.loader import check, load

REAL = Path(__file__).parent / "configs" / "real"
HEADER = 2  # the lines each fixture's source header adds in front of the quoted file
ID = "lb1"  # the config id (keepalived -i) the files are read with, unless a test says otherwise


def cfg(name, **kw):
    return load(str(REAL / name), config_id=kw.get("config_id", ID))


def errors(name, **kw):
    return [e.replace(str(REAL) + "/", "") for e in check(str(REAL / name), config_id=kw.get("config_id", ID))]


def notices(c):
    return [n.replace(str(REAL) + "/", "") for n in inactive_notices(c)]


def one_vs(c):
    assert len(c.virtual_servers) == 1
    return c.virtual_servers[0]


def endpoints(vs):
    return [(str(rs.ip), rs.port, rs.weight) for rs in vs.real_servers]


def test_every_fixture_names_its_source_and_is_tested():
    names = sorted(p.name for p in REAL.iterdir())
    assert len(names) >= 20
    for p in REAL.iterdir():
        head = p.read_text(encoding="utf-8").splitlines()[:HEADER]
        assert head[0].startswith("# Source: ") and ", " in head[0], p.name
    assert set(names) == set(LOADS) | set(REFUSED)


# ---------------------------------------------------------------- files that load


def _sample(c):
    vs = one_vs(c)
    assert (vs.key, vs.lb_kind, vs.lb_algo, vs.persistence_timeout, vs.delay_loop) == \
        (("TCP", "10.10.10.2:1358"), "NAT", "rr", 50, 6.0)
    assert str(vs.sorry_server) == "192.168.200.200:1358"
    assert endpoints(vs) == [("192.168.200.2", 1358, 1)]
    (http,) = vs.real_servers[0].checkers
    assert (http.kind, http.connect_timeout, http.retry, http.delay_before_retry) == ("HTTP_GET", 3.0, 3, 3.0)
    assert [(u.path, u.digest) for u in http.url] == [("/testurl3/test.jsp", "640205b7b0fc66c1ea91c463fac6334d")]


def _inhibit(c):
    rs = one_vs(c).real_servers[0]
    assert rs.inhibit_on_failure and rs.checkers[0].url[0].path == "/testurl3/test.jsp"


def _misc_check(c):
    (misc,) = one_vs(c).real_servers[0].checkers
    # `!         misc_dynamic` is a comment; misc_timeout defaults to the service's delay_loop, as in keepalived
    assert (misc.kind, misc.misc_path, misc.misc_dynamic, misc.misc_timeout, misc.retry) == \
        ("MISC_CHECK", "/usr/local/bin/script.sh", False, 6.0, 0)  # keepalived: a failed script takes it out


def _misc_check_arg(c):
    vs = one_vs(c)
    assert vs.real_servers[0].checkers[0].misc_path == "/usr/local/bin/script.sh arg1 arg2"
    assert "keepalived.conf.misc_check_arg:19: nat_mask: keepalived never used it (LVS NAT needs no mask) and " \
           "dropped it in 2.0" in notices(c)


def _virtualhost(c):
    vs = one_vs(c)
    (ssl,) = vs.real_servers[0].checkers
    # the virtual_server's virtualhost (the `# The VirtualHost …` comment cut off) flows into its SSL_GET
    assert vs.virtualhost == "www.firewall.loc" and ssl.kind == "SSL_GET" and ssl.virtualhost == "www.firewall.loc"
    assert [u.path for u in ssl.url] == ["/", "/mrtg/"] and ssl.retry == 3  # nb_get_retry


def _http_get_port(c):
    (ssl,) = one_vs(c).real_servers[0].checkers
    assert (ssl.kind, ssl.connect_port) == ("SSL_GET", 444)


def _status_code(c):
    (ssl,) = one_vs(c).real_servers[0].checkers
    assert [(u.path, u.status_code, u.digest) for u in ssl.url] == [
        ("/", ((200, 200),), None), ("/mrtg/", ((200, 200),), "9b3a0c85a887a256d6939da88aabd8cd")]


def _ssl_get(c):
    https, http = c.virtual_servers
    assert (https.key, http.key) == (("TCP", "192.168.200.100:443"), ("TCP", "192.168.200.100:80"))
    assert https.real_servers[0].checkers[0].kind == "SSL_GET"
    assert http.real_servers[0].checkers[0].kind == "HTTP_GET"
    assert any(": vrrp_instance: VRRP is not part of hdslb" in n for n in notices(c))


def _udp_check(c):
    vs = one_vs(c)
    assert vs.protocol == "UDP" and vs.real_servers[0].checkers[0].kind == "UDP_CHECK"


def _quorum(c):
    vs = one_vs(c)
    assert (vs.lb_algo, vs.persistence_timeout, vs.alpha, vs.omega, vs.quorum, vs.hysteresis) == \
        ("wrr", 900, True, True, 7, 2)
    assert endpoints(vs) == [(f"10.0.0.{i}", 8080, 1) for i in range(1, 11)]
    assert {(ch.kind, ch.connect_port) for rs in vs.real_servers for ch in rs.checkers} == {("TCP_CHECK", 80)}
    # the scripts run on quorum changes (hdslb.health.notify): no notice says they do not
    assert (vs.quorum_up.command, vs.quorum_down.command) == ("/usr/local/sbin/quorum-up.sh",
                                                              "/usr/local/sbin/quorum-down.sh")
    assert not [n for n in notices(c) if "quorum_" in n]


def _auth(c):
    vs = one_vs(c)
    http, ssl = (rs.checkers[0] for rs in vs.real_servers)
    assert [(u.path, u.username, u.password) for u in http.url] == [("/testurl3/test.jsp", "myuser", "mypassword")]
    assert [(u.path, u.username, u.password) for u in ssl.url] == [("/secure/test.jsp", "admin", "secret123")]
    assert "keepalived.conf.HTTP_GET.auth.simple:46: tls_compliant: hdslb's SSL_GET ends every probe the same " \
           "way (a reset, no TLS close_notify) and judges only the status and digest" in notices(c)


def _conditional(c):
    # neither `@high` nor `@low` is this host's config id: both net_namespace lines are skipped, as keepalived does
    assert not c.virtual_servers
    assert [n.split(": ")[1] for n in notices(c)] == ["vrrp_script", "vrrp_instance"]


def _dpvs_containerized(c):
    v4, v6 = c.virtual_servers
    assert (v4.group, v4.lb_kind, v4.laddr_group_name) == ("192.168.88.1-80-TCP_QLB", "FNAT", "laddr_g1")
    assert [str(e) for e in c.virtual_server_groups["2001::1-80-TCP_QLB"].members] == ["[2001::1]:80"]
    assert v6.lb_algo == "conhash" and endpoints(v6) == [
        ("192.168.88.30", 80, 100), ("192.168.88.130", 8080, 100), ("192.168.88.30", 8080, 100)]
    assert all(rs.inhibit_on_failure for rs in v6.real_servers)
    assert [str(a.ip) for a in c.local_address_groups["laddr_g1"].addresses] == ["192.168.88.240", "192.168.88.241"]
    assert set(c.deny_address_groups) == {"192.168.88.1_deny", "2001::1_deny"}
    assert any(": establish_timeout: " in n for n in notices(c))


def _dpvs_fnat(c):
    vs = one_vs(c)
    assert (vs.group, vs.lb_kind, vs.delay_loop) == ("192.168.100.254-80", "FNAT", 3.0)
    assert endpoints(vs) == [("192.168.100.2", 80, 100), ("192.168.100.3", 80, 100)]
    tcp = vs.real_servers[0].checkers[0]
    assert (tcp.kind, tcp.retry, tcp.connect_timeout, tcp.connect_port) == ("TCP_CHECK", 2, 3.0, 80)  # nb_sock_retry
    assert [a.interface for a in c.local_address_groups["laddr_g1"].addresses] == ["dpdk0", "dpdk0"]


def _dpvs_snat(c):
    udp, icmp = c.virtual_servers
    assert (udp.match, udp.protocol, udp.src_range, udp.oif) == \
        ("SNAT1", "UDP", "192.168.100.0-192.168.100.254", "dpdk1")
    assert (icmp.match, icmp.protocol, icmp.lb_algo, icmp.iif) == ("SNAT2", "ICMP", "wrr", "dpdk0")
    assert endpoints(icmp) == [("123.1.2.1", 0, 4)]


def _augeas(c):
    vs = one_vs(c)
    assert (vs.key, str(vs.sorry_server)) == (("TCP", "192.168.1.11:22"), "10.20.40.30:22")
    assert vs.real_servers[0].checkers[0].connect_port == 22
    n = notices(c)
    # keepalived 1.x's lvs_id is router_id; vrrp_* globals and every VRRP block are VRRP's
    assert any(x.startswith("augeas-test_keepalived.conf:21: lvs_id: hdslb sends no mail") for x in n)
    assert any(x.startswith("augeas-test_keepalived.conf:23: vrrp_mcast_group4: VRRP is not part") for x in n)
    assert any(x.startswith("augeas-test_keepalived.conf:127: nat_mask: keepalived never used it") for x in n)
    # keepalived 2.2's IP/LEN group member
    assert [str(e) for e in c.virtual_server_groups["DNS_1"].members] == [
        "192.168.0.1:22", "10.234.55.22:36", "10.234.55.23:36", "10.234.55.24:36", "10.234.55.25:36",
        "10.45.58.59:27"]


def _smtp_check(c):
    vs = one_vs(c)
    assert (vs.key, vs.delay_loop) == (("TCP", "192.168.200.100:25"), 60.0)
    plain, multi, extended = (rs.checkers[0] for rs in vs.real_servers)
    assert (plain.kind, plain.helo_name, plain.connect_timeout, plain.retry, plain.delay_before_retry, plain.hosts) \
        == ("SMTP_CHECK", "foo.bar.com", 30.0, 2, 5.0, ())
    assert [str(h.connect_ip) for h in multi.hosts] == ["172.16.1.11", "192.168.155.10", "64.233.167.99"]
    assert [(str(h.connect_ip), h.connect_port, h.bindto and str(h.bindto)) for h in extended.hosts] == [
        ("172.16.1.12", 25, "172.16.1.2"), ("192.168.155.11", 25, "192.168.155.2"), ("64.233.167.100", 587, None)]


def _ipv6(c):
    vs = one_vs(c)
    assert vs.key == ("TCP", "[ae00::1]:80") and endpoints(vs) == [("ae00::10", 25, 1)]
    (smtp,) = vs.real_servers[0].checkers
    assert (smtp.kind, smtp.connect_timeout, smtp.retry, smtp.helo_name) == ("SMTP_CHECK", 3.0, 3, "foo.bar.com")
    assert [str(e) for e in c.virtual_server_groups["IPv6_group"].members][:2] == ["[ae00::2]:80", "[ae00::3]:80"]


def _case_study(c):
    http, https, smtp = c.virtual_servers
    assert [(vs.key[1], vs.lb_algo, vs.persistence_timeout, vs.delay_loop) for vs in c.virtual_servers] == [
        ("192.168.200.15:80", "wrr", 50, 30.0), ("192.168.200.15:443", "rr", 360, 20.0),
        ("192.168.200.15:25", "wlc", 50, 15.0)]
    assert str(http.sorry_server) == "192.168.100.100:80" and endpoints(http) == [
        ("192.168.100.2", 80, 2), ("192.168.100.3", 80, 1)]
    check = http.real_servers[0].checkers[0]
    assert (len(check.url), check.retry, check.delay_before_retry, check.delay_loop) == (2, 3, 2.0, 30.0)
    assert endpoints(smtp) == [("192.168.100.4", 25, 1), ("192.168.100.5", 25, 2)]


def _case_study_ssl(c):
    vs = one_vs(c)  # `SSL_GET` with its `{` on the next line
    assert [(rs.checkers[0].kind, len(rs.checkers[0].url)) for rs in vs.real_servers] == \
        [("SSL_GET", 2), ("SSL_GET", 1)]


def _case_study_mixing(c):
    assert [vs.key[1] for vs in c.virtual_servers] == ["192.168.200.10:80", "192.168.200.12:443"]
    # `auth_pass k@l!ve1`: keepalived reads k@l (the rest is a comment); either way it is VRRP's, noticed
    assert sum(": vrrp_instance: VRRP is not part of hdslb" in n for n in notices(c)) == 4


def _lvs_syncd(c):
    vs = one_vs(c)
    assert vs.key == ("TCP", "192.168.200.19:80") and endpoints(vs) == [("192.168.201.100", 80, 1)]


def _fanux(c):
    vs = one_vs(c)
    assert (vs.lb_algo, vs.persistence_timeout) == ("wlc", 600)
    assert endpoints(vs) == [(f"172.18.1.{i}", 80, 100) for i in (11, 12, 13)]


LOADS = {
    "keepalived.conf.sample": _sample,
    "keepalived.conf.inhibit": _inhibit,
    "keepalived.conf.misc_check": _misc_check,
    "keepalived.conf.misc_check_arg": _misc_check_arg,
    "keepalived.conf.virtualhost": _virtualhost,
    "keepalived.conf.HTTP_GET.port": _http_get_port,
    "keepalived.conf.status_code": _status_code,
    "keepalived.conf.SSL_GET": _ssl_get,
    "keepalived.conf.UDP_CHECK": _udp_check,
    "keepalived.conf.quorum": _quorum,
    "keepalived.conf.HTTP_GET.auth.simple": _auth,
    "keepalived.conf.conditional_conf": _conditional,
    "dpvs-containerized.keepalived.conf": _dpvs_containerized,
    "dpvs-tutorial-fnat.keepalived.conf": _dpvs_fnat,
    "dpvs-tutorial-snat.keepalived.conf": _dpvs_snat,
    "fanux-kubeinit.keepalived.conf": _fanux,
    "keepalived.conf.SMTP_CHECK": _smtp_check,
    "keepalived.conf.IPv6": _ipv6,
    "augeas-test_keepalived.conf": _augeas,
    "case_study_healthcheck.keepalived.conf": _case_study,
    "case_study_healthcheck_ssl.keepalived.conf": _case_study_ssl,
    "case_study_mixing.keepalived.conf": _case_study_mixing,
    "keepalived.conf.vrrp.lvs_syncd": _lvs_syncd,
}


@pytest.mark.parametrize("name", sorted(LOADS))
def test_real_file_loads(name):
    assert errors(name) == []
    c = cfg(name)
    LOADS[name](c)
    for n in notices(c):  # whatever loads without acting is named at its line, with a reason
        assert n.startswith(f"{name}:") and len(n.split(": ", 2)[2]) > 20, n


# ---------------------------------------------------------------- files refused, at the line, with the reason

NOT_A_CHECKER = "is a keepalived health checker hdslb does not implement (it has TCP_CHECK, HTTP_GET, SSL_GET, " \
                "UDP_CHECK, SMTP_CHECK and MISC_CHECK); ignoring it would keep the server in the pool whatever its " \
                "health"
FAILOVER = "keepalived's failover pool is not implemented: its backup servers would never get traffic; make them " \
           "real_server entries (weight 0 to hold them back) or use sorry_server"
FWMARK_MEMBER = "fwmark: fwmark members match netfilter marks, and XDP runs before netfilter"

REFUSED = {
    "keepalived.conf.PING_CHECK": [f"25:2: PING_CHECK: PING_CHECK {NOT_A_CHECKER}"],
    "keepalived.conf.failover_pool": [f"{line}:3: {kw}: {FAILOVER}" for line, kw in (
        (36, "failover_threshold"), (37, "failover_up"), (38, "failover_down"), (60, "backup_real_server"),
        (66, "backup_real_server"))],
    "keepalived.conf.fwmark": ["9:16: virtual_server: fwmark services match netfilter marks, and XDP runs before "
                               "netfilter; declare `virtual_server IP PORT` or a virtual_server_group"],
    "keepalived.conf.virtual_server_group": [f"20:2: {FWMARK_MEMBER}", f"21:2: {FWMARK_MEMBER}"],
    # a DPVS SNAT source address under a health check (the tutorial's alpha-mode MISC_CHECK)
    "dpvs-tutorial-snat-misc.keepalived.conf": ["16:5: real_server: 123.1.2.2: a SNAT source address takes no "
                                                "health check"],
    # `lb_algo loadbalance` is no scheduler (IPVS would refuse the service); net_mask is no keepalived keyword
    "xusxlinux-master02.keepalived.conf": [
        "24:13: lb_algo: 'loadbalance' is not one of rr|wrr|lc|wlc|sh|dh|mh|conhash|fo",
        "26:5: net_mask: unknown keyword in virtual_server 10.4.7.10 6443; did you mean `nat_mask`?"],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_real_file_is_refused_at_the_line(name):
    assert errors(name) == [f"{name}:{e}" for e in REFUSED[name]]
    with pytest.raises(ConfigError):
        cfg(name)


def test_conditional_lines_follow_the_config_id():
    # `keepalived -i high`: the @high lines are read; hdslb is started in its namespace, it does not switch to one
    assert errors("keepalived.conf.conditional_conf", config_id="high") == [
        f"keepalived.conf.conditional_conf:{HEADER + 3}:7: net_namespace: hdslb serves the network namespace it is "
        "started in: start it there (ip netns exec NAME hdslbd …) rather than have it ignore this"]
    assert errors("keepalived.conf.conditional_conf", config_id="low") == [
        f"keepalived.conf.conditional_conf:{HEADER + 4}:6: net_namespace: hdslb serves the network namespace it is "
        "started in: start it there (ip netns exec NAME hdslbd …) rather than have it ignore this"]


def test_dpvs_quoted_misc_path_loses_its_trailing_comment(tmp_path):
    # keepalived reads `misc_path 'exit'##Just …` as `misc_path 'exit'` (a `#` anywhere starts a comment); the
    # same file with the service's source address checked as an ordinary real server shows what hdslb reads
    text = (REAL / "dpvs-tutorial-snat-misc.keepalived.conf").read_text(encoding="utf-8")
    text = text.replace("virtual_server match SNAT", "virtual_server 10.0.0.1 53").replace("lb_kind SNAT", "")
    for kw in ("src-range 192.168.100.0-192.168.100.254", "oif dpdk1", "real_server 123.1.2.2 0"):
        text = text.replace(kw, "real_server 123.1.2.2 53" if kw.startswith("real") else "")
    (tmp_path / "k.conf").write_text(text)
    vs = one_vs(load(str(tmp_path / "k.conf"), config_id=ID))
    assert vs.real_servers[0].checkers[0].misc_path == "'exit'"
    assert vs.quorum_up.command == "dpip addr add XXX;"
    assert ip_address("123.1.2.2") == vs.real_servers[0].ip
