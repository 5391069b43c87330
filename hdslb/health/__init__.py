"""Health checking with keepalived's semantics: TCP_CHECK, HTTP_GET, SSL_GET, UDP_CHECK, SMTP_CHECK, MISC_CHECK.

    mgr = HealthManager(on_change, on_quorum)
    await mgr.start(pairs_of(cfg.virtual_servers))
    ...
    mgr.update(pairs_of(new_cfg.virtual_servers))   # reload
    mgr.status()                                     # JSON-able, for ipvsadm / REST / metrics
    await mgr.stop()
"""

from hdslb.health.base import CheckResult
from hdslb.health.http import check_http
from hdslb.health.manager import FD_RESERVE, HealthManager, pairs_of
from hdslb.health.misc import check_misc
from hdslb.health.probe import run_check
from hdslb.health.smtp import check_smtp
from hdslb.health.tcp import check_tcp
from hdslb.health.udp import check_udp

__all__ = ["CheckResult", "HealthManager", "pairs_of", "run_check", "check_tcp", "check_http", "check_udp",
           "check_misc", "check_smtp", "FD_RESERVE"]
