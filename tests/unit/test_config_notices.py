"""Every option the file sets either acts or is named with the reason it does not: the ones the review found
accepted in silence (device queues/promisc/mtu, sa_pool, hash_table_size under a
scheduler without a table, <init> on virtual_server options, quorum scripts)."""

import pytest

from hdslb.config import loads
from hdslb.config.apply import desired, inactive_notices

VS = "virtual_server 10.0.0.1 80 {{\n lb_kind FNAT\n {body}\n real_server 10.1.0.1 80 {{\n  weight 2\n }}\n}}\n"


def notices(text):
    return inactive_notices(loads(text, name="t.conf"))


def one(text, keyword):
    hits = [n for n in notices(text) if f": {keyword}: accepted, not acted on: " in n]
    assert len(hits) == 1, notices(text)
    return hits[0]


@pytest.mark.parametrize("body,keyword,line", [
    ("rx {\n   queue_number 3\n  }", "queue_number", 4),
    ("tx {\n   queue_number 3\n  }", "queue_number", 4),
    ("promisc_mode", "promisc_mode", 3),
    ("mtu 9000", "mtu", 3),
])
def test_device_options_are_noticed(body, keyword, line):
    text = f"netif_defs {{\n <init> device eth0 {{\n  {body}\n }}\n}}\n"
    assert one(text, keyword).startswith(f"t.conf:{line}:")


def test_sa_pool_hash_size_is_noticed():
    assert "per-CPU ranges" in one("sa_pool {\n pool_hash_size 16\n}\n", "pool_hash_size")


def test_granularity_without_a_timeout_turns_persistence_on_as_keepalived_does():
    # check_parser.c pgr_handler: "if (!vs->persistence_timeout) vs->persistence_timeout = 360"
    assert not notices(VS.format(body="persistence_granularity 24"))
    [want] = desired(loads(VS.format(body="persistence_granularity 24")), lambda ip: "eth0").values()
    assert (want.persistent, want.netmask) == (360, "255.255.255.0")
    [want] = desired(loads(VS.format(body="persistence_timeout 60\n persistence_granularity 24")),
                     lambda ip: "eth0").values()
    assert (want.persistent, want.netmask) == (60, "255.255.255.0")
    [want] = desired(loads(VS.format(body="lb_algo rr")), lambda ip: "eth0").values()
    assert want.persistent is None


@pytest.mark.parametrize("algo,noticed", [("rr", True), ("wlc", True), ("mh", False), ("conhash", False),
                                          ("sh", False)])
def test_hash_table_size_only_acts_for_hash_schedulers(algo, noticed):
    text = VS.format(body=f"lb_algo {algo}\n hash_table_size 1024")
    assert bool([n for n in notices(text) if "hash_table_size" in n]) == noticed
    [want] = desired(loads(text), lambda ip: "eth0").values()
    assert want.sched_params == ({} if noticed else {"size": 1024})  # rr would refuse a size: not sent


def test_init_on_a_virtual_server_option_is_noticed():
    """The notice is about the marker, not the option: it said "lb_algo: accepted, not acted on", which reads as
    if the scheduler were ignored (found by the config audit)."""
    hits = [n for n in notices(VS.format(body="<init> lb_algo rr")) if ": lb_algo: " in n]
    assert len(hits) == 1 and ": lb_algo: applies; its `<init>` is not acted on: " in hits[0], hits
    assert "every reload" in hits[0]


@pytest.mark.parametrize("kw", ["quorum_up", "quorum_down"])
def test_quorum_scripts_act_so_are_not_noticed(kw):
    # they run on quorum changes now (hdslb.health.notify); a notice saying otherwise would be wrong
    assert not [n for n in notices(VS.format(body=f"{kw} /bin/true")) if kw in n]


async def test_a_reload_names_a_changed_option_without_effect_as_such(tmp_path):
    from tests.unit.test_api_security import BASE, HarnessDaemon

    conf = tmp_path / "hdslb.conf"
    conf.write_text(BASE + "netif_defs {\n <init> device eth0 {\n  mtu 1500\n }\n}\nsa_pool {\n pool_hash_size 16\n}\n")
    d = HarnessDaemon(conf, tmp_path)
    await d.reload_config()
    conf.write_text(conf.read_text().replace("mtu 1500", "mtu 9000").replace("pool_hash_size 16", "pool_hash_size 8"))
    r = await d.reload_config()
    assert r["needs_restart"] == [] and r["applied"] == []
    assert [x.split(": ", 2)[1] for x in r["not_acted_on"]] == ["netif_defs.device[eth0].mtu",
                                                                "sa_pool.pool_hash_size"]
