"""Shared test policy: root tiers (bpf, e2e) skip on a developer's unprivileged run but fail loudly in CI."""

import os
from pathlib import Path

import pytest

ROOT_TIERS = ("bpf", "e2e")


def _root_tiers_asked(config) -> list[str]:
    """The root tiers the command line's paths take in (all of them for a bare `pytest`, via testpaths)."""
    here = Path(__file__).resolve().parent
    asked = [Path(a.split("::")[0]).resolve() for a in config.args] or [here]
    return [t for t in ROOT_TIERS
            if any((here / t).is_relative_to(a) or a.is_relative_to(here / t) for a in asked)]


def pytest_configure(config):
    # Up front, before any collection: under pytest-xdist (make test) collection runs in the workers, where a
    # UsageError only crashes a worker with the reason lost.
    if os.geteuid() != 0 and os.environ.get("CI") and (tiers := _root_tiers_asked(config)):
        raise pytest.UsageError(f"the {' and '.join(tiers)} tier needs root and CI must run it as root")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    for item in items:
        parts = item.nodeid.split("/")
        if len(parts) > 1 and parts[1] in ROOT_TIERS:
            if os.environ.get("CI"):
                item.add_marker(pytest.mark.xfail(reason="root tier in CI without root", strict=True, run=False))
                raise pytest.UsageError(f"{item.nodeid}: the {parts[1]} tier needs root and CI must run it as root")
            item.add_marker(pytest.mark.skip(reason=f"{parts[1]} tier needs root"))
