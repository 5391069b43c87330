"""keepalived's `global_defs { lvs_timeouts tcp N tcpfin N udp N }`: read (any order, a subset), refused with
FILE:LINE:COL when malformed or when it and an ipvs_defs timeout block set one timeout differently, applied at
start and live on a reload (where, like a file change of ipvs_defs, it wins over an ipvsadm --set)."""

import pytest

from hdslb.config import ConfigError, loads
from hdslb.daemon import DEFAULT_TIMEOUTS, timeouts_of

from .test_api_security import BASE
from .test_timeouts import harness

DPVS_TCP = """ipvs_defs {
    tcp {
        timeout {
            established 7200
        }
    }
}
"""


def gd(line: str) -> str:
    return f"global_defs {{\n    {line}\n}}\n"


@pytest.mark.parametrize("line,want", [
    ("lvs_timeouts tcp 7200 tcpfin 120 udp 300", {"established": 7200, "fin_wait": 120, "udp": 300}),
    ("lvs_timeouts udp 2 tcp 900", {"established": 900, "udp": 2}),
    ("lvs_timeouts tcpfin 11", {"fin_wait": 11}),
    ("lvs_timeouts tcp 0 udp 5", {"udp": 5}),  # 0: not set, as in keepalived
])
def test_lvs_timeouts_any_order_and_subset(line, want):
    cfg = loads(gd(line), name="k.conf")
    assert timeouts_of(cfg) == dict(DEFAULT_TIMEOUTS, **want)


@pytest.mark.parametrize("line,col,why", [
    ("lvs_timeouts", 5, "expects tcp|tcpfin|udp SECONDS pairs"),
    ("lvs_timeouts tcp", 5, "expects tcp|tcpfin|udp SECONDS pairs"),
    ("lvs_timeouts tcp 900 udp", 26, "udp needs a value"),
    ("lvs_timeouts tcp 900 tcp 5", 26, "tcp is given twice"),
    ("lvs_timeouts sctp 900", 18, "unknown option 'sctp'"),
    ("lvs_timeouts tcp -1", 22, "-1 is out of range"),
    ("lvs_timeouts tcp 2678401", 22, "2678401 is out of range"),
    ("lvs_timeouts tcp soon", 22, "'soon' is not an integer"),
])
def test_bad_lvs_timeouts_name_file_line_col(line, col, why):
    with pytest.raises(ConfigError) as e:
        loads(gd(line), name="k.conf")
    assert str(e.value).startswith(f"k.conf:2:{col}: lvs_timeouts: ") and why in str(e.value), str(e.value)


def test_both_places_setting_one_timeout_must_agree():
    cfg = loads(gd("lvs_timeouts tcp 7200 udp 2") + DPVS_TCP, name="k.conf")  # the same tcp: fine
    assert timeouts_of(cfg)["established"] == 7200 and timeouts_of(cfg)["udp"] == 2
    with pytest.raises(ConfigError) as e:
        loads(gd("lvs_timeouts tcp 900") + DPVS_TCP, name="k.conf")
    msg = str(e.value)
    assert msg.startswith("k.conf:2:5: lvs_timeouts: tcp 900 differs from `established 7200` at k.conf:7:13") \
        and "ipvs_defs.tcp.timeout.established" in msg, msg


async def test_lvs_timeouts_apply_on_reload_and_win_over_a_set(tmp_path):
    d, conf = await harness(tmp_path)
    d.dispatch("timeouts.set", {"tcp": 900, "udp": 2})
    conf.write_text(BASE.replace("log_level INFO", "log_level INFO\n    lvs_timeouts udp 60"))
    r = await d.reload_config()
    assert any("global_defs.lvs_timeouts" in line for line in r["applied"]), r
    assert d.settings.timeouts["udp"] == 60 and d.settings.timeouts["established"] == 900
    assert d.seen[-1] == d.settings.timeouts
    assert d.dispatch("timeouts.get", {})["set"] == {"established": 900}
