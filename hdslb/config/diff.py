"""What a reload changes: services, real servers and local addresses to add/remove/update, and options that need a restart."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from .model import Config, LocalAddress, RealServer, Setting, VirtualServer, Where
from .schema import LB_ROOTS

VSKey = Tuple[str, str]  # VirtualServer.key: (protocol, "IP:PORT" | "group NAME")


@dataclass(frozen=True)
class OptionChange:
    """A `*_defs` option whose value differs; `old`/`new` is None where the option was not written."""

    path: str
    old: Any
    new: Any
    where: Where  # in the new file, or the old one for a removed option
    needs_restart: bool


@dataclass(frozen=True)
class ConfigDiff:
    vs_added: Tuple[VirtualServer, ...]
    vs_removed: Tuple[VirtualServer, ...]
    # service attributes or VIP set changed (real servers aside); (old, new)
    vs_changed: Tuple[Tuple[VirtualServer, VirtualServer], ...]
    # real servers of services present in both, keyed by the service
    rs_added: Tuple[Tuple[VSKey, RealServer], ...]
    rs_removed: Tuple[Tuple[VSKey, RealServer], ...]
    rs_changed: Tuple[Tuple[VSKey, RealServer, RealServer], ...]
    # local addresses per local_address_group name
    laddr_added: Tuple[Tuple[str, LocalAddress], ...]
    laddr_removed: Tuple[Tuple[str, LocalAddress], ...]
    # deny/allow groups whose networks changed (the ACL maps of services naming them are rewritten)
    acl_changed: Tuple[str, ...]
    options_changed: Tuple[OptionChange, ...]  # applied live
    init_changed: Tuple[OptionChange, ...]  # `<init>` or init-only: take effect after a restart

    @property
    def restart_needed(self) -> bool:
        return bool(self.init_changed)

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))


def diff(old: Config, new: Config) -> ConfigDiff:
    """Compare two loaded configs; applying the result to `old`'s running state yields `new`'s."""
    old_vs = {vs.key: vs for vs in old.virtual_servers}
    new_vs = {vs.key: vs for vs in new.virtual_servers}
    vs_changed, rs_added, rs_removed, rs_changed = [], [], [], []
    for key in old_vs.keys() & new_vs.keys():
        a, b = old_vs[key], new_vs[key]
        if _service(a) != _service(b) or old.endpoints(a) != new.endpoints(b):
            vs_changed.append((a, b))
        ra = {rs.key: rs for rs in a.real_servers}
        rb = {rs.key: rs for rs in b.real_servers}
        rs_added += [(key, rb[k]) for k in rb if k not in ra]
        rs_removed += [(key, ra[k]) for k in ra if k not in rb]
        rs_changed += [(key, ra[k], rb[k]) for k in ra if k in rb and ra[k] != rb[k]]

    laddr_added, laddr_removed = [], []
    for name in sorted(old.local_address_groups.keys() | new.local_address_groups.keys()):
        a = old.local_address_groups.get(name)
        b = new.local_address_groups.get(name)
        have = set(a.addresses) if a else set()
        want = set(b.addresses) if b else set()
        laddr_added += [(name, la) for la in (b.addresses if b else ()) if la not in have]
        laddr_removed += [(name, la) for la in (a.addresses if a else ()) if la not in want]

    acl_changed = []
    for groups_old, groups_new in ((old.deny_address_groups, new.deny_address_groups),
                                   (old.allow_address_groups, new.allow_address_groups)):
        for name in sorted(groups_old.keys() | groups_new.keys()):
            if groups_old.get(name) != groups_new.get(name):
                acl_changed.append(name)

    live, init = _split_options(old, new)
    return ConfigDiff(
        vs_added=tuple(new_vs[k] for k in new_vs if k not in old_vs),
        vs_removed=tuple(old_vs[k] for k in old_vs if k not in new_vs),
        vs_changed=tuple(vs_changed), rs_added=tuple(rs_added), rs_removed=tuple(rs_removed),
        rs_changed=tuple(rs_changed), laddr_added=tuple(laddr_added), laddr_removed=tuple(laddr_removed),
        acl_changed=tuple(acl_changed), options_changed=tuple(live), init_changed=tuple(init))


def _service(vs: VirtualServer) -> VirtualServer:
    return dataclasses.replace(vs, real_servers=())


def since_start(start: Config, new: Config) -> ConfigDiff:
    """The options `new` changes against the config a daemon started with (no services compared): what acts only
    from a start is judged against what runs, whatever files were accepted in between."""
    live, init = _split_options(start, new)
    return ConfigDiff(vs_added=(), vs_removed=(), vs_changed=(), rs_added=(), rs_removed=(), rs_changed=(),
                      laddr_added=(), laddr_removed=(), acl_changed=(), options_changed=tuple(live),
                      init_changed=tuple(init))


def _split_options(old: Config, new: Config) -> tuple[list, list]:
    """The changed options: (those applied on a reload, those that need a restart)."""
    live, init = [], []
    for change in _options(old.settings, new.settings):
        (init if change.needs_restart else live).append(change)
    return live, init


def _options(old: Dict[str, Setting], new: Dict[str, Setting]):
    """Settings outside the LB declarations, compared as written (a default that is spelled out still counts)."""
    for path in list(dict.fromkeys(list(old) + list(new))):
        if path.split("[", 1)[0].split(".", 1)[0] in LB_ROOTS:  # "[" first: labels hold dotted IPs
            continue
        a, b = old.get(path), new.get(path)
        if a is not None and b is not None and a.value == b.value:
            continue
        # Marked `<init>` in either file counts: DPVS ignores an <init> option on reload in both directions.
        restart = any(s.needs_restart for s in (a, b) if s is not None)
        yield OptionChange(path, a.value if a else None, b.value if b else None, (b or a).where, restart)
