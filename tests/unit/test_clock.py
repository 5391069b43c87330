"""jiffies -> CLOCK_MONOTONIC conversion for the fast path's connection timestamps."""

import pytest

from hdslb.fastpath import clock
from hdslb.fastpath.clock import JiffiesClock, detect_hz, read_jiffies


def test_read_jiffies_from_timer_list(tmp_path):
    p = tmp_path / "timer_list"
    p.write_text("Timer List Version: v0.10\nnow at 14315301504902 nsecs\n\ncpu: 0\njiffies: 4298471059\n")
    assert read_jiffies(str(p)) == 4298471059
    p.write_text("nothing here\n")
    with pytest.raises(RuntimeError, match="no 'jiffies:' line"):
        read_jiffies(str(p))


@pytest.mark.parametrize("hz", [100, 250, 300, 1000])
def test_hz_from_the_boot_offset(hz):
    uptime = 14315.3
    j = 2**32 - 300 * hz + int(hz * uptime)
    assert detect_hz(read=lambda: j, mono=lambda: uptime, sleep=lambda s: pytest.fail("no sampling needed")) == hz


def test_hz_by_watching_it_tick_early_after_boot():
    t = [100.0]
    j = [2**32 - 300 * 250 + 25000]

    def sleep(s):
        t[0] += s
        j[0] += int(250 * s)

    assert detect_hz(read=lambda: j[0], mono=lambda: t[0], sleep=sleep) == 250


def test_conversion_is_stable_and_tracks_monotonic(monkeypatch):
    state = {"ns": 5_000_000_000_000, "j": 1_000_000}

    def mono_ns():
        return state["ns"]

    def read():
        return state["j"]

    c = JiffiesClock(read=read, mono_ns=mono_ns, hz=250)
    now = c.to_mono_ns(state["j"])
    assert now == state["ns"], "a stamp taken now converts to now"
    assert c.to_mono_ns(state["j"] - 250) == state["ns"] - 1_000_000_000, "250 ticks ago = 1 s ago at HZ=250"
    # time goes on: the same stamp converts to the same value (the offset is kept between recalibrations)
    state["ns"] += 3_000_000_000
    state["j"] += 750
    assert c.to_mono_ns(1_000_000) == now
    # after RECALIBRATE_S the offset is re-taken and, the clocks being consistent, nothing moves
    state["ns"] += int(clock.RECALIBRATE_S * 1e9) + 4_000_000
    state["j"] += int(clock.RECALIBRATE_S * 250) + 1
    assert c.to_mono_ns(1_000_000) == now
