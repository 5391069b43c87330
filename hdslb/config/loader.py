"""Reads hdslb.conf against the keyword table into a Config: all of it or an error, never part of it.

The walk keeps going after a bad statement so `check()` can report every error at once, as
`keepalived -t` does; `load()` raises the first. Syntax errors (braces, quotes, includes) stop at once:
nothing after them can be trusted.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from . import model as m
from .kinds import Bad
from .model import Config, ConfigError, Notice, Setting, Where
from .schema import MISSING, ROOT, Block, Key, lookup
from .syntax import Node, Reader, parse


def load(path: str, config_id: Optional[str] = None) -> Config:
    """Read `path` and everything it includes; raise ConfigError (the first of them) if anything is wrong.
    config_id: what keepalived's `@ID` lines are matched against (keepalived -i); None: the node name."""
    reader = Reader(config_id=config_id)
    nodes = parse(reader.read_file(path))
    return _build(nodes, path, reader.files, reader.notices, reader.text)


def loads(text: str, name: str = "<string>", base_dir: Optional[str] = None, *, posted: bool = False,
          config_id: Optional[str] = None) -> Config:
    """Like load() for text in hand; `include` resolves against base_dir (default: name's directory, or cwd).

    posted=True: the text came over the network (POST /v2/config, config.reload with text), not from a file root
    wrote. It may then contain nothing that reads a file or runs a program (POSTED_REFUSED): a ConfigError with
    errno EPERM names every such line, and says to put it in the config file on disk."""
    reader = Reader(allow_include=not posted, config_id=config_id)
    if base_dir is None:
        base_dir = os.path.dirname(name) if os.path.exists(name) else os.getcwd()
    nodes = parse(reader.read_text(text, name, base_dir))
    if posted:
        _refuse_posted(nodes)
    return _build(nodes, name, [name] + reader.files, reader.notices, text)


# What a posted configuration may not contain, and why: each reads a file or runs a program as root. `include`
# is refused by the Reader (it would splice any file's words into the text, and errors would echo them).
POSTED_REFUSED = {
    "MISC_CHECK": "runs a program",
    "SSL": "reads certificate and key files",
    "misc_path": "names a program to run",
    "notify_up": "names a script",
    "notify_down": "names a script",
    "quorum_up": "names a script",
    "quorum_down": "names a script",
}
POSTED_HINT = "a configuration sent over the API may not read files or run programs; put it in the config file " \
              "on disk and reload from the file (SIGHUP / systemctl reload hdslb)"


def _refuse_posted(nodes: List[Node]) -> None:
    errors: List[ConfigError] = []
    stack = list(reversed(nodes))
    while stack:
        n = stack.pop()
        why = POSTED_REFUSED.get(n.name)
        if why is not None:
            errors.append(ConfigError(n.where, n.name, f"{why}: {POSTED_HINT}"))
            continue  # what is inside a refused block is not looked at
        stack.extend(reversed(n.body or ()))
    if errors:
        for e in errors:
            e.errno = errno.EPERM
        errors[0].errors = tuple(errors)
        raise errors[0]


def check(path: str, config_id: Optional[str] = None) -> List[str]:
    """Every error in `path` as `FILE:LINE:COL: KEYWORD: reason`; empty means it loads (`hdslb-ctl check -f`)."""
    try:
        load(path, config_id)
    except ConfigError as e:
        return [str(x) for x in e.errors]
    return []


# ---------------------------------------------------------------- the walk


@dataclass(frozen=True)
class _Scope:
    """What an enclosing block passes down."""

    path: str
    label: str  # how errors name this block: "rx", "virtual_server 10.0.0.1 80"; "" at the top level
    marked: bool  # an enclosing `<init>`
    init_only: bool  # an enclosing block is init-only in the table
    na: bool  # inside a not-applicable block: children are type-checked but not noticed one by one


class _Ctx:
    def __init__(self) -> None:
        self.errors: List[ConfigError] = []
        self.notices: List[Notice] = []
        self.settings: Dict[str, Setting] = {}
        self.refs: List[Tuple[str, str, Where]] = []  # (keyword, group name, where): resolved at the end

    def error(self, where: Optional[Where], keyword: str, reason: str) -> None:
        self.errors.append(ConfigError(where or Where("<default>", 0, 0), keyword, reason))

    def bad(self, b: Bad, node: Node) -> None:
        self.error(b.token.where if b.token is not None else node.where, node.name, b.reason)

    def notice(self, where: Optional[Where], keyword: str, reason: str) -> None:
        if where is not None:
            self.notices.append(Notice(where.file, where.line, keyword, reason))

    def ref(self, keyword: str, name: str, where: Where) -> None:
        self.refs.append((keyword, name, where))

    @staticmethod
    def where_of(node: Optional[Node], keyword: str) -> Optional[Where]:
        """Where `keyword`'s value (or the keyword, for a flag) is written inside `node`: for errors
        found only once the whole block is read."""
        if node is None:
            return None
        for child in node.body or ():
            if child.name == keyword:
                return child.args[0].where if child.args else child.where
        return node.where


def _build(nodes: List[Node], source: str, files: List[str], read_notices: List[Notice] = (),
           text: Optional[str] = None) -> Config:
    ctx = _Ctx()
    ctx.notices.extend(read_notices)  # the reader's (files an include skipped), before the keywords'
    top = _Scope(path="", label="", marked=False, init_only=False, na=False)
    fields = _read_children(ROOT, None, nodes, top, ctx)
    _link(fields, ctx)
    _ssl_to_checkers(fields, ctx)
    if ctx.errors:
        first = ctx.errors[0]
        first.errors = tuple(ctx.errors)
        raise first
    return Config(source=source, files=tuple(dict.fromkeys(files)), notices=tuple(ctx.notices),
                  settings=dict(ctx.settings), text=text, **fields)


def _read_children(spec: Block, owner: Optional[Node], body: List[Node], scope: _Scope, ctx: _Ctx) -> Dict[str, Any]:
    table = lookup(spec)
    values: Dict[str, Any] = {}  # field → value, or a list for multi
    first: Dict[str, Node] = {}  # field → where a singular option was first given
    seen: Dict[str, int] = {}  # keyword → blocks of it so far, to tell unnamed repeats apart in paths
    for n in body:
        hit = table.get(n.name)
        if hit is None and spec.others is not None:
            other = spec.others(n.name)
            hit = (n.name, other) if other is not None else None
        if hit is None:
            ctx.error(n.where, n.name, _unknown(n.name, scope, table))
            continue
        kw, child = hit
        if isinstance(child, Block) and child.refuse is not None:
            ctx.error(n.where, n.name, child.refuse)
            continue
        fname = child.field or kw
        if not child.multi and fname in first:
            ctx.error(n.where, n.name, f"given twice{_in(scope)} (first at line {first[fname].where.line})")
            continue
        marked = scope.marked or n.init is not None
        init_only = scope.init_only or child.init
        applies = not (scope.na or child.na)
        if isinstance(child, Key):
            if n.body is not None:
                ctx.error(n.lbrace.where, n.name, "takes a value, not a '{ }' block")
                continue
            try:
                value = child.kind.parse(n.keyword, n.args)
            except Bad as b:
                ctx.bad(b, n)
                continue
            path = _join(scope.path, kw)
            if child.multi:
                path += f"[{len(values.setdefault(fname, []))}]"
                values[fname].append(value)
            else:
                values[fname] = value
            ctx.settings[path] = Setting(path, kw, value, n.where, marked, init_only, applies)
        else:
            if child.opaque:
                ctx.notice(n.where, n.name, child.na)
                continue
            if n.body is None:
                ctx.error(n.where, n.name, "needs a '{ … }' block")
                continue
            label = " ".join(a.text for a in n.args)
            index = seen[kw] = seen.get(kw, -1) + 1
            path = _join(scope.path, kw) + (f"[{label}]" if label else f"[{index}]" if child.multi else "")
            sub = _Scope(path, f"{kw} {label}".strip(), marked, init_only, not applies)
            if label:
                ctx.settings[path] = Setting(path, kw, label, n.where, marked, init_only, applies)
            try:
                value = _read_block(child, n, sub, ctx)
            except Bad as b:
                ctx.bad(b, n)
                continue
            if child.build is None:
                pass
            elif child.multi:
                values.setdefault(fname, []).append((value, n))
            else:
                values[fname] = value
        if child.na and not scope.na:
            ctx.notice(n.where, n.name, child.na)
        if not child.multi:
            first[fname] = n
    return _finish(spec, owner, scope, values, ctx)


def _read_block(spec: Block, node: Node, scope: _Scope, ctx: _Ctx) -> Any:
    if spec.header is not None:
        header = spec.header(node)
    elif node.args:
        raise Bad(f"takes no value before '{{'", node.args[0])
    else:
        header = {}
    if spec.entries is not None:
        return _read_entries(spec, node, header, scope, ctx)
    fields = _read_children(spec, node, node.body, scope, ctx)
    obj = _construct(spec, node, {**fields, **header})
    return spec.check(node, obj, ctx) if spec.check is not None and obj is not None else obj


def _read_entries(spec: Block, node: Node, header: Dict[str, Any], scope: _Scope, ctx: _Ctx) -> Any:
    items: List[Any] = []
    seen: Dict[Any, Node] = {}
    for e in node.body:
        if e.body is not None:
            ctx.error(e.lbrace.where, e.name, "a list entry takes no '{ }' block")
            continue
        try:
            got = spec.entries(e)
        except Bad as b:
            ctx.bad(b, e)
            continue
        for item in got:
            if item in seen:
                ctx.error(e.where, e.name, f"{item} is listed twice{_in(scope)} "
                                           f"(first at line {seen[item].where.line})")
                continue
            seen[item] = e
            items.append(item)
    ctx.settings[scope.path] = Setting(scope.path, node.name, tuple(items), node.where, scope.marked,
                                       scope.init_only, not scope.na)
    if spec.build is None:
        return None
    if spec.entries_field is None:
        return spec.build(items)
    return _construct(spec, node, {**header, spec.entries_field: tuple(items)})


def _construct(spec: Block, node: Optional[Node], fields: Dict[str, Any]) -> Any:
    if spec.build is None:
        return None
    kwargs = {**fields, **spec.fixed}
    if _has_where(spec.build):
        kwargs["where"] = node.where if node is not None else None
    return spec.build(**kwargs)


def _finish(spec: Block, owner: Optional[Node], scope: _Scope, values: Dict[str, Any], ctx: _Ctx) -> Dict[str, Any]:
    """Fill defaults, report missing required options, and collapse repeats (refusing duplicates)."""
    out: Dict[str, Any] = {}
    for kw, child in spec.children.items():
        fname = child.field or kw
        if child.na or fname in out or (isinstance(child, Block) and child.build is None):
            continue
        if fname in values:
            v = values[fname]
            out[fname] = _collect(child, v, scope, ctx) if isinstance(child, Block) and child.multi else \
                tuple(v) if child.multi else v
        elif child.multi:
            out[fname] = {} if isinstance(child, Block) and child.collect == "dict" else ()
        else:
            if child.required and owner is not None:
                ctx.error(owner.where, owner.name, f"needs `{kw}`")
            if isinstance(child, Key):
                out[fname] = child.default
            elif child.default is not MISSING:
                out[fname] = child.default
            else:
                # An absent block is its children's defaults, e.g. no `fragment { }` = DPVS's fragment policy.
                out[fname] = _construct(child, None, _finish(child, None, scope, {}, ctx))
    return out


def _collect(spec: Block, items: List[Tuple[Any, Node]], scope: _Scope, ctx: _Ctx) -> Any:
    """Repeated blocks in file order; with a key, the second of two equal ones is an error."""
    by_key: Dict[Any, Tuple[Any, Node]] = {}
    kept = []
    for obj, node in items:
        if spec.key is not None:
            k = spec.key(obj)
            if k in by_key:
                ctx.error(node.where, node.name, f"duplicate {node.name} {k}{_in(scope)} "
                                                 f"(first at {by_key[k][1].where})")
                continue
            by_key[k] = (obj, node)
        kept.append(obj)
    if spec.collect == "dict":
        return {spec.key(o): o for o in kept}
    return tuple(kept)


_WHERE_CACHE: Dict[Any, bool] = {}


def _has_where(build: Any) -> bool:
    if build not in _WHERE_CACHE:
        _WHERE_CACHE[build] = dataclasses.is_dataclass(build) and \
            any(f.name == "where" for f in dataclasses.fields(build))
    return _WHERE_CACHE[build]


def _join(path: str, kw: str) -> str:
    return f"{path}.{kw}" if path else kw


def _in(scope: _Scope) -> str:
    return f" in {scope.label}" if scope.label else ""


def _unknown(word: str, scope: _Scope, table: Dict[str, Any]) -> str:
    near = difflib.get_close_matches(word, list(table), n=1, cutoff=0.75)
    hint = f"; did you mean `{near[0]}`?" if near else ""
    return f"unknown keyword{_in(scope) or ' at the top level'}{hint}"


# ---------------------------------------------------------------- rules across the whole file

_REF_TARGETS = {
    "virtual_server group": ("virtual_server_groups", "virtual_server_group"),
    "laddr_group_name": ("local_address_groups", "local_address_group"),
    "daddr_group_name": ("deny_address_groups", "deny_address_group"),
    "waddr_group_name": ("allow_address_groups", "allow_address_group"),
}


# keepalived's lvs_timeouts names -> the ipvs_defs option that sets the same timeout
LVS_TIMEOUT_PATHS = {"tcp": "ipvs_defs.tcp.timeout.established", "tcpfin": "ipvs_defs.tcp.timeout.fin_wait",
                     "udp": "ipvs_defs.udp.timeout.normal"}


def _timeouts_agree(fields: Dict[str, Any], ctx: _Ctx) -> None:
    """A timeout set both by `lvs_timeouts` and in an ipvs_defs timeout block: the same value, or an error naming
    both places (neither silently wins; which one the operator meant is theirs to say)."""
    lvs = ctx.settings.get("global_defs.lvs_timeouts")
    if lvs is None:
        return
    for name, secs in lvs.value:
        st = ctx.settings.get(LVS_TIMEOUT_PATHS[name])
        if st is not None and st.value != secs:
            ctx.error(lvs.where, "lvs_timeouts", f"{name} {secs} differs from `{st.keyword} {st.value}` at {st.where} "
                                                 f"({LVS_TIMEOUT_PATHS[name]}), the same timeout: set it in one "
                                                 f"place, or to the same value in both")


def _ssl_to_checkers(fields: Dict[str, Any], ctx: _Ctx) -> None:
    """keepalived's SSL block is the one TLS context of every SSL_GET: each SSL_GET checker carries it (so a reload
    that changes it restarts them, as it would any changed setting of theirs)."""
    tls = fields["ssl"]
    if tls is None:
        return
    used = False
    vss = []
    for vs in fields["virtual_servers"]:
        rss = []
        for rs in vs.real_servers:
            if any(c.kind == "SSL_GET" for c in rs.checkers):
                used = True
                rs = dataclasses.replace(rs, checkers=tuple(dataclasses.replace(c, tls=tls) if c.kind == "SSL_GET"
                                                            else c for c in rs.checkers))
            rss.append(rs)
        vss.append(dataclasses.replace(vs, real_servers=tuple(rss)) if rss != list(vs.real_servers) else vs)
    fields["virtual_servers"] = tuple(vss)
    if not used:
        ctx.notice(tls.where, "SSL", "accepted, not acted on: no SSL_GET in this configuration uses it (checks added "
                                     "with check.add do not either)")


def _link(fields: Dict[str, Any], ctx: _Ctx) -> None:
    """Names point at groups that exist (anywhere in the file, as keepalived allows); no VIP:port is served twice;
    a timeout set twice is set alike."""
    _timeouts_agree(fields, ctx)
    for keyword, name, where in ctx.refs:
        fname, what = _REF_TARGETS[keyword]
        if name not in fields[fname]:
            ctx.error(where, keyword.split()[0], f"no {what} named {name!r}")
    served: Dict[Tuple[str, m.Endpoint], m.VirtualServer] = {}
    groups = fields["virtual_server_groups"]
    for vs in fields["virtual_servers"]:
        if vs.match is not None:  # a SNAT service has no VIP (two with the same match: apply.desired says so)
            continue
        if vs.group is not None:
            endpoints = groups[vs.group].members if vs.group in groups else ()
        else:
            endpoints = (m.Endpoint(vs.ip, vs.port),)
        for ep in endpoints:
            other = served.setdefault((vs.protocol, ep), vs)
            if other is not vs:
                ctx.error(vs.where, "virtual_server", f"{ep}/{vs.protocol} is already served by "
                                                      f"virtual_server {other.key[1]} at {other.where}")
