"""ABI facts Python needs without bcc: sizes of the shared structs and the counter names, read from the header.

The header bpf/include/hdslb_abi.h is the single source of truth; the bpf test tier checks these sizes
against the ctypes types bcc derives from the compiled program.
"""

from __future__ import annotations

import re
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
ABI_HEADER = BPF_DIR / "include" / "hdslb_abi.h"

# Struct sizes (bytes) the loader needs before bcc has compiled anything (the conn maps are created first):
# conn6_map (IPv6 and NAT64 flows) has the wide key and value, conn4_map (IPv4 flows) the compact ones.
CONN_KEY_SIZE = 40
CONN_VAL_SIZE = 72
CONN4_KEY_SIZE = 16
CONN4_VAL_SIZE = 48

AF = {4: 4, 6: 6}
PROTO = {"tcp": 6, "udp": 17, "icmp": 1}
FWD = {"fnat": 1, "dr": 2, "nat": 3, "tunnel": 4, "snat": 5}
FWD_NAMES = {v: k for k, v in FWD.items()}

SVC_F_VALID = 0x1
SVC_F_PERSIST = 0x2
SCHED_RING = 1
SCHED_HASH = 2
SCHED_F_SPREAD = 0x1  # sched_tbl.flags: each CPU starts a new ring at cpu * len / ncpus (rr, wrr)
HKEY = {"": 0, "src": 1, "dst": 2, "src+port": 3}  # hdslb.sched Table.key -> HKEY_*
SNAT_F_VALID = 0x1
SNAT_RULES_MAX = 16
MAX_HASH_CELLS = 1 << 21  # the C default; the loader passes Sizes.max_hash_cells
MAX_PERSIST = 65536
DEST_F_VALID = 0x1
DEST_F_DRAIN = 0x2
DEST_F_NO_PERSIST = 0x4  # templates naming it are not honoured (see hdslb_abi.h)
DEST_SLOT_NONE = 0xFFFFFFFF
LOCAL_F_IFADDR = 0x1
LOCAL_F_LADDR = 0x2
LOCAL_F_SAPOOL = 0x4
LOCAL_F_VIP = 0x8
ROUTE_F_GW = 0x1
ROUTE_F_KNI = 0x2
NEIGH_F_PERMANENT = 0x1
NEIGH_F_LEARNED = 0x2
CONN_F_VALID = 0x1
CONN_F_OUT = 0x2
CONN_F_NEED_L2 = 0x4
CONN_F_XLAT = 0x8
CONN_F_WAS_EST = 0x10
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


def state_timeouts(timeouts: dict) -> list:
    """Idle timeout (seconds) per conn_state index, from the daemon's timeouts by name (syn_recv, established,
    fin_wait, close, udp): "none" is a SYN not yet answered (syn_recv), a state without its own timeout closes.
    The one rule the sweep, the fast path's port reclaiming (fp_cfg.idle_tmo) and ipvsadm -Lnc's expire use;
    a UDP flow is timed by the udp entry whatever its state."""
    return [timeouts.get({"none": "syn_recv"}.get(n, n), timeouts["close"]) for n in conn_states()]


def defines() -> dict[str, int]:
    """Every `#define NAME <integer>` of the header (flags, limits), for tests that the constants above match."""
    out = {}
    for m in re.finditer(r"^\s*#define\s+(\w+)\s+(\(?\s*(?:0x[0-9a-fA-F]+|\d+)(?:\s*<<\s*\d+)?\s*\)?)",
                         ABI_HEADER.read_text(), re.M):
        out[m.group(1)] = eval(m.group(2), {"__builtins__": {}})  # digits, 0x and << only (the regex says so)
    return out


def enum_values(name: str) -> dict[str, int]:
    """NAME -> value of an enum with explicit or implicit values (e.g. hdslb_fwd)."""
    m = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", ABI_HEADER.read_text(), re.S)
    if not m:
        raise RuntimeError(f"enum {name} not found in {ABI_HEADER}")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    out, nxt = {}, 0
    for item in (i.strip() for i in body.split(",")):
        if not item:
            continue
        k, _, v = item.partition("=")
        nxt = int(v.strip(), 0) if v.strip() else nxt
        out[k.strip()] = nxt
        nxt += 1
    return out
