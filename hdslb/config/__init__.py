"""hdslb.conf: keepalived/DPVS syntax read into validated, frozen dataclasses, and the diff a reload applies."""

from .diff import ConfigDiff, OptionChange, diff
from .loader import check, load, loads
from .model import (AddressGroup, Checker, Config, ConfigError, Device, Endpoint, HttpCheck, HttpUrl,
                    LocalAddress, LocalAddressGroup, MiscCheck, NetChecker, Notice, RealServer, Setting, TcpCheck,
                    UdpCheck, VirtualServer, VirtualServerGroup, Where)

__all__ = [
    "load", "loads", "check", "diff", "Config", "ConfigError", "ConfigDiff", "OptionChange", "Notice", "Setting",
    "Where", "Endpoint", "Device", "VirtualServer", "VirtualServerGroup", "RealServer", "LocalAddress",
    "LocalAddressGroup", "AddressGroup", "Checker", "NetChecker", "TcpCheck", "HttpCheck", "HttpUrl", "UdpCheck",
    "MiscCheck",
]
