"""One probe of any checker kind: pick the module for `checker.kind` and turn surprises into a failed result."""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Dict

from hdslb.config.model import Checker, RealServer
from hdslb.health.base import CheckResult, failed
from hdslb.health.http import check_http
from hdslb.health.misc import check_misc
from hdslb.health.smtp import check_smtp
from hdslb.health.tcp import check_tcp
from hdslb.health.udp import check_udp

log = logging.getLogger("hdslb.health")

Probe = Callable[[Checker, RealServer], Awaitable[CheckResult]]

PROBES: Dict[str, Probe] = {
    "TCP_CHECK": check_tcp,
    "HTTP_GET": check_http,
    "SSL_GET": check_http,
    "UDP_CHECK": check_udp,
    "SMTP_CHECK": check_smtp,
    "MISC_CHECK": check_misc,
}


async def run_check(checker: Checker, rs: RealServer) -> CheckResult:
    """Probe once. Never raises (but for cancellation): a bug in a probe must not stop its server's checks."""
    probe = PROBES.get(checker.kind)
    if probe is None:
        return failed(f"{checker.kind} is not a checker hdslb runs")
    try:
        return await probe(checker, rs)
    except Exception as e:  # noqa: BLE001 — the reason is logged and reported, the loop goes on
        log.exception("%s probe of %s raised", checker.kind, rs.key)
        return failed(f"{checker.kind} probe error: {type(e).__name__}: {e}")
