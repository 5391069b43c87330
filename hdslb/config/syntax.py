r"""keepalived/DPVS config syntax: tokens with file:line:col, `include` splicing, and a tree of statements.

No keyword is known here; schema.py gives them meaning. The grammar, as keepalived and DPVS read it:

    statement := ["<init>"] WORD arg* ( "{" statement* "}" )? (newline | ";")
    arg       := WORD | "double-quoted string"

Lines are read as keepalived's parser (lib/parser.c read_line) reads them, so a keepalived.conf means the same:
`!` and `#` start a comment anywhere outside a double-quoted string (`\#` and `\!` are the characters
themselves); a word starting with `<` (but `<init>`) starts DPVS's inline range comment, which ends at the next `>`; a line starting `@ID` is kept only when ID is the config id (keepalived -i; by default the host's
node name), `@^ID` only when it is not; `$NAME=TEXT` defines a parameter (a trailing `\` continues TEXT on the next
line) and `$NAME` or `${NAME}` later in the text is replaced by it (`$_PWD`: the directory of the file being read,
`$_INSTANCE`: the config id). A `{` may sit on the line after its keyword. `include GLOB` is replaced by the tokens
of the files it names, relative to the including file, which is why it works anywhere, even inside a block; its
argument is one word taken whole, braces and all (`conf.d/{web,db}/*.conf`: glob(3)'s GLOB_BRACE, as keepalived
globs), and what the glob matches that is not a regular, non-executable file is skipped with a notice.
A file is read as bytes, as keepalived reads it: bytes that are not UTF-8 may sit in a comment; elsewhere they are an
error at their line and column.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .model import ConfigError, Notice, Where

WORD, STRING, LBRACE, RBRACE, SEMI, INIT, EOL, EOF = "word", "string", "{", "}", ";", "<init>", "eol", "eof"

_PUNCT = {"{": LBRACE, "}": RBRACE, ";": SEMI}
_COMMENT = "!#"
MAX_INCLUDE_DEPTH = 32  # deeper than any sane layout; stops a runaway before the stack does


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    where: Where

    def __str__(self) -> str:
        return self.text


@dataclass
class Node:
    """One statement: keyword, its arguments, and (for a block) the statements inside."""

    keyword: Token
    args: List[Token]
    body: Optional[List["Node"]]  # None: not a block
    init: Optional[Token]  # the `<init>` in front of it, if any
    lbrace: Optional[Token] = None

    @property
    def where(self) -> Where:
        return self.keyword.where

    @property
    def name(self) -> str:
        return self.keyword.text


def default_config_id() -> str:
    """keepalived's default config id (what `@ID` lines are matched against): the node name, up to its first dot."""
    return socket.gethostname().split(".")[0]


_DEF_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_EXPANSIONS = 64  # substitutions in one line: a parameter defined through itself never ends


@dataclass
class Params:
    """What keepalived's reader carries from line to line and file to file: the config id and `$NAME` definitions."""

    config_id: Optional[str] = None
    defs: Dict[str, List[str]] = field(default_factory=dict)  # name -> its lines (one unless continued with `\`)
    _open: Optional[str] = None  # the multi-line definition being read

    def lines(self, text: str, file: str) -> Iterator[Tuple[int, str]]:
        """(line number, text to tokenize) for each line of `text`, as keepalived would see it. A generator: a line
        is read (its definitions made, its parameters replaced) only once the lines before it, and the files they
        include, have been, as keepalived reads them."""
        for lineno, raw in enumerate(text.splitlines(), 1):
            line, cont = _decomment(raw)
            _utf8_only(line, Where(file, lineno, 1))
            if self._open is not None:
                if not line.strip():
                    self._open = None
                    continue
                self.defs[self._open].append(line.lstrip())
                if not cont:
                    self._open = None
                continue
            if not line.strip():
                continue
            if cont:
                line += "\\"  # a `\` ends the line: only a definition continues; elsewhere it stays a character
            for text_ in self._line(line, Where(file, lineno, 1), file):
                yield lineno, text_
        self._open = None

    def _line(self, line: str, where: Where, file: str) -> List[str]:
        pending, out, n = [line], [], 0
        while pending:
            line = pending.pop(0)
            word = line.lstrip()
            if word.startswith("@"):
                parts = word[1:].split(None, 1)
                tag, rest = (parts[0], parts[1]) if len(parts) == 2 else (word[1:], "")
                negate = tag.startswith("^")
                if negate:
                    tag = tag[1:]
                if not rest or (tag == self.config_id) == negate:
                    continue
                line = " " * (len(line) - len(rest)) + rest  # blanks for `@ID `: columns stay the file's
                word = rest
            if word.startswith("$") and self._define(word, file):
                continue
            if word.startswith("~SEQ"):
                raise ConfigError(where, "~SEQ", "keepalived's ~SEQ line generator is not supported: write the lines "
                                                 "out (or generate the file)")
            if "$" in line:
                n += 1
                if n > MAX_EXPANSIONS:
                    raise ConfigError(where, "$", f"parameters still unexpanded after {MAX_EXPANSIONS} substitutions "
                                                  f"(a parameter defined through itself?)")
                got = self._substitute(line, file)
                if got is not None:
                    pending[:0] = got
                    continue
            out.append(line)
        return out

    def _define(self, line: str, file: str) -> bool:
        m = _DEF_NAME.match(line, 1)
        if m is None:
            return False
        rest = line[m.end():].lstrip(" \t")
        if not rest.startswith("="):
            return False
        value = rest[1:].lstrip(" \t")
        multi = value.endswith("\\")
        if multi:
            value = value[:-1].rstrip(" \t")
        self.defs[m.group()] = [value] if value or not multi else []
        if multi:
            self._open = m.group()
        return True

    def _value(self, name: str, file: str) -> Optional[List[str]]:
        if name in self.defs:
            return self.defs[name]
        if name == "_PWD":
            return [os.path.dirname(os.path.abspath(file))]
        if name == "_INSTANCE" and self.config_id is not None:
            return [self.config_id]
        return None

    def _substitute(self, line: str, file: str) -> Optional[List[str]]:
        """The first defined `$NAME`/`${NAME}` replaced; None if there is none. A multi-line parameter must end
        its line (as keepalived allows): its first line takes the reference's place, the others follow."""
        for m in re.finditer(r"\$(\{)?([A-Za-z_][A-Za-z0-9_]*)(\})?", line):
            braces, name = m.group(1), m.group(2)
            if braces and not m.group(3):
                continue
            end = m.end()
            if not braces and end < len(line) and line[end] not in " \t,)":
                continue
            value = self._value(name, file)
            if value is None or (len(value) > 1 and line[end:].strip()):
                continue
            head = line[:m.start()] + (value[0] if value else "") + line[end:]
            return [head] + value[1:]
        return None


def _decomment(raw: str) -> Tuple[str, bool]:
    r"""keepalived's decomment(): drop the comment (an unquoted `!` or `#` anywhere), unescape `\#` and `\!`
    outside quotes, strip trailing blanks (leading ones stay, for columns); True if the line ended with a `\`."""
    out: List[str] = []
    quote, i, n = False, 0, len(raw)
    while i < n:
        c = raw[i]
        if c == '"':
            quote = not quote
        elif c == "\\":
            if i + 1 >= n:
                return "".join(out).rstrip(), True
            if not quote and raw[i + 1] in "#!":
                out.append(raw[i + 1])
                i += 2
                continue
            out.append(raw[i:i + 2])
            i += 2
            continue
        elif not quote and c in _COMMENT:
            # the comment is dropped, but a `\` ending the line still continues it (keepalived scans on)
            while i < n:
                if raw[i] == "\\":
                    if i + 1 >= n:
                        return "".join(out).rstrip(), True
                    i += 2
                else:
                    i += 1
            break
        out.append(c)
        i += 1
    return "".join(out).rstrip(), False


_UNDECODED = re.compile("[\udc80-\udcff]+")  # bytes that were not UTF-8, as decode(errors="surrogateescape") keeps them


def decode(data: bytes) -> str:
    """A config file's bytes as text. keepalived reads bytes, so a stray byte in a comment is nothing to it; here
    bytes that are not UTF-8 are kept (as lone surrogates) for the reader to refuse where they matter: outside
    comments (_utf8_only), after _decomment has dropped those."""
    return data.decode("utf-8", errors="surrogateescape")


def _utf8_only(line: str, where: Where) -> None:
    m = _UNDECODED.search(line)
    if m is not None:
        shown = "".join(f"\\x{ord(c) - 0xdc00:02x}" for c in m.group())
        raise ConfigError(Where(where.file, where.line, m.start() + 1), "encoding",
                          f"bytes {shown} are not UTF-8 (only a comment may hold such bytes): write the file as UTF-8")


def tokenize(text: str, file: str, params: Optional[Params] = None) -> List[Token]:
    """Split one file's text; ends with an EOF token. Raises ConfigError for an unterminated string."""
    if params is None:
        params = Params(config_id=default_config_id())
    toks = [t for line in _line_tokens(text, file, params) for t in line]
    toks.append(Token(EOF, "", Where(file, len(text.splitlines()) + 1, 1)))
    return toks


def _line_tokens(text: str, file: str, params: Params) -> Iterator[List[Token]]:
    """The tokens of each line of `text` (each list ends with the line's EOL), one line at a time: what a line
    defines (`$NAME=`) holds from the next, after whatever the lines before included."""
    if text.startswith("\ufeff"):  # a byte-order mark some editors write: not part of the first keyword
        text = text[1:]
    for lineno, line in params.lines(text, file):
        yield _tokenize_line(line, lineno, file)


def _tokenize_line(line: str, lineno: int, file: str) -> List[Token]:
    toks: List[Token] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c.isspace():
            i += 1
        elif c in _PUNCT:
            toks.append(Token(_PUNCT[c], c, Where(file, lineno, i + 1)))
            i += 1
        elif c == '"':
            start, i, buf = i, i + 1, []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(line[i])
                i += 1
            if i >= n:
                raise ConfigError(Where(file, lineno, start + 1), '"', "unterminated string")
            toks.append(Token(STRING, "".join(buf), Where(file, lineno, start + 1)))
            i += 1
        elif c == "<" and not _is_init(line, i):
            # DPVS's inline range comment (dpvs.conf: "using '<' and '>', put comment in between"), as its
            # items file writes `queue_number 6 <16, 0-16>`: to the next `>` on the line
            end = line.find(">", i)
            if end < 0:
                raise ConfigError(Where(file, lineno, i + 1), "<", "unterminated range comment: a `<` starts a "
                                  "DPVS inline comment, which ends with `>` on the same line")
            i = end + 1
        else:
            start = i
            while i < n and not line[i].isspace() and line[i] not in _PUNCT and line[i] != '"':
                i += 1
            word = line[start:i]
            at_start = not toks or toks[-1].kind in (SEMI, LBRACE, RBRACE)
            toks.append(Token(INIT if word == "<init>" else WORD, word, Where(file, lineno, start + 1)))
            if word == "include" and at_start:
                i = _include_arg(line, i, file, lineno, toks)
    toks.append(Token(EOL, "", Where(file, lineno, len(line) + 1)))
    return toks


def _is_init(line: str, i: int) -> bool:
    """Whether the word at line[i] is the `<init>` marker (not a DPVS `<…>` comment)."""
    end = i + len("<init>")
    return line.startswith("<init>", i) and (end >= len(line) or line[end].isspace() or line[end] in _PUNCT)


def _include_arg(line: str, i: int, file: str, lineno: int, toks: List[Token]) -> int:
    """The word after `include`, taken whole: braces in it are the glob's (`conf.d/{web,db}/*.conf`, keepalived's
    GLOB_BRACE), not a block. It ends at a blank, or at a `;` or a `}` outside its braces (so `{ include x.conf }`
    still closes the block). A quoted name is an ordinary string. Returns where the tokenizer goes on."""
    n = len(line)
    while i < n and line[i].isspace():
        i += 1
    if i >= n or line[i] == '"':
        return i
    start, depth = i, 0
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n:
            i += 2
            continue
        if c.isspace() or c == '"' or (depth == 0 and c in ";}"):
            break
        depth += c == "{"
        depth -= c == "}"
        i += 1
    if i > start:
        toks.append(Token(WORD, line[start:i], Where(file, lineno, start + 1)))
    return i


class Reader:
    """Reads a file and everything it includes; remembers every file read, for the reload watcher."""

    def __init__(self, allow_include: bool = True, config_id: Optional[str] = None) -> None:
        self.files: List[str] = []
        self.text: Optional[str] = None  # the top file's text as read (its stray bytes kept as surrogates)
        self.notices: List[Notice] = []  # what an include's glob matched and was skipped (keepalived skips it too)
        self.allow_include = allow_include  # False: text from the network (see loader.loads posted=True)
        # `@ID` lines and `$NAME` definitions, shared by every file read in file order, as in keepalived: a definition
        # holds in the lines after it and in what they include, and one made in an included file holds after its
        # include line
        self.params = Params(config_id=default_config_id() if config_id is None else config_id)

    def read_file(self, path: str) -> List[Token]:
        return self._file(path, stack=(), at=None) + [Token(EOF, "", Where(path, 0, 0))]

    def read_text(self, text: str, name: str, base_dir: str) -> List[Token]:
        stack = (os.path.realpath(name),) if os.path.exists(name) else ()
        return self._read(text, name, base_dir, stack) + [Token(EOF, "", Where(name, len(text.splitlines()) + 1, 1))]

    def _file(self, path: str, stack: Tuple[str, ...], at: Optional[Token]) -> List[Token]:
        real = os.path.realpath(path)
        if real in stack:
            chain = " -> ".join(os.path.basename(p) for p in stack[stack.index(real):] + (real,))
            raise ConfigError(at.where, "include", f"include cycle: {chain}")
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise ConfigError(at.where, "include", f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
        try:
            with open(path, "rb") as f:
                text = decode(f.read())
        except OSError as e:
            if at is None:
                raise ConfigError(Where(path, 0, 0), "file", f"cannot read: {_why(e)}") from None
            raise ConfigError(at.where, "include", f"cannot read {path}: {_why(e)}") from None
        self.files.append(path)
        if at is None:
            self.text = text
        return self._read(text, path, os.path.dirname(path), stack + (real,))  # (no EOF: the outermost file's ends it)

    def _read(self, text: str, file: str, base_dir: str, stack: Tuple[str, ...]) -> List[Token]:
        """A file's tokens with its includes spliced in, line by line, as keepalived reads it: an included file is
        read where its `include` line is, so it sees the `$NAME`s defined above that line (not the values defined
        later in the including file), and what it defines holds in the lines after the include."""
        out: List[Token] = []
        for line in _line_tokens(text, file, self.params):
            self._expand(line, base_dir, stack, out)
        return out

    def _expand(self, toks: List[Token], base_dir: str, stack: Tuple[str, ...], out: List[Token]) -> None:
        """Append one line's tokens to `out`, an `include` statement replaced by the tokens of what it names."""
        if not any(t.text == "include" for t in toks):  # (nearly every line)
            out.extend(toks)
            return
        i = 0
        while i < len(toks):
            t = toks[i]
            if t.kind == WORD and t.text == "include" and _starts_statement(out):
                if not self.allow_include:
                    err = ConfigError(t.where, "include", "reads a file: a configuration sent over the API may not "
                                      "include files; put the include in the config file on disk and reload from "
                                      "the file (SIGHUP / systemctl reload hdslb)")
                    err.errno = errno.EPERM
                    raise err
                args, j = [], i + 1
                while toks[j].kind in (WORD, STRING):
                    args.append(toks[j])
                    j += 1
                if len(args) != 1:
                    raise ConfigError(t.where, "include", "expects exactly one file name or glob")
                for path in self._matches(args[0], base_dir):
                    out.extend(self._file(path, stack, args[0]))
                i = j
                continue
            out.append(t)
            i += 1

    def _matches(self, arg: Token, base_dir: str) -> List[str]:
        """The files `include ARG` reads, in order. As keepalived's read_conf_file (glob with GLOB_BRACE): what a
        pattern matches that is a directory, not a regular file, or executable is skipped, with a notice here (a
        conf.d/ holding an old/ directory or a script loads); a pattern matching nothing is fine (an empty conf.d/).
        A plain name must be a readable config file: missing, a directory or executable, it is an error here."""
        alternatives = _braces(arg)
        patterns = [os.path.join(base_dir, os.path.expanduser(p)) for p in alternatives]
        braced = "{" in re.sub(r"\\.", "", arg.text)
        if not braced and not glob.has_magic(patterns[0]):
            path = patterns[0]
            if not os.path.exists(path):
                raise ConfigError(arg.where, "include", f"{path}: no such file")
            why = _not_a_config_file(path)
            if why is not None:
                hint = f"include the files in it (`include {arg.text.rstrip('/')}/*.conf`)" if why == "is a directory" \
                    else "chmod a-x it" if why == "is executable" else "include a regular file"
                raise ConfigError(arg.where, "include", f"{path} {why}: keepalived reads only regular, non-executable "
                                                        f"files as config; {hint}")
            return [path]
        out: List[str] = []
        for pattern in patterns:
            # glob(3) sorts each brace alternative's matches; the alternatives stay in the order written
            for path in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else \
                    [pattern] if os.path.lexists(pattern) else []:
                why = _not_a_config_file(path)
                if why is None:
                    out.append(path)
                else:
                    self.notices.append(Notice(arg.where.file, arg.where.line, "include",
                                               f"skipped {path}: {why} (as keepalived does; only regular, "
                                               f"non-executable files are read)"))
        return out


def _starts_statement(out: Sequence[Token]) -> bool:
    # `include` is a directive only as the first word of a statement; elsewhere it is a plain value.
    return not out or out[-1].kind in (EOL, SEMI, LBRACE, RBRACE)


def _not_a_config_file(path: str) -> Optional[str]:
    """Why keepalived would not read `path` as config (read_conf_file: a directory, or not a regular non-executable
    file), or None. A path that cannot be stat'ed is left to the read, which names the reason."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        return "is executable"
    return None


MAX_BRACE_ALTERNATIVES = 1024  # a brace pattern's expansions: `{a,b}{c,d}…` multiplies


def _braces(arg: Token) -> List[str]:
    r"""csh-style brace expansion, as glob(3)'s GLOB_BRACE does it (Python's glob has none): `{a,b}.conf` is a.conf
    and b.conf, `{foo/{,cat,dog},bar}` foo/, foo/cat, foo/dog and bar (keepalived.conf(5)), in that order; `\{`,
    `\}` and `\,` are the characters. A name without braces is itself. An unbalanced brace is an error."""
    text = arg.text
    open_at, depth, commas, i = -1, 0, [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            if depth == 0:
                open_at, commas = i, []
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise ConfigError(arg.where, "include", f"{text!r}: '}}' without a matching '{{'")
            if depth == 0:
                cuts = [open_at] + commas + [i]
                head, tail = text[:open_at], text[i + 1:]
                out: List[str] = []
                for a, b in zip(cuts, cuts[1:]):
                    word = head + text[a + 1:b] + tail
                    out.extend(_braces(Token(arg.kind, word, arg.where)))
                    if len(out) > MAX_BRACE_ALTERNATIVES:
                        raise ConfigError(arg.where, "include", f"{text!r} expands to more than "
                                                                f"{MAX_BRACE_ALTERNATIVES} names")
                return out
        elif c == "," and depth == 1:
            commas.append(i)
        i += 1
    if depth:
        raise ConfigError(arg.where, "include", f"{text!r}: '{{' without a matching '}}'")
    return [re.sub(r"\\([{},])", r"\1", text)]


def _why(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


# Deeper than any keyword table block (netif_defs > device > rx is 3; virtual_server > real_server > HTTP_GET > url
# 4): blocks nested this deep are braces gone missing, as a generated file whose real_server blocks lack their `}`
# (1,200 of them ended the parser's recursion with a RecursionError traceback instead of a FILE:LINE).
MAX_NESTING = 32


def parse(toks: List[Token]) -> List[Node]:
    """Turn tokens into statements. Raises ConfigError for a stray or missing brace."""
    nodes, pos = _body(toks, 0, None, ())
    return nodes


def _body(toks: List[Token], pos: int, opener: Optional[Node], open_: Tuple[Node, ...]) -> Tuple[List[Node], int]:
    nodes: List[Node] = []
    while True:
        t = toks[pos]
        if t.kind in (EOL, SEMI):
            pos += 1
            continue
        if t.kind == EOF:
            if opener is not None:
                raise ConfigError(opener.lbrace.where, opener.name, "unclosed '{' (end of file reached)")
            return nodes, pos
        if t.kind == RBRACE:
            if opener is None:
                raise ConfigError(t.where, "}", "'}' without a matching '{'")
            return nodes, pos + 1
        init = None
        if t.kind == INIT:
            init, pos = t, pos + 1
            t = toks[pos]
            if t.kind != WORD:
                raise ConfigError(init.where, "<init>", "must be followed by an option on the same line")
        if t.kind != WORD:
            raise ConfigError(t.where, t.text or t.kind, "expected a keyword")
        pos += 1
        args: List[Token] = []
        while toks[pos].kind in (WORD, STRING):
            args.append(toks[pos])
            pos += 1
        node = Node(keyword=t, args=args, body=None, init=init)
        look = pos
        while toks[look].kind == EOL:
            look += 1
        if toks[look].kind == LBRACE:
            node.lbrace = toks[look]
            if len(open_) >= MAX_NESTING:
                chain = ", ".join(f"{n.name} at " + (f"line {n.where.line}" if n.where.file == node.where.file
                                                      else f"{n.where.file}:{n.where.line}") for n in open_[:3])
                raise ConfigError(node.lbrace.where, node.name, f"blocks nested more than {MAX_NESTING} deep: a '}}' "
                                  f"is missing above (still open: {chain}, …)")
            node.body, pos = _body(toks, look + 1, node, open_ + (node,))
        elif toks[pos].kind == INIT:
            raise ConfigError(toks[pos].where, "<init>", "must come first on its line")
        nodes.append(node)
