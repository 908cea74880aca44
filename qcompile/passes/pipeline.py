"""Pipeline text: ``fold-bn,lowrank-svd{rank=0.5},quantize{bits=8}``.

Grammar::

    pipeline := pass ("," pass)*
    pass     := NAME ("{" option ("," option)* "}")?
    option   := KEY "=" VALUE          VALUE: number | true/false | word | "quoted string"
                                       | [v;v;...]  (a list, for tuple-typed options)

Values are converted to the option's declared type.  :func:`format_pipeline`
prints options that differ from their defaults, so
``format_pipeline(parse_pipeline(t))`` is the canonical form of ``t`` and
``parse_pipeline(format_pipeline(p)) == p``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Sequence

from qcompile.errors import PipelineError
from qcompile.passes.base import Pass

_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return "[" + ";".join(format_value(x) for x in v) + "]"
    if v is None:
        return "none"
    s = str(v)
    if s == "" or re.search(r"[,{}=\[\];\"\s]", s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


class _Lexer:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> PipelineError:
        caret = " " * self.pos + "^"
        return PipelineError(f"bad pipeline text at column {self.pos + 1}: {msg}\n  {self.text}\n  {caret}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.error(f"expected '{ch}'")
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> str:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> Any:
        ch = self.peek()
        if ch == '"':
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            if self.pos >= len(self.text):
                raise self.error("unterminated string")
            self.pos += 1
            return ("str", "".join(out))
        if ch == "[":
            self.pos += 1
            items = []
            if self.peek() != "]":
                items.append(self.value())
                while self.peek() == ";":
                    self.pos += 1
                    items.append(self.value())
            self.expect("]")
            return ("list", items)
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ',{}[];="' \
                and not self.text[self.pos].isspace():
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a value")
        return ("word", self.text[start:self.pos])


def _convert(raw: tuple[str, Any], typ: Any, pass_name: str, key: str) -> Any:
    kind, val = raw
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)

    def bad(expected: str) -> PipelineError:
        shown = val if kind != "list" else "[...]"
        return PipelineError(f"option '{key}' of pass '{pass_name}' expects {expected}, got '{shown}'")

    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if kind == "word" and val == "none" and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(raw, a, pass_name, key)
            except PipelineError as e:
                errors.append(e)
        raise bad(" or ".join(getattr(a, "__name__", str(a)) for a in args))
    if origin in (tuple, list):
        if kind != "list":
            raw = ("list", [raw])
        elem = args[0] if args else str
        items = tuple(_convert(x, elem, pass_name, key) for x in raw[1])
        return items if origin is tuple else list(items)
    if kind == "list":
        raise bad(getattr(typ, "__name__", str(typ)))
    if typ is bool:
        if val in ("true", "1", "yes"):
            return True
        if val in ("false", "0", "no"):
            return False
        raise bad("true/false")
    if typ is int:
        try:
            return int(val)
        except ValueError:
            raise bad("an integer") from None
    if typ is float:
        try:
            return float(val)
        except ValueError:
            raise bad("a number") from None
    if typ is str:
        return val
    if isinstance(typ, type) and issubclass(typ, str):
        return typ(val)
    choices = typing.get_args(typ) if origin is typing.Literal else None
    if choices:
        if val not in choices:
            raise bad("one of " + "/".join(map(str, choices)))
        return val
    raise bad(str(typ))


def parse_pipeline(text: str, registry: dict[str, type[Pass]] | None = None) -> list[Pass]:
    """Parse pipeline text into pass instances (options validated and typed)."""
    from qcompile.passes import PASSES

    registry = registry if registry is not None else PASSES
    lex = _Lexer(text)
    passes: list[Pass] = []
    if not text.strip():
        return passes
    while True:
        start = lex.pos
        name = lex.match(_NAME, "a pass name (kebab-case)")
        if name not in registry:
            lex.pos = start
            lex.skip_ws()
            raise lex.error(f"unknown pass '{name}'; known passes: {', '.join(sorted(registry))}")
        cls = registry[name]
        hints = typing.get_type_hints(cls.Options)
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        kwargs: dict[str, Any] = {}
        if lex.peek() == "{":
            lex.pos += 1
            while True:
                key = lex.match(_KEY, "an option name")
                if key not in fields:
                    known = ", ".join(fields) or "none"
                    raise lex.error(f"pass '{name}' has no option '{key}' (options: {known})")
                if key in kwargs:
                    raise lex.error(f"option '{key}' given twice")
                lex.expect("=")
                kwargs[key] = _convert(lex.value(), hints[key], name, key)
                if lex.peek() == ",":
                    lex.pos += 1
                    continue
                lex.expect("}")
                break
        try:
            passes.append(cls(**kwargs))
        except PipelineError:
            raise
        except (TypeError, ValueError) as e:
            raise PipelineError(f"pass '{name}': {e}") from e
        if lex.peek() == "":
            return passes
        lex.expect(",")


def format_pipeline(passes: Sequence[Pass]) -> str:
    return ",".join(p.to_text() for p in passes)
