"""HTTP_GET and SSL_GET: fetch each configured URL and judge its status code and, if asked, its body's MD5.

As keepalived (check_http.c): one connection per URL, an HTTP/1.0 GET with `User-Agent: KeepAliveClient`
and `Host: <virtualhost>` or, without one, `Host: <IP>:<port>`. Every URL must pass; a checker with no
url passes without connecting. A status outside status_code (default 200-299) fails, and so does a response
whose headers never end (the connection closed first: keepalived's "no data received"); with a digest, the MD5 of
the body (up to Content-Length) must equal it. SSL_GET does the same over TLS and, like keepalived,
verifies no certificate: health is about the service answering, not about trust. With keepalived's top-level
`SSL { certificate; key; password; ca }` block, every SSL_GET presents that client certificate to a server that
asks for one (mutual TLS); the CA is loaded and, as in keepalived, checks nothing.
We add `Connection: close` (keepalived's 1.0C) so no server holds the connection open after answering, and, when
the url names a username (and password), `Authorization: Basic` with them. `http_protocol 1.1` asks in HTTP/1.1
(still with Connection: close); a url's own virtualhost is its Host header; SSL_GET with enable_sni sends the
virtualhost as TLS SNI.

connect_timeout bounds the whole exchange for one URL (connect, request, response).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import os
from typing import Dict, Optional, Tuple

from hdslb.config.model import HttpCheck, HttpUrl, RealServer, SslDefs
from hdslb.health.base import (DEFAULT_STATUS_CODES, CheckResult, close_without_time_wait, failed, hostport, local_addr,
                               os_reason, passed, seconds, target)

MAX_BODY = 16 * 1024 * 1024  # bytes hashed for a digest; a health page larger than this is a misconfiguration
LINE_LIMIT = 2 ** 16  # bytes: asyncio's StreamReader limit, the longest status or header line read

_insecure_ctx: Optional[ssl.SSLContext] = None


def _tls_context() -> ssl.SSLContext:
    """One shared client context that accepts any certificate (building a context per probe is costly)."""
    global _insecure_ctx
    if _insecure_ctx is None:
        _insecure_ctx = _accept_any()
    return _insecure_ctx


def _accept_any() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# SSL block -> (the files' stat when loaded, its context): built once, again only when a file changes on disk (a
# renewed certificate is presented from the next probe, as keepalived's next reload would)
_client_ctx: Dict[SslDefs, Tuple[tuple, ssl.SSLContext]] = {}


def _files(tls: SslDefs):
    return (("certificate", tls.certificate), ("key", tls.key), ("ca", tls.ca))


def _stamp(tls: SslDefs) -> tuple:
    out = []
    for _, path in _files(tls):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else None)
    return tuple(out)


def tls_client_context(tls: Optional[SslDefs]) -> ssl.SSLContext:
    """The context an SSL_GET connects with: the shared accept-anything one, or, with an SSL block, one presenting
    its client certificate (keepalived's build_ssl_ctx: SSL_CTX_use_certificate_chain_file, the key with its
    password, the CA's verify locations, and no SSL_VERIFY_PEER). Raises OSError/ssl.SSLError if a file does not
    load."""
    if tls is None or (tls.certificate is None and tls.ca is None):
        return _tls_context()
    stamp = _stamp(tls)
    hit = _client_ctx.get(tls)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    ctx = _accept_any()
    if tls.certificate is not None:
        ctx.load_cert_chain(tls.certificate, tls.key, password=tls.password if tls.password is not None else "")
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=tls.ca)
    _client_ctx[tls] = (stamp, ctx)
    return ctx


def tls_problem(tls: SslDefs) -> Optional[Tuple[str, str]]:
    """(keyword, why) for the SSL block's file that does not load, or None: for the loader to refuse it at its line."""
    for keyword, path in _files(tls):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            return keyword, f"cannot read {path}: {os_reason(e)}"
    ctx = _accept_any()
    if tls.certificate is not None:
        try:
            ctx.load_cert_chain(tls.certificate, tls.key, password=tls.password if tls.password is not None else "")
        except (ssl.SSLError, OSError, ValueError) as e:
            key = f" with key {tls.key}" if tls.key else " (its key in the same file)"
            want = "a PEM certificate and its private key" + (", and the key's password" if tls.password else "")
            return "certificate", f"{tls.certificate}{key} does not load: {getattr(e, 'reason', None) or e} ({want})"
    if tls.ca is not None:
        try:
            ctx.load_verify_locations(cafile=tls.ca)
        except (ssl.SSLError, OSError, ValueError) as e:
            return "ca", f"{tls.ca} does not load as PEM CA certificates: {getattr(e, 'reason', None) or e}"
    return None


def want_codes(url: HttpUrl) -> str:
    """'200', '200-299 503': status_code as the operator wrote it."""
    ranges = url.status_code or DEFAULT_STATUS_CODES
    return " ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


async def check_http(checker: HttpCheck, rs: RealServer) -> CheckResult:
    urls = checker.url
    if not urls:
        return passed("no url to fetch: up without checking (as keepalived)")
    for url in urls:
        result = await _check_url(checker, rs, url)
        if not result.ok:
            return result
    if len(urls) == 1:
        return result
    return passed(f"{len(urls)} URLs passed")


async def _check_url(checker: HttpCheck, rs: RealServer, url: HttpUrl) -> CheckResult:
    ip, port = target(checker, rs)
    where = hostport(ip, port)
    tls = None
    if checker.kind == "SSL_GET":
        try:
            tls = tls_client_context(checker.tls)
        except (ssl.SSLError, OSError, ValueError) as e:  # a file of the SSL block changed on disk since the load
            return failed(f"the SSL block's certificate no longer loads: {getattr(e, 'reason', None) or e}")
    stage = [f"connect to {where}"]  # the step a timeout interrupts, for the reason
    try:
        code, body = await asyncio.wait_for(_fetch(checker, ip, port, url, tls, stage), checker.connect_timeout)
    except asyncio.TimeoutError:
        return failed(f"{stage[0]} timed out after {seconds(checker.connect_timeout)}")
    except ConnectionRefusedError:
        return failed(f"connect to {where} refused")
    except _BadResponse as e:
        return failed(f"malformed HTTP response to GET {url.path} from {where}: {e}")
    except (ValueError, asyncio.LimitOverrunError) as e:
        # the stream's own limits (a line over its buffer limit, a negative length): a server answering
        # nonsense is down, not a bug of ours to log a traceback for every delay_loop
        return failed(f"malformed HTTP response to GET {url.path} from {where}: {e}")
    except ssl.SSLError as e:
        return failed(f"TLS with {where} failed: {e.reason or e}")
    except OSError as e:
        return failed(f"GET {url.path} from {where} failed: {os_reason(e)}")
    except asyncio.IncompleteReadError:
        return failed(f"{where} closed the connection before answering GET {url.path}")
    if not url.accepts(code):
        return failed(f"HTTP {code} from {url.path} (want {want_codes(url)})")
    if url.digest is not None:
        got = hashlib.md5(body, usedforsecurity=False).hexdigest()  # a checksum, not security
        if got != url.digest.lower():
            return failed(f"MD5 of {url.path} is {got} (want {url.digest.lower()})")
        return passed(f"HTTP {code} from {url.path}, digest matches")
    return passed(f"HTTP {code} from {url.path}")


class _BadResponse(Exception):
    pass


async def _fetch(checker: HttpCheck, ip, port: int, url: HttpUrl, tls: Optional[ssl.SSLContext],
                 stage: list) -> Tuple[int, bytes]:
    vhost = url.virtualhost or checker.virtualhost
    sni = vhost if tls is not None and checker.enable_sni and vhost else None  # keepalived's enable_sni: vhost
    reader, writer = await asyncio.open_connection(
        str(ip), port, ssl=tls, local_addr=local_addr(checker, ip), limit=LINE_LIMIT,
        server_hostname=sni if tls is not None else None)
    try:
        stage[0] = f"GET {url.path} from {hostport(ip, port)}"
        host = vhost or hostport(ip, port)  # keepalived: a virtualhost is sent without a port
        auth = ""
        if url.username is not None:  # keepalived's url username/password: HTTP basic authentication
            token = base64.b64encode(f"{url.username}:{url.password or ''}".encode("utf-8")).decode("ascii")
            auth = f"Authorization: Basic {token}\r\n"
        version = "1.1" if checker.http_protocol == "1.1" else "1.0"
        writer.write(f"GET {url.path} HTTP/{version}\r\nUser-Agent: KeepAliveClient\r\nHost: {host}\r\n{auth}"
                     f"Connection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        code, headers = await _read_head(reader)
        # Without a digest the body is never read: the status line is the whole answer.
        body = await _read_body(reader, headers) if url.digest is not None else b""
        return code, body
    finally:
        # abort(): no TLS close_notify round trip to wait for (keepalived sends none either by default).
        sock = writer.get_extra_info("socket")
        if sock is not None:
            close_without_time_wait(checker, sock)
        writer.transport.abort()


async def _line(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # readline's LimitOverrunError, as ValueError: the line does not fit the stream's buffer
        raise _BadResponse(f"{what} longer than {LINE_LIMIT} bytes") from None


async def _read_head(reader: asyncio.StreamReader) -> Tuple[int, dict]:
    line = await _line(reader, "status line")
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isascii() and parts[1].isdigit()):
        if not line:
            raise _BadResponse("connection closed without a status line")
        raise _BadResponse(f"status line {line[:60]!r}")
    headers = {}
    while True:
        h = await _line(reader, "header line")
        if h in (b"\r\n", b"\n"):
            break
        if not h.endswith(b"\n"):
            # keepalived's extract_html finds no end of the headers: "no data received", a failed check. A server
            # that dies after its status line (a crash, a proxy giving up) is not one that answered 200.
            raise _BadResponse("connection closed before the end of the headers")
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return await _read_chunked(reader)
    if "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            raise _BadResponse(f"Content-Length {headers['content-length']!r}") from None
        if n < 0:
            raise _BadResponse(f"Content-Length {n}")
        if n > MAX_BODY:
            raise _BadResponse(f"body of {n} bytes is over the {MAX_BODY}-byte limit for a digest")
        return await reader.readexactly(n)
    body = await reader.read(MAX_BODY + 1)
    while body and len(body) <= MAX_BODY:
        more = await reader.read(MAX_BODY + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > MAX_BODY:
        raise _BadResponse(f"body is over the {MAX_BODY}-byte limit for a digest")
    return body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await _line(reader, "chunk size line")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadResponse(f"chunk size {size_line[:20]!r}") from None
        if size < 0:
            raise _BadResponse(f"chunk size {size_line[:20]!r}")
        if size == 0:
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise _BadResponse(f"body is over the {MAX_BODY}-byte limit for a digest")
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
