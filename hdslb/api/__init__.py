"""The REST side of the control plane: a dpvs-agent shaped HTTP API, its OpenAPI document and /metrics."""

from __future__ import annotations

import inspect

from hdslb.ctl import commands

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 53225  # dpvs-agent's port: automation written for DPVS finds us where it looks


def dispatch(ctx, op: str, args: dict):
    """Run one control op the way the control socket does.

    The daemon's own `dispatch` is preferred because it persists the model after every change; a bare context
    (unit tests) goes straight to the command registry. Either way the same command functions run.
    """
    fn = getattr(ctx, "dispatch", None)
    return fn(op, args) if callable(fn) else commands.dispatch(ctx, op, args)


async def dispatch_async(ctx, op: str, args: dict):
    res = dispatch(ctx, op, args)
    if inspect.isawaitable(res):  # e.g. daemon.reload_datapath returns a coroutine
        res = await res
    return res


def start_api(*a, **kw):
    """See hdslb.api.app.start_api (imported lazily so `hdslb.api` stays importable without aiohttp)."""
    from hdslb.api.app import start_api as _start

    return _start(*a, **kw)


def stop_api(*a, **kw):
    from hdslb.api.app import stop_api as _stop

    return _stop(*a, **kw)
