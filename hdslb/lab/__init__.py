"""Network-namespace labs for e2e tests, `make demo` and benchmarks: topologies, real servers, cleanup.

    from hdslb.lab import OneArm, servers
    with OneArm() as lab:
        web = servers.start_nginx(lab)
        lab.client_run(["curl", "-s", "http://192.168.100.2/"])

Names resolve lazily so `python -m hdslb.lab.udp_echo` inside a namespace imports nothing it does not use.
"""

__all__ = ["OneArm", "TwoArm", "Lab", "gc"]


def __getattr__(name):
    if name in ("OneArm", "TwoArm"):
        from hdslb.lab import topology

        return getattr(topology, name)
    if name in ("Lab", "gc"):
        from hdslb.lab import netns

        return getattr(netns, name)
    raise AttributeError(f"module 'hdslb.lab' has no attribute {name!r}")
