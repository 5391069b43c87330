"""The slow path: packets the XDP program punts to user space (ARP, ICMP, unknown flows) over AF_XDP."""
