"""Numbers out of range are called out of range, naming the option: `hdslb-ctl health add --delay-loop -1` said
`'-1.0' is not a number` (argparse's float made -1.0 of it, the config reader took any sign for a non-number, and
check.add dropped the option's name)."""

import pytest

from hdslb.api import dispatch_async
from hdslb.config import ConfigError, loads
from hdslb.errors import HdslbError


@pytest.mark.parametrize("value, says", [
    ("-1", "argument --delay-loop: -1 is out of range: seconds, more than 0"),
    ("0", "argument --delay-loop: 0 is out of range: seconds, more than 0"),
    ("inf", "argument --delay-loop: inf is out of range: seconds, more than 0"),
    ("nan", "argument --delay-loop: 'nan' is not a number of seconds"),
    ("six", "argument --delay-loop: 'six' is not a number of seconds"),
])
def test_health_add_refuses_a_delay_loop_out_of_range_naming_it(capsys, value, says):
    from cli.hdslb_ctl import main

    with pytest.raises(SystemExit) as e:
        main(["health", "add", "-t", "10.0.0.1:80", "-r", "10.0.0.2", "--delay-loop", value])
    assert e.value.code == 2
    assert says in capsys.readouterr().err


async def test_check_add_names_the_option_it_refuses_and_why(tmp_path):
    from tests.unit.test_fuzz_input import SVC, make_daemon

    d = await make_daemon(tmp_path)
    try:
        for args, says in [
            ({"delay_loop": -1.0}, "delay_loop: -1.0 is out of range, expects seconds 0.001..86400"),
            ({"delay_loop": 1e-9}, "delay_loop: 1e-09 is out of range, expects seconds 0.001..86400"),
            ({"params": {"connect_timeout": "-1"}}, "connect_timeout: -1 is out of range, expects seconds 0.001..3600"),
            ({"params": {"delay_before_retry": "-0.5"}},
             "delay_before_retry: -0.5 is out of range, expects seconds 0..3600"),
            ({"params": {"retry": "-1"}}, "retry: -1 is out of range, expects an integer 0..100"),
            ({"params": {"connect_timeout": "1e"}}, "connect_timeout: '1e' is not a number, expects seconds "
                                                    "0.001..3600"),
        ]:
            with pytest.raises(HdslbError) as e:
                await dispatch_async(d, "check.add", {"svc": SVC, "addr": "192.168.100.2", "port": 80, **args})
            assert e.value.message == f"invalid check: {says}"
    finally:
        if d.health is not None:
            await d.health.stop()


def test_a_negative_number_of_seconds_in_the_file_is_out_of_range():
    with pytest.raises(ConfigError) as e:
        loads("virtual_server 10.0.0.1 80 {\n    delay_loop -3\n}\n", name="lb.conf")
    assert str(e.value) == "lb.conf:2:16: delay_loop: -3 is out of range, expects seconds 0.001..86400"


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_top_refuses_an_interval_it_cannot_sleep(capsys, value):
    from hdslb import top

    with pytest.raises(SystemExit) as e:
        top.main(["--interval", value])
    assert e.value.code == 2
    assert "--interval must be a number of seconds, more than 0" in capsys.readouterr().err
