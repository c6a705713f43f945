"""The pass spec grammar and its parser.

::

    spec   := [ item ( "," item )* ]
    item   := NAME [ "(" [ option ( "," option )* ] ")" ]
    option := IDENT "=" value
    value  := NUMBER | STRING | WORD | "[" [ value ( "," value )* ] "]"

``NAME`` is kebab-case (``prune-layers``); ``WORD`` is a bare identifier (``true``, ``false``, ``none``
or a string such as ``fit``); ``STRING`` is single- or double-quoted. Every error names the column and
prints a caret under it. Values are converted to the option's declared type when the pass is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import PassSpecError

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class Value:
    value: Any
    column: int


@dataclass(frozen=True)
class Item:
    name: str
    column: int
    options: dict[str, Value]
    option_columns: dict[str, int]


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def error(self, message: str, column: int | None = None) -> PassSpecError:
        return PassSpecError(f"malformed pass spec: {message}", self.text,
                             self.i if column is None else column)

    def skip(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of spec"
            raise self.error(f"expected {ch!r}, found {found}")
        self.i += 1

    def word(self) -> tuple[str, int]:
        self.skip()
        start = self.i
        while self.i < len(self.text) and (self.text[self.i].isalnum() or self.text[self.i] in "-_./"):
            self.i += 1
        return self.text[start:self.i], start

    def parse(self) -> list[Item]:
        items: list[Item] = []
        if not self.peek():
            return items
        while True:
            items.append(self.item())
            if not self.peek():
                return items
            if self.peek() != ",":
                raise self.error(f"expected ',' between passes, found {self.peek()!r}")
            self.i += 1
            if not self.peek():
                raise self.error("expected a pass name after ','")

    def item(self) -> Item:
        name, col = self.word()
        if not name:
            found = repr(self.peek()) if self.peek() else "end of spec"
            raise self.error(f"expected a pass name, found {found}")
        if not name[0].isalpha() or set(name) - NAME_CHARS:
            raise self.error(f"invalid pass name {name!r} (use lower-case letters, digits and '-')", col)
        options: dict[str, Value] = {}
        columns: dict[str, int] = {}
        if self.peek() != "(":
            return Item(name, col, options, columns)
        self.i += 1
        if self.peek() == ")":
            self.i += 1
            return Item(name, col, options, columns)
        while True:
            key, kcol = self.word()
            if not key or not (key[0].isalpha() or key[0] == "_"):
                raise self.error("expected an option name", kcol)
            self.expect("=")
            if key in options:
                raise self.error(f"option {key!r} given twice", kcol)
            options[key] = self.value()
            columns[key] = kcol
            if self.peek() == ",":
                self.i += 1
                continue
            self.expect(")")
            return Item(name, col, options, columns)

    def value(self) -> Value:
        ch = self.peek()
        col = self.i
        if ch in ("'", '"'):
            end = self.text.find(ch, self.i + 1)
            if end < 0:
                raise self.error("unterminated string", col)
            self.i = end + 1
            return Value(self.text[col + 1:end], col)
        if ch == "[":
            self.i += 1
            values: list[Any] = []
            if self.peek() == "]":
                self.i += 1
                return Value(values, col)
            while True:
                values.append(self.value().value)
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.expect("]")
                return Value(values, col)
        text, start = self.word()
        if not text:
            found = repr(ch) if ch else "end of spec"
            raise self.error(f"expected a value, found {found}")
        return Value(_literal(text), start)


def _literal(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_spec(text: str) -> list[Item]:
    """Parse a spec string into items (names and raw option values), checking only the syntax."""
    return _Parser(text).parse()


def convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a parsed literal to the declared option type, or explain why it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, where)
            except TypeError:
                continue
        raise TypeError(f"{where} expects {_names(args)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise TypeError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise TypeError(f"{where} expects a list like [0,2,4], got {value!r}")
        return tuple(convert(v, elem, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{where} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{where} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{where} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{where} expects a string, got {value!r}")
    return value


def _names(args: tuple[Any, ...]) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None))


def build(item: Item, cls: type, text: str) -> Any:
    """Instantiate pass class ``cls`` from a parsed item, with column-precise errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, val in item.options.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise PassSpecError(f"pass {item.name!r} has no option {key!r} (options: {valid})", text,
                                item.option_columns[key], "run `headsmith passes` to list the options")
        try:
            kwargs[key] = convert(val.value, hints[key], f"option {key!r} of pass {item.name!r}")
        except TypeError as e:
            raise PassSpecError(str(e), text, val.column) from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PassSpecError(f"pass {item.name!r}: {e}", text, item.column) from None
    except ValueError as e:
        raise PassSpecError(f"pass {item.name!r}: {e}", text, item.column) from None
