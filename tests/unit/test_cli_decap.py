"""hdslb-ctl decap: usage errors exit 2 before anything touches the kernel; the pure helpers and the show layout."""

import ipaddress
import os

import pytest

from cli import hdslb_ctl
from hdslb.fastpath import decap


REAL_UP, REAL_DOWN = decap.up, decap.down  # (no_kernel stubs them; the rename tests run them over faked kernel calls)


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """A usage error must be caught before any kernel call: these would fail the test if reached."""
    def reached(*a, **kw):
        raise AssertionError("a bad command line reached the kernel side")

    for name in ("up", "down", "show", "zero"):
        monkeypatch.setattr(decap, name, reached)


def exit_code(argv):
    try:
        return hdslb_ctl.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        return e.code


@pytest.mark.parametrize("argv, message", [
    (["decap"], "required"),
    (["decap", "frob"], "invalid choice"),
    (["decap", "up"], "the following arguments are required: IFACE"),
    (["decap", "down"], "the following arguments are required: IFACE"),
    (["decap", "zero"], "the following arguments are required: IFACE"),
    (["decap", "show", "eth0", "eth1"], "unrecognized arguments: eth1"),
    (["decap", "up", "eth0", "--xdp-mode", "turbo"], "invalid choice: 'turbo'"),
    (["decap", "up", "eth0", "--host-addrs", "some"], "invalid choice: 'some'"),
    (["decap", "up", "eth0", "--addr"], "expected one argument"),
    (["decap", "up", "eth0", "--addr", "10.0.0.300"], "invalid --addr '10.0.0.300'"),
    (["decap", "up", "eth0", "--addr", "rs1.example.com"], "invalid --addr 'rs1.example.com'"),
    (["decap", "up", "eth0", "--addr", "224.0.0.1"], "224.0.0.1 is not a unicast address"),
    (["decap", "up", "eth0", "--addr", "::"], ":: is not a unicast address"),
    # the limited broadcast was taken: every host on the link could have its tunnel packets opened here
    (["decap", "up", "eth0", "--addr", "255.255.255.255"], "255.255.255.255 is not a unicast address"),
    # an IPv4-mapped address is never an IPv6 packet's destination on the wire: it was taken and never matched
    (["decap", "up", "eth0", "--addr", "::ffff:192.168.100.2"], "IPv4-mapped"),
    (["decap", "up", "averyverylongname0"], "bad interface name 'averyverylongname0'"),
    (["decap", "down", "eth/0"], "bad interface name 'eth/0'"),
    (["decap", "show", ".."], "bad interface name '..'"),
    (["decap", "up", "eth0", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_usage_errors_exit_2_with_a_reason(capsys, argv, message):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_decap_is_listed_in_the_top_level_help(capsys):
    assert exit_code(["--help"]) == 0
    assert "decap" in capsys.readouterr().out


def test_runtime_failures_exit_1_with_the_reason(monkeypatch, capsys):
    def refuse(*a, **kw):
        raise decap.DecapError("no interface 'eth9' in network namespace init")

    monkeypatch.setattr(decap, "up", refuse)
    assert exit_code(["decap", "up", "eth9"]) == 1
    assert capsys.readouterr().err.strip() == "hdslb-ctl: decap up: no interface 'eth9' in network namespace init"


def test_up_passes_the_options_through(monkeypatch, capsys):
    seen = {}

    def up(ifname, mode, addrs, host_addrs, pin_root):
        seen.update(ifname=ifname, mode=mode, addrs=addrs, host_addrs=host_addrs, pin_root=pin_root)
        return decap.DecapStatus(ifname, "rs1", f"{pin_root}/decap/rs1/{ifname}", 7, mode, 7, True,
                                 [ipaddress.ip_address(a) for a in addrs])

    monkeypatch.setattr(decap, "up", up)
    argv = ["decap", "up", "eth0", "--xdp-mode", "generic", "--addr", "10.0.0.2", "--addr", "fd00::2",
            "--host-addrs", "none", "--pin-root", "/run/x"]
    assert exit_code(argv) == 0
    assert seen == {"ifname": "eth0", "mode": "generic", "addrs": ["10.0.0.2", "fd00::2"], "host_addrs": "none",
                    "pin_root": "/run/x"}
    out = capsys.readouterr().out
    assert "decap on eth0 (generic XDP), prog id 7" in out and "10.0.0.2 fd00::2" in out


def test_key_packing_round_trips_both_families():
    for text in ("192.0.2.7", "2001:db8::7"):
        a = ipaddress.ip_address(text)
        raw = decap.pack_key(a)
        assert len(raw) == decap.KEY.size == 20
        assert decap.unpack_key(raw) == a
    assert decap.pack_key(ipaddress.ip_address("192.0.2.7")) == bytes([4, 0, 0, 0, 192, 0, 2, 7]) + bytes(12)


def test_counter_names_come_from_the_header():
    names = decap.counter_names()
    assert names[:4] == ["decap_4in4", "decap_6in4", "decap_4in6", "decap_6in6"]
    assert {"pass", "pass_not_local", "pass_fragment", "drop_malformed"} <= set(names)
    assert len(names) == len(set(names))


def _status(**kw):
    st = decap.DecapStatus("eth0", "rs1", "/run/hdslb/bpffs/decap/rs1/eth0", 12, "native", 12, True,
                           [ipaddress.ip_address("10.0.0.2")], {"decap_4in4": 3, "drop_malformed": 0})
    for k, v in kw.items():
        setattr(st, k, v)
    return st


@pytest.mark.parametrize("kw, state", [
    ({}, "eth0: native XDP, prog id 12"),
    ({"attached_mode": None, "attached_prog_id": None}, "eth0: NOT ATTACHED: no XDP program on the interface"),
    ({"attached_mode": None, "attached_prog_id": 99}, "eth0: NOT ATTACHED: XDP program id 99 of another tool runs there"),
    ({"attached_mode": None, "attached_prog_id": None, "iface_exists": False}, "eth0: NOT ATTACHED: the interface is gone"),
])
def test_show_layout(kw, state):
    lines = hdslb_ctl.format_decap(_status(**kw))
    assert lines[0].startswith(state)
    assert lines[1:] == ["  pinned:    /run/hdslb/bpffs/decap/rs1/eth0", "  addresses: 10.0.0.2",
                         "  decap_4in4      3", "  drop_malformed  0"]


def test_instance_dirs_are_per_namespace_and_interface():
    assert decap.instance_dir("eth0", "/run/hdslb/bpffs", netns="rs1") == "/run/hdslb/bpffs/decap/rs1/eth0"
    with pytest.raises(ValueError):
        decap.instance_dir("../x", netns="rs1")


def test_the_last_instance_down_leaves_no_empty_directories(tmp_path):
    """`decap down` of the last instance left an empty `<pin root>/decap` behind (found by the README audit): the
    namespace's directory goes with its last instance and `decap` with the last namespace's."""
    from hdslb.fastpath import decap

    root = str(tmp_path)
    a, b = decap.instance_dir("eth0", root, "ns1"), decap.instance_dir("eth1", root, "ns2")
    for d in (a, b):
        os.makedirs(d)
        open(os.path.join(d, "prog"), "w").close()
    decap._remove_instance_dir(a)
    assert sorted(os.listdir(os.path.join(root, "decap"))) == ["ns2"]  # another namespace's instance stays
    decap._remove_instance_dir(b)
    assert os.listdir(root) == []


def test_an_instance_whose_interface_was_renamed_is_found_and_taken_down_where_it_runs(tmp_path, monkeypatch,
                                                                                         capsys):
    """`decap up eth0`, then eth0 renamed (ip link set name, a udev rule): the program kept decapsulating on the new
    name, but `decap show` said 'the interface is gone' and `decap down eth0` removed the pins and said 'was no longer
    attached', leaving a program no decap command could see any more (and `decap up` on the new name refused it as
    another tool's). Both now find it by its pinned program id on whatever interface runs it."""
    root = str(tmp_path)
    pin_dir = decap.instance_dir("eth0", root, "rs1")
    os.makedirs(pin_dir)
    links = {"lan0": ("generic", 12), "eth1": (None, None)}  # eth0 is now lan0
    detached = []
    monkeypatch.setattr(decap, "_require_root", lambda: None)
    monkeypatch.setattr(decap, "netns_name", lambda: "rs1")
    monkeypatch.setattr(decap, "pinned_prog_id", lambda d: 12)
    monkeypatch.setattr(decap, "ifindex", lambda n: 7 if n in links else None)
    monkeypatch.setattr(decap, "xdp_state", lambda n: links[n])
    monkeypatch.setattr(decap, "link_names", lambda: list(links))
    monkeypatch.setattr(decap, "detach", lambda n, mode: detached.append((n, mode)))
    monkeypatch.setattr(decap, "down", REAL_DOWN)
    (st,) = [decap._status("eth0", "rs1", pin_dir, read_maps=False)]
    assert (st.attached, st.moved_to) == (False, "lan0")
    assert hdslb_ctl.format_decap(st)[0] == ("eth0: NOT ATTACHED to eth0: its program runs on lan0 (generic XDP; "
                                             "renamed?); `hdslb-ctl decap down eth0` detaches it there")
    assert hdslb_ctl.main(["decap", "down", "eth0", "--pin-root", root]) == 0
    assert detached == [("lan0", "generic")] and not os.path.exists(pin_dir)
    assert "decap detached from lan0 (eth0 renamed)" in capsys.readouterr().out


def test_up_on_the_renamed_interface_names_the_instance_that_runs_there(tmp_path, monkeypatch):
    """`decap up lan0` after eth0 (an instance) was renamed lan0 refused the program as another tool's and told the
    operator to `xdp off` it behind the instance's back; it names the instance to take down instead."""
    root = str(tmp_path)
    os.makedirs(decap.instance_dir("eth0", root, "rs1"))
    monkeypatch.setattr(decap, "_require_root", lambda: None)
    monkeypatch.setattr(decap, "netns_name", lambda: "rs1")
    monkeypatch.setattr(decap, "ensure_pin_root", lambda r: None)
    monkeypatch.setattr(decap, "ifindex", lambda n: 7)
    monkeypatch.setattr(decap, "host_addresses", lambda which, ifname: [ipaddress.ip_address("10.0.0.2")])
    monkeypatch.setattr(decap, "xdp_state", lambda n: ("generic", 12))
    monkeypatch.setattr(decap, "pinned_prog_id", lambda d: 12 if d.endswith("/eth0") else None)
    with pytest.raises(decap.DecapError, match=r"runs the decap program of instance eth0 .*decap down eth0` first"):
        REAL_UP("lan0", pin_root=root)


@pytest.mark.parametrize("action", [["up", "eth0"], ["down", "eth0"], ["zero", "eth0"], ["show"]])
def test_a_relative_pin_root_is_taken_from_where_the_command_runs(monkeypatch, tmp_path, action):
    """`hdslb-ctl decap up eth0 --pin-root bpffs/x` (run from /run/hdslb) passed the relative path into the
    program's PIN_DIR: bcc could not make the pins ("failed to mkdir bpffs/x/decap/...") and the compile failed,
    with advice to `decap down` first as if a map layout had changed. Every decap command takes it as absolute."""
    seen = []

    def reached(*args):
        seen.append(args[-1])
        if action[0] == "up":
            return decap.DecapStatus("eth0", "rs1", "d", 7, "generic", 7, True, [])
        if action[0] == "down":
            return decap.DecapStatus("eth0", "rs1", "d", 7, "generic", 7, True, [])
        return []

    monkeypatch.setattr(decap, action[0], reached)
    monkeypatch.chdir(tmp_path)
    exit_code(["decap", *action, "--pin-root", "bpffs/x"])
    assert seen == [str(tmp_path / "bpffs" / "x")]
