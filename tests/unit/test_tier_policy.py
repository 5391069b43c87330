"""The root tiers skip on a developer's unprivileged run and fail loudly, up front and with the reason, in CI: also
under pytest-xdist, as `make test` runs them (collection happens in the workers, where a refusal only crashed a
worker with the reason lost)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AS_USER = ["unshare", "--user"] if os.geteuid() == 0 else []  # a user namespace: euid 65534, no privilege


def _pytest(env_ci: bool, *args):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if env_ci:
        env["CI"] = "1"
    return subprocess.run(AS_USER + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_ci_without_root_refuses_the_root_tiers_before_collecting():
    r = _pytest(True, "-n", "2", "tests/bpf/test_decap.py")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "the bpf tier needs root and CI must run it as root" in r.stderr, r.stderr


def test_an_unprivileged_developer_run_skips_them():
    r = _pytest(False, "tests/bpf/test_decap.py")
    assert r.returncode == 0 and " skipped" in r.stdout and "passed" not in r.stdout, r.stdout + r.stderr
