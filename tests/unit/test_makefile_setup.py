"""`make setup` on a fresh Debian box: every program its recipe runs comes from a package it installs."""

import re
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"


def _apt_pkgs() -> set[str]:
    m = re.search(r"^APT_PKGS\s*:=\s*(.+)$", MAKEFILE.read_text(), re.M)
    assert m, "Makefile has no APT_PKGS line"
    return set(m.group(1).split())


def test_setup_installs_the_venv_module_it_uses():
    # Debian's python3 has no ensurepip: `python3 -m venv` fails until python3-venv is installed.
    assert "python3 -m venv" in MAKEFILE.read_text()
    assert "python3-venv" in _apt_pkgs()
