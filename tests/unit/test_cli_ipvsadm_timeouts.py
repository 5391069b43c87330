"""ipvsadm --set tcp tcpfin udp and -L --timeout: ipvsadm's syntax, messages, exit codes and output line."""

import io

import pytest

from cli import ipvsadm
from cli.common import UsageError

from .test_cli_ipvsadm import FakeClient

TIMEOUTS = {"tcp": 900, "tcpfin": 120, "udp": 300}


@pytest.fixture
def client(monkeypatch):
    fake = FakeClient()
    monkeypatch.setattr(ipvsadm, "Client", fake)
    return fake


@pytest.mark.parametrize("argv", [["-L", "--timeout"], ["-l", "--timeout"], ["-Ln", "--timeout"],
                                  ["--list", "--timeout", "--nosort", "--exact"]])
def test_list_timeout_prints_ipvsadms_line(client, capsys, argv):
    client.replies["timeouts.get"] = dict(TIMEOUTS, states={}, config={}, set={})
    assert ipvsadm.main(argv) == 0
    assert client.calls == [("timeouts.get", {})]
    assert capsys.readouterr().out == "Timeout (tcp tcpfin udp): 900 120 300\n"


def test_set_sends_the_three_values_zero_meaning_keep(client, capsys):
    assert ipvsadm.main(["--set", "0", "0", "2"]) == 0
    assert client.calls == [("timeouts.set", {"tcp": 0, "tcpfin": 0, "udp": 2})]
    assert capsys.readouterr().out == ""
    assert ipvsadm.main(["--set", "2678400", "120", "300"]) == 0  # 31 days: ipvsadm's MAX_TIMEOUT
    assert client.calls[-1] == ("timeouts.set", {"tcp": 2678400, "tcpfin": 120, "udp": 300})


@pytest.mark.parametrize("argv,msg", [
    (["--set", "900", "120"], "--set option requires 3 timeout values"),
    (["--set"], "--set option requires 3 timeout values"),
    (["--set", "-1", "0", "0"], "invalid timeout value `-1' specified"),
    (["--set", "0", "x", "0"], "invalid timeout value `x' specified"),
    (["--set", "0", "0", "2678401"], "invalid timeout value `2678401' specified"),
    (["--set", "0", "0", "99999999999999999999"], "invalid timeout value `99999999999999999999' specified"),
    (["--set", "1", "2", "3", "4"], "unexpected argument 4"),
    (["--set", "1", "2", "3", "-n"], "Illegal 'numeric' option with the 'set' command"),
    (["--set", "1", "2", "3", "-L"], "multiple commands specified"),
    (["-L", "--timeout", "-c"], "The option 'timeout' conflicts with the 'connection' option in the 'list' command"),
    (["-L", "--timeout", "-t", "10.0.0.1:80"],
     "The option 'timeout' conflicts with the 'service-address' option in the 'list' command"),
    (["-L", "--timeout", "--stats"], "options conflicts in the list command"),
    (["-L", "--timeout", "--rate"], "options conflicts in the list command"),
    (["-L", "--timeout", "--persistent-conn"], "options conflicts in the list command"),
    (["-A", "-t", "10.0.0.1:80", "--timeout"], "Illegal 'timeout' option with the 'add-service' command"),
    (["-L", "--timeout", "--timeout"], "multiple 'timeout' options specified"),
])
def test_bad_timeout_lines_exit_2_and_send_nothing(client, capsys, argv, msg):
    assert ipvsadm.main(argv) == 2
    assert client.calls == []
    assert capsys.readouterr().err == msg + "\n"


def test_a_negative_number_is_still_an_unknown_option_elsewhere():
    with pytest.raises(UsageError, match="unexpected argument -5"):
        ipvsadm.parse(["-L", "-5"])


@pytest.mark.parametrize("argv", [["-L", "-6"], ["-6", "-L"], ["-Ln", "-6"], ["-Ln6"], ["--set", "-6", "0", "0"]])
def test_minus_6_is_ipvsadms_ipv6_option_not_a_number(argv):
    """-6 is an option of ipvsadm's (--ipv6, for -f services): refused by name with the reason, as --ipv6 is,
    not taken for a negative number."""
    with pytest.raises(UsageError, match=r"^-6 \(--ipv6\): not supported by hdslb: it only applies to "
                                         r"firewall-mark services"):
        ipvsadm.parse(argv)


def test_restore_takes_set_lines_in_its_batch(client, capsys, monkeypatch):
    """ipvsadm -R runs every command line it reads, --set included (-S never writes one: timeouts are not rules)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("-A -t 10.0.0.1:80 -s rr\n--set 0 0 2\n"))
    client.replies["batch"] = {"applied": 2, "warnings": []}
    assert ipvsadm.main(["-R"]) == 0
    assert client.calls == [("batch", {"ops": [["service.add", client.calls[0][1]["ops"][0][1]],
                                               ["timeouts.set", {"tcp": 0, "tcpfin": 0, "udp": 2}]]})]


def test_restore_with_a_bad_set_line_sends_nothing(client, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("-A -t 10.0.0.1:80 -s rr\n--set 0 0 -3\n"))
    assert ipvsadm.main(["-R"]) == 2
    assert client.calls == []
    assert capsys.readouterr().err == "line 2: invalid timeout value `-3' specified\n"


def test_help_lists_set_and_timeout(client, capsys):
    assert ipvsadm.main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "--set tcp tcpfin udp" in out and "--timeout                           output of timeout" in out
