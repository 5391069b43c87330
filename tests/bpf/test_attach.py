"""Attaching and detaching replace only this instance's XDP program. Two instances started on one interface at
the same moment (each with its own control socket and pins) both found the interface free before compiling; the
later attach replaced the other's program, and when that start then failed (its REST port taken by the first)
it detached whatever ran there: the interface forwarded nothing while the first hdslbd said it was attached.
Here the other program is put there between the look and the attach, as the race does."""

import asyncio
import os
import subprocess

import pytest

from hdslb.fastpath import loader, xdp_pass
from hdslb.slowpath.xsk import call_in_netns

pytestmark = pytest.mark.root


@pytest.fixture
def veth_ns():
    """A namespace of its own with a veth pair xo0/xo1 (xo0 up); removed after, also on failure."""
    ns = f"xo{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "xo0", "type", "veth", "peer", "name", "xo1"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "xo0", "up"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def other_tool_attaches(ns: str) -> int:
    """An XDP_PASS program attached to xo0 in generic mode by someone else; returns its id."""
    call_in_netns(ns, lambda: xdp_pass.attach("xo0", generic=True))
    return call_in_netns(ns, lambda: xdp_pass.query("xo0"))[1]


def test_a_program_attached_since_the_start_looked_is_not_replaced(fastpath, veth_ns):
    foreign = other_tool_attaches(veth_ns)
    with pytest.raises(loader.XdpForeignError, match=f"xo0 already runs XDP program id {foreign} "
                                                     r"\(hdslb_xdp_pass\), which is not this instance's"):
        call_in_netns(veth_ns, lambda: fastpath.attach("xo0", "generic"))
    assert call_in_netns(veth_ns, lambda: xdp_pass.query("xo0")) == ("generic", foreign)
    assert "xo0" not in fastpath.attached


def test_detach_leaves_a_program_that_replaced_ours(fastpath, veth_ns):
    assert call_in_netns(veth_ns, lambda: fastpath.attach("xo0", "generic")) == "generic"
    ours = call_in_netns(veth_ns, lambda: xdp_pass.query("xo0"))[1]
    # our own program is replaced atomically (a restart over its predecessor, a datapath reload)
    assert call_in_netns(veth_ns, lambda: fastpath.attach("xo0", "generic")) == "generic"
    assert call_in_netns(veth_ns, lambda: xdp_pass.query("xo0")) == ("generic", ours)
    foreign = other_tool_attaches(veth_ns)
    call_in_netns(veth_ns, lambda: fastpath.detach("xo0"))
    assert call_in_netns(veth_ns, lambda: xdp_pass.query("xo0")) == ("generic", foreign), "not ours to remove"
    call_in_netns(veth_ns, lambda: xdp_pass.detach("xo0", generic=True))
    assert call_in_netns(veth_ns, lambda: fastpath.attach("xo0", "generic")) == "generic"

    async def stop():  # hdslbd detaches from its event loop (a stop, `down`)
        fastpath.detach("xo0")

    call_in_netns(veth_ns, lambda: asyncio.run(stop()))
    assert call_in_netns(veth_ns, lambda: xdp_pass.query("xo0")) == (None, None)
