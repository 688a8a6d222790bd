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

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Node:
    """One parsed S-expression with the byte offset where it starts.

    ``items`` is None for an atom; ``atom`` is None for a list.
    """

    offset: int
    atom: str | None = None
    items: tuple[Node, ...] | None = None


#: Limits no layerinfo comes near (OBuilder's are a few hundred bytes, three lists deep):
#: past them a file is refused as unreadable, never read into memory or recursion.
MAX_DEPTH = 64
MAX_ATOM = 64 * 1024
MAX_BYTES = 1024 * 1024

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


@dataclass
class _Frame:
    """An open list (or the level outside any): its items so far, and datum comments pending."""

    start: int
    items: list[Node] = field(default_factory=list)
    discards: int = 0


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
        """Blanks, ``;`` line comments and ``#| |#`` block comments (datum comments are the reader's)."""
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
        """One datum, read with an explicit stack: no input can exhaust Python's recursion."""
        data = self.data
        stack: list[_Frame] = []
        top = _Frame(-1)  # the level outside any list: only its datum comments matter
        while True:
            self.skip_blanks_and_comments()
            c = self.peek()
            start = self.pos
            frame = stack[-1] if stack else top
            if c is None:
                if stack:
                    raise self.fail("unclosed '(' (end of input reached)", stack[-1].start)
                if top.discards:
                    raise self.fail("datum comment '#;' with nothing after it")
                raise self.fail("unexpected end of input, expected an atom or '('")
            if data.startswith(b"#;", self.pos):
                # A datum comment: the next datum at this level is read and dropped.
                self.pos += 2
                frame.discards += 1
                continue
            if c == ord("("):
                if len(stack) >= MAX_DEPTH:
                    raise self.fail(f"lists nested deeper than {MAX_DEPTH} (a layerinfo has 3)")
                self.pos += 1
                stack.append(_Frame(start))
                continue
            if c == ord(")"):
                if not stack:
                    raise self.fail("unexpected ')'")
                if frame.discards:
                    raise self.fail("datum comment '#;' with nothing after it")
                stack.pop()
                self.pos += 1
                node = Node(frame.start, items=tuple(frame.items))
            elif c == ord('"'):
                node = Node(start, atom=self.read_quoted())
            else:
                node = Node(start, atom=self.read_unquoted())
            holder = stack[-1] if stack else top
            if holder.discards:
                holder.discards -= 1
            elif not stack:
                return node
            else:
                holder.items.append(node)

    def read_unquoted(self) -> str:
        start = self.pos
        data = self.data
        while self.pos < len(data) and data[self.pos] not in _DELIMITERS:
            if data.startswith(b"#|", self.pos) or data.startswith(b"|#", self.pos):
                if self.pos == start:
                    raise self.fail("unexpected block comment delimiter")
                break
            self.pos += 1
            if self.pos - start > MAX_ATOM:
                raise self.fail(f"atom longer than {MAX_ATOM} bytes", start)
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
            if len(out) > MAX_ATOM:
                raise self.fail(f"atom longer than {MAX_ATOM} bytes", start)
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
    while True:
        reader.skip_blanks_and_comments()
        if not data.startswith(b"#;", reader.pos):
            break
        reader.pos += 2
        reader.read_sexp()  # a trailing datum comment: read, and dropped
    if reader.pos < len(data):
        raise reader.fail("unexpected text after the S-expression")
    return value


def position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of a byte offset, for error messages."""
    return _Reader(data).where(offset)
