"""Type and range rules for backend options: one :class:`Rule` per option key.

A rule checks one value, returns it normalised (an ``int`` given for a ``float`` option becomes a
``float``, a list of names a tuple, a path a ``str``) and otherwise raises :class:`OptionsError`
naming the key, the value, its type and what was expected::

    >>> Rule.int_(lo=1).check("swa.bucket", 2.5)
    OptionsError: llmaccel: option swa.bucket=2.5 (float) has the wrong type; expected an int >= 1

``Rule.text`` is what the README's options table shows in its "type" column. Bools are never
accepted where a number is expected, nor numbers (``0``/``1``) where a bool is.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable


class OptionsError(ValueError):
    """An unknown option key or a bad option value (wrong type or out of range)."""


class OutOfRange(Exception):
    """Raised by a rule's range check; carries nothing (the rule's text says what was expected)."""


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi:g}"
    return ""


@dataclass(frozen=True)
class Rule:
    text: str
    """Expected type and range, in words (error messages, README table)."""
    type_ok: Callable[[Any], bool]
    """Whether the value has an acceptable type (checked first: a wrong type is its own error)."""
    convert: Callable[[Any], Any] = lambda v: v
    """Normalises a value of an acceptable type; raises :class:`OutOfRange` when out of range."""
    optional: bool = False
    """``None`` is accepted too."""

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if not self.type_ok(value):
            raise OptionsError(f"llmaccel: option {key}={value!r} ({type(value).__name__}) has the wrong "
                               f"type; expected {self.text}")
        try:
            return self.convert(value)
        except OutOfRange:
            raise OptionsError(f"llmaccel: option {key}={value!r} is out of range; expected {self.text}") from None

    # ---- constructors -------------------------------------------------------------------------

    @staticmethod
    def int_(lo: int | None = None, hi: int | None = None, optional: bool = False, note: str = "") -> "Rule":
        def conv(v):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise OutOfRange
            return v
        text = (f"the int {lo}" if lo is not None and lo == hi else "an int" + _bounds(lo, hi, False, False))
        text += (" or None" if optional else "") + note
        return Rule(text, is_int, conv, optional)

    @staticmethod
    def float_(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False) -> "Rule":
        def conv(v):
            v = float(v)
            if not math.isfinite(v):
                raise OutOfRange
            if lo is not None and (v < lo or (lo_open and v == lo)):
                raise OutOfRange
            if hi is not None and (v > hi or (hi_open and v == hi)):
                raise OutOfRange
            return v
        return Rule("a number" + _bounds(lo, hi, lo_open, hi_open), is_num, conv)

    @staticmethod
    def bool_(optional: bool = False) -> "Rule":
        return Rule("True or False" + (" or None" if optional else ""), lambda v: isinstance(v, bool),
                    optional=optional)

    @staticmethod
    def choice(*choices: str, optional: bool = False) -> "Rule":
        def conv(v):
            if v not in choices:
                raise OutOfRange
            return v
        text = "one of " + ", ".join(repr(c) for c in choices) + (" or None" if optional else "")
        return Rule(text, lambda v: isinstance(v, str), conv, optional)

    @staticmethod
    def url(schemes: tuple[str, ...], optional: bool = True) -> "Rule":
        def conv(v):
            if not any(v.startswith(f"{s}://") for s in schemes):
                raise OutOfRange
            return v
        text = "a URL " + " / ".join(f"'{s}://…'" for s in schemes) + (" or None" if optional else "")
        return Rule(text, lambda v: isinstance(v, str), conv, optional)

    @staticmethod
    def path(optional: bool = True) -> "Rule":
        def conv(v):
            v = os.fspath(v)
            if not isinstance(v, str) or not v.strip():
                raise OutOfRange
            return v
        return Rule("a non-empty path (str or os.PathLike)" + (" or None" if optional else ""),
                    lambda v: isinstance(v, (str, os.PathLike)), conv, optional)

    @staticmethod
    def names(valid: tuple[str, ...], optional: bool = True) -> "Rule":
        def conv(v):
            v = (v,) if isinstance(v, str) else tuple(v)
            if not v or any(n not in valid for n in v):
                raise OutOfRange
            return v
        return Rule("a list of stage names among " + ", ".join(valid) + (" or None" if optional else ""),
                    lambda v: isinstance(v, str) or (isinstance(v, (list, tuple))
                                                     and all(isinstance(n, str) for n in v)),
                    conv, optional)
