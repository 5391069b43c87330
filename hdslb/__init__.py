"""hdslb: a layer-4 load balancer of the DPVS/HDSLB family on an eBPF/XDP fast path."""

__version__ = "0.1.0"
