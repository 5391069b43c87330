"""ABI facts Python needs without bcc: sizes of the shared structs and the counter names, read from the header.

The header bpf/include/hdslb_abi.h is the single source of truth; the bpf test tier checks these sizes
against the ctypes types bcc derives from the compiled program.
"""

from __future__ import annotations

import re
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
ABI_HEADER = BPF_DIR / "include" / "hdslb_abi.h"

# Struct sizes (bytes) the loader needs before bcc has compiled anything (the conn map is created first).
CONN_KEY_SIZE = 40
CONN_VAL_SIZE = 72

AF = {4: 4, 6: 6}
FWD = {"fnat": 1, "dr": 2, "nat": 3, "tunnel": 4, "snat": 5}
FWD_NAMES = {v: k for k, v in FWD.items()}

SVC_F_VALID = 0x1
DEST_F_VALID = 0x1
DEST_F_DRAIN = 0x2
DEST_SLOT_NONE = 0xFFFF
LOCAL_F_IFADDR = 0x1
LOCAL_F_LADDR = 0x2
LOCAL_F_SAPOOL = 0x4
ROUTE_F_GW = 0x1
ROUTE_F_KNI = 0x2
NEIGH_F_PERMANENT = 0x1
NEIGH_F_LEARNED = 0x2
CONN_F_VALID = 0x1
CONN_F_OUT = 0x2
SCHED_RING_MAX = 1024
LADDR_MAX = 16


def _enum(name: str, text: str) -> list[str]:
    m = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", text, re.S)
    if not m:
        raise RuntimeError(f"enum {name} not found in {ABI_HEADER}")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return [item.split("=")[0].strip() for item in body.split(",") if item.strip()]


def counter_names() -> list[str]:
    """Counter names in index order, lower-case without the CNT_ prefix (they double as metric labels)."""
    names = _enum("hdslb_counter", ABI_HEADER.read_text())
    assert names[-1] == "CNT_MAX"
    return [n[len("CNT_"):].lower() for n in names[:-1]]


def conn_states() -> list[str]:
    return [n[len("CS_"):].lower() for n in _enum("conn_state", ABI_HEADER.read_text())]
