"""keepalived/DPVS config syntax: tokens with file:line:col, `include` splicing, and a tree of statements.

No keyword is known here; schema.py gives them meaning. The grammar, as keepalived and DPVS read it:

    statement := ["<init>"] WORD arg* ( "{" statement* "}" )? (newline | ";")
    arg       := WORD | "double-quoted string"

`!` and `#` start a comment when they start a word (so `/index.html#top` stays a word). A `{` may sit
on the line after its keyword. `include GLOB` is replaced by the tokens of the files it names,
relative to the including file, which is why it works anywhere, even inside a block.
"""

from __future__ import annotations

import errno
import glob
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .model import ConfigError, Where

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


def tokenize(text: str, file: str) -> List[Token]:
    """Split one file's text; ends with an EOF token. Raises ConfigError for an unterminated string."""
    toks: List[Token] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        i, n = 0, len(line)
        while i < n:
            c = line[i]
            if c.isspace():
                i += 1
            elif c in _COMMENT:
                break
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
            else:
                start = i
                while i < n and not line[i].isspace() and line[i] not in _PUNCT and line[i] != '"':
                    i += 1
                word = line[start:i]
                toks.append(Token(INIT if word == "<init>" else WORD, word, Where(file, lineno, start + 1)))
        toks.append(Token(EOL, "", Where(file, lineno, len(line) + 1)))
    nlines = len(text.splitlines())
    toks.append(Token(EOF, "", Where(file, nlines + 1, 1)))
    return toks


class Reader:
    """Reads a file and everything it includes; remembers every file read, for the reload watcher."""

    def __init__(self, allow_include: bool = True) -> None:
        self.files: List[str] = []
        self.allow_include = allow_include  # False: text from the network (see loader.loads posted=True)

    def read_file(self, path: str) -> List[Token]:
        return self._file(path, stack=(), at=None) + [Token(EOF, "", Where(path, 0, 0))]

    def read_text(self, text: str, name: str, base_dir: str) -> List[Token]:
        stack = (os.path.realpath(name),) if os.path.exists(name) else ()
        return self._expand(tokenize(text, name), base_dir, stack)

    def _file(self, path: str, stack: Tuple[str, ...], at: Optional[Token]) -> List[Token]:
        real = os.path.realpath(path)
        if real in stack:
            chain = " -> ".join(os.path.basename(p) for p in stack[stack.index(real):] + (real,))
            raise ConfigError(at.where, "include", f"include cycle: {chain}")
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise ConfigError(at.where, "include", f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            if at is None:
                raise ConfigError(Where(path, 0, 0), "file", f"cannot read: {_why(e)}") from None
            raise ConfigError(at.where, "include", f"cannot read {path}: {_why(e)}") from None
        self.files.append(path)
        toks = tokenize(text, path)
        toks.pop()  # EOF: only the outermost file's end ends the config
        return self._expand(toks, os.path.dirname(path), stack + (real,))

    def _expand(self, toks: List[Token], base_dir: str, stack: Tuple[str, ...]) -> List[Token]:
        out: List[Token] = []
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
                for path in _glob(args[0], base_dir):
                    out.extend(self._file(path, stack, args[0]))
                i = j
                continue
            out.append(t)
            i += 1
        return out


def _starts_statement(out: Sequence[Token]) -> bool:
    # `include` is a directive only as the first word of a statement; elsewhere it is a plain value.
    return not out or out[-1].kind in (EOL, SEMI, LBRACE, RBRACE)


def _glob(arg: Token, base_dir: str) -> List[str]:
    pattern = os.path.join(base_dir, os.path.expanduser(arg.text))
    if glob.has_magic(pattern):
        # keepalived: a pattern matching nothing is fine (an empty conf.d/).
        return sorted(glob.glob(pattern))
    if not os.path.exists(pattern):
        raise ConfigError(arg.where, "include", f"{pattern}: no such file")
    return [pattern]


def _why(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def parse(toks: List[Token]) -> List[Node]:
    """Turn tokens into statements. Raises ConfigError for a stray or missing brace."""
    nodes, pos = _body(toks, 0, None)
    return nodes


def _body(toks: List[Token], pos: int, opener: Optional[Node]) -> Tuple[List[Node], int]:
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
            node.body, pos = _body(toks, look + 1, node)
        elif toks[pos].kind == INIT:
            raise ConfigError(toks[pos].where, "<init>", "must come first on its line")
        nodes.append(node)
