"""A reader for the S-expressions that OCaml's Sexplib writes.

Purely data-manipulative: bytes in, nested tuples of atoms out, no I/O. It follows
Sexplib's lexer: unquoted atoms, quoted atoms with every OCaml escape (``\\\\``,
``\\"``, ``\\'``, ``\\n``, ``\\t``, ``\\b``, ``\\r``, ``\\ ``, decimal ``\\DDD``,
``\\xHH``, and a backslash-newline that also skips the next line's leading blanks),
``;`` line comments, ``#| |#`` block comments and ``#;`` datum comments.

Atoms are bytes in OCaml; they are decoded as UTF-8 with ``surrogateescape`` so
that no byte is lost when a path is not valid UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Node:
    """One parsed S-expression with the byte offset where it starts.

    ``items`` is None for an atom; ``atom`` is None for a list.
    """

    offset: int
    atom: str | None = None
    items: tuple[Node, ...] | None = None


_BLANKS = b" \t\x0c\r\n"
_DELIMITERS = b' \t\x0c\r\n()";'
_SIMPLE_ESCAPES = {
    ord("\\"): b"\\",
    ord('"'): b'"',
    ord("'"): b"'",
    ord("n"): b"\n",
    ord("t"): b"\t",
    ord("b"): b"\b",
    ord("r"): b"\r",
    ord(" "): b" ",
}
_HEX = b"0123456789abcdefABCDEF"


class SexpSyntaxError(ValueError):
    """Raised when the text is not a well-formed S-expression; carries line and column."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.line = line
        self.column = column
        self.message = message


@dataclass
class _Reader:
    data: bytes
    pos: int = 0

    def where(self, pos: int | None = None) -> tuple[int, int]:
        at = self.pos if pos is None else pos
        line = self.data.count(b"\n", 0, at) + 1
        column = at - (self.data.rfind(b"\n", 0, at) + 1) + 1
        return line, column

    def fail(self, message: str, pos: int | None = None) -> SexpSyntaxError:
        line, column = self.where(pos)
        return SexpSyntaxError(line, column, message)

    def peek(self, offset: int = 0) -> int | None:
        at = self.pos + offset
        return self.data[at] if at < len(self.data) else None

    def skip_blanks_and_comments(self) -> None:
        data = self.data
        while self.pos < len(data):
            c = data[self.pos]
            if c in _BLANKS:
                self.pos += 1
            elif c == ord(";"):
                end = data.find(b"\n", self.pos)
                self.pos = len(data) if end < 0 else end + 1
            elif data.startswith(b"#|", self.pos):
                self.skip_block_comment()
            elif data.startswith(b"#;", self.pos):
                self.pos += 2
                self.skip_blanks_and_comments()
                if self.pos >= len(data):
                    raise self.fail("datum comment '#;' with nothing after it")
                self.read_sexp()
            else:
                return

    def skip_block_comment(self) -> None:
        start = self.pos
        depth = 0
        data = self.data
        while self.pos < len(data):
            if data.startswith(b"#|", self.pos):
                depth += 1
                self.pos += 2
            elif data.startswith(b"|#", self.pos):
                depth -= 1
                self.pos += 2
                if depth == 0:
                    return
            elif data[self.pos] == ord('"'):
                self.read_quoted()
            else:
                self.pos += 1
        raise self.fail("unterminated block comment '#|'", start)

    def read_sexp(self) -> Node:
        self.skip_blanks_and_comments()
        c = self.peek()
        start = self.pos
        if c is None:
            raise self.fail("unexpected end of input, expected an atom or '('")
        if c == ord("("):
            return Node(start, items=self.read_list())
        if c == ord(")"):
            raise self.fail("unexpected ')'")
        if c == ord('"'):
            return Node(start, atom=self.read_quoted())
        return Node(start, atom=self.read_unquoted())

    def read_list(self) -> tuple[Node, ...]:
        start = self.pos
        self.pos += 1
        items: list[Node] = []
        while True:
            self.skip_blanks_and_comments()
            c = self.peek()
            if c is None:
                raise self.fail("unclosed '(' (end of input reached)", start)
            if c == ord(")"):
                self.pos += 1
                return tuple(items)
            items.append(self.read_sexp())

    def read_unquoted(self) -> str:
        start = self.pos
        data = self.data
        while self.pos < len(data) and data[self.pos] not in _DELIMITERS:
            if data.startswith(b"#|", self.pos) or data.startswith(b"|#", self.pos):
                if self.pos == start:
                    raise self.fail("unexpected block comment delimiter")
                break
            self.pos += 1
        return data[start : self.pos].decode("utf-8", "surrogateescape")

    def read_quoted(self) -> str:
        start = self.pos
        self.pos += 1
        out = bytearray()
        data = self.data
        while True:
            if self.pos >= len(data):
                raise self.fail("unterminated quoted atom", start)
            c = data[self.pos]
            if c == ord('"'):
                self.pos += 1
                return bytes(out).decode("utf-8", "surrogateescape")
            if c != ord("\\"):
                out.append(c)
                self.pos += 1
                continue
            out += self.read_escape()

    def read_escape(self) -> bytes:
        escape_at = self.pos
        self.pos += 1
        c = self.peek()
        if c is None:
            raise self.fail("unterminated quoted atom", escape_at)
        if c in _SIMPLE_ESCAPES:
            self.pos += 1
            return _SIMPLE_ESCAPES[c]
        if c in (ord("\n"), ord("\r")):
            # Continuation: the newline and the next line's leading blanks vanish.
            self.pos += 2 if self.data.startswith(b"\r\n", self.pos) else 1
            while self.peek() in (ord(" "), ord("\t")):
                self.pos += 1
            return b""
        if ord("0") <= c <= ord("9"):
            digits = self.data[self.pos : self.pos + 3]
            if len(digits) < 3 or not digits.isdigit():
                raise self.fail("illegal decimal escape: expected three digits", escape_at)
            value = int(digits)
            if value > 255:
                raise self.fail(f"illegal decimal escape \\{digits.decode()}: over 255", escape_at)
            self.pos += 3
            return bytes([value])
        if c == ord("x"):
            digits = self.data[self.pos + 1 : self.pos + 3]
            if len(digits) < 2 or any(d not in _HEX for d in digits):
                raise self.fail("illegal hex escape: expected two hex digits", escape_at)
            self.pos += 3
            return bytes([int(digits, 16)])
        # Like OCaml's lexer, an unknown escape keeps its backslash.
        self.pos += 1
        return bytes([ord("\\"), c])


def parse_one(data: bytes) -> Node:
    """Parse exactly one S-expression (blanks and comments around it allowed)."""
    reader = _Reader(data)
    value = reader.read_sexp()
    reader.skip_blanks_and_comments()
    if reader.pos < len(data):
        raise reader.fail("unexpected text after the S-expression")
    return value


def position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of a byte offset, for error messages."""
    return _Reader(data).where(offset)
