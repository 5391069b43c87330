"""hdslb.net.link.link_facts: the kernel's sysfs view of an interface for dpip link show, on a fake sysfs tree."""

from types import SimpleNamespace

from hdslb.ctl import commands
from hdslb.net.link import UNKNOWN, link_facts


def sysfs(tmp_path, name, files, queues=()):
    d = tmp_path / name
    (d / "queues").mkdir(parents=True)
    for q in queues:
        (d / "queues" / q).mkdir()
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text + "\n")
    return str(tmp_path)


def test_an_up_nic(tmp_path):
    root = sysfs(tmp_path, "eth0", {"ifindex": "3", "operstate": "up", "carrier": "1", "speed": "25000",
                                    "duplex": "full", "device/numa_node": "1"},
                 ("rx-0", "rx-1", "rx-2", "rx-3", "tx-0", "tx-1"))
    assert link_facts("eth0", 3, root) == {"state": "UP", "speed": 25000, "duplex": "full-duplex", "numa": 1,
                                           "rxq": 4, "txq": 2}


def test_a_down_veth_without_speed_or_numa(tmp_path):
    # a down device's speed/duplex/carrier files refuse to be read (EINVAL); here they are missing
    root = sysfs(tmp_path, "veth-lb0", {"ifindex": "9", "operstate": "down"}, ("rx-0", "tx-0"))
    assert link_facts("veth-lb0", 9, root) == {"state": "DOWN", "speed": 0, "duplex": "", "numa": 0, "rxq": 1,
                                               "txq": 1}


def test_unknown_operstate_goes_by_carrier_and_unknown_speed_is_0(tmp_path):
    root = sysfs(tmp_path, "tun0", {"ifindex": "4", "operstate": "unknown", "carrier": "1", "speed": "-1",
                                    "duplex": "unknown", "device/numa_node": "-1"})
    assert link_facts("tun0", 4, root) == {"state": "UP", "speed": 0, "duplex": "", "numa": 0, "rxq": 0, "txq": 0}


def test_another_namespaces_device_of_the_same_name_is_not_described(tmp_path):
    root = sysfs(tmp_path, "eth0", {"ifindex": "2", "operstate": "up"})
    assert link_facts("eth0", 7, root) == UNKNOWN
    assert link_facts("nosuch", 7, root) == UNKNOWN


def test_link_list_carries_the_facts(monkeypatch):
    monkeypatch.setattr(commands, "link_facts", lambda name, ifindex: {"state": "UP", "speed": 10000,
                                                                       "duplex": "full-duplex", "numa": 0,
                                                                       "rxq": 1, "txq": 1})
    iface = SimpleNamespace(name="eth0", ifindex=2, mac=b"\x52\x54\x00\xaa\xbb\x01", mtu=1500)
    ctx = SimpleNamespace(bal=SimpleNamespace(ifaces={"eth0": iface}, iface=lambda n: iface),
                          xdp_modes={"eth0": "native"}, link_stats=lambda n: {})
    (link,) = commands.COMMANDS["link.list"](ctx, {})["links"]
    assert (link["state"], link["speed"], link["duplex"], link["rxq"], link["txq"]) == (
        "UP", 10000, "full-duplex", 1, 1)


def test_link_mtu_reads_the_kernels_mtu():
    from hdslb.net.link import link_mtu

    assert link_mtu("lo") == int(open("/sys/class/net/lo/mtu").read())


def test_the_daemon_follows_an_interface_mtu_change():
    """`ip link set eth1 mtu 1400` on a running balancer: `dpip link show` and `route show` kept saying 1500, and
    the fast path's TUNNEL check kept the start's MTU (a tunnelled packet of 1400..1500 bytes was sent on and lost
    instead of answered with fragmentation needed). The interface watch now follows the MTU into the model and the
    fast path's interface entry."""
    from hdslb.balancer import Balancer, Iface
    from hdslb.daemon import Daemon

    from .test_balancer import Recorder

    d = Daemon.__new__(Daemon)
    d.bal = Balancer(Recorder(), {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500),
                                  "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)})
    d.ifaces_gone = set()
    written = []
    d.maps = SimpleNamespace(set_iface=lambda *a, **kw: written.append((a, kw)))
    mtus = {"eth0": 1500, "eth1": 1400}
    assert d._check_ifaces(index_of={"eth0": 2, "eth1": 3}.__getitem__, mtu_of=mtus.__getitem__) is False
    assert written == [((3, b"\x04" * 6, 1400), {"xsk_slot": 1})]
    assert d.bal.ifaces["eth1"].mtu == 1400
    ctx = SimpleNamespace(bal=d.bal, xdp_modes={}, link_stats=lambda name: {})
    assert [lk["mtu"] for lk in commands.COMMANDS["link.list"](ctx, {})["links"]] == [1500, 1400]
    d._check_ifaces(index_of={"eth0": 2, "eth1": 3}.__getitem__, mtu_of=mtus.__getitem__)
    assert len(written) == 1, "written once per change"

    def refused(*a, **kw):
        raise OSError(9, "Bad file descriptor")

    d.maps = SimpleNamespace(set_iface=refused)  # a write refused: the watch goes on and tries again later
    mtus["eth0"] = 9000
    assert d._check_ifaces(index_of={"eth0": 2, "eth1": 3}.__getitem__, mtu_of=mtus.__getitem__) is False
    assert d.bal.ifaces["eth0"].mtu == 1500
