"""Typed option fields shared by the trainers' option dataclasses and the CLI.

A trainer describes its options once, as a dataclass whose fields carry a
command-line flag in their metadata (:func:`option`); the CLI builds its flags
from those fields and passes the values back as the dataclass, so no library
code ever sees an argparse namespace. The parsers here raise ``ValueError``
with a message that says what was expected (argparse shows it next to the
flag)."""

from __future__ import annotations

import argparse
import dataclasses
import math


class OptionError(ValueError):
    """A bad value; the message names the option."""


class BadValue(ValueError, argparse.ArgumentTypeError):
    """Raised by the parsers: a ValueError for library callers, and the message
    argparse prints next to the flag."""


def _number(text, kind, what):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise BadValue(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise BadValue(f"expected {what}, got {text!r}")
    return value


def _at_least(kind, low, strict, what):
    def parse(text):
        value = _number(text, kind, what)
        if value < low or (strict and value == low):
            raise BadValue(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = _at_least(int, 0, True, "a positive integer")
nonneg_int = _at_least(int, 0, False, "an integer >= 0")
positive_float = _at_least(float, 0.0, True, "a positive number")
nonneg_float = _at_least(float, 0.0, False, "a number >= 0")
for _parse, _name in ((positive_int, "positive_int"), (nonneg_int, "nonneg_int"),
                      (positive_float, "positive_float"), (nonneg_float, "nonneg_float")):
    _parse.__name__ = _name


def accuracy(text):
    """A fraction in (0, 1] or a percentage in (1, 100]."""
    value = positive_float(text)
    if value > 1:
        value /= 100.0
    if value > 1:
        raise BadValue(f"expected a fraction <= 1 or a percentage <= 100, got {text!r}")
    return value


SEED_MAX = 2**32 - 1


def seed(text):
    """What numpy, torch and Python all accept: an integer in [0, 2**32 - 1]."""
    value = _number(text, int, f"an integer from 0 to {SEED_MAX}")
    if not 0 <= value <= SEED_MAX:
        raise BadValue(f"expected an integer from 0 to {SEED_MAX}, got {text!r}")
    return value


def per_level(kind):
    """A value, or comma-separated values one per multilevel level."""
    def parse(text):
        parts = [p for p in str(text).split(",") if p.strip()]
        if not parts:
            raise BadValue(f"expected a number or a comma-separated list, got {text!r}")
        values = [kind(p.strip()) for p in parts]
        return values[0] if len(values) == 1 else tuple(values)
    parse.__name__ = f"per_level({kind.__name__})"
    return parse


def option(flag, default=None, *, type=None, help=None, choices=None, action=None, metavar=None):
    """A dataclass field that is also a command-line flag."""
    meta = {"flag": flag, "type": type, "help": help, "choices": choices, "action": action,
            "metavar": metavar}
    return dataclasses.field(default=default, metadata={"cli": meta})


def cli_fields(options_cls):
    """``(field, cli metadata)`` for each field of ``options_cls`` that has a flag."""
    return [(f, f.metadata["cli"]) for f in dataclasses.fields(options_cls) if "cli" in f.metadata]


def check_fields(options) -> None:
    """Run each field's parser on its value (library callers get the CLI's checks)."""
    for f, meta in cli_fields(type(options)):
        value = getattr(options, f.name)
        if value is None or meta["type"] is None or meta["action"] is not None:
            if meta["choices"] is not None and value is not None and value not in meta["choices"]:
                raise OptionError(f"{f.name}: expected one of {list(meta['choices'])}, got {value!r}")
            continue
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            try:
                meta["type"](v)
            except ValueError as exc:
                raise OptionError(f"{f.name}: {exc}") from None


@dataclasses.dataclass
class ParallelOptions:
    """The options every multi-process trainer shares (the CLI's ``--workers``,
    ``--backend`` and ``--heartbeat-timeout``)."""

    BACKENDS = ()

    workers: int | None = None
    backend: str | None = None
    heartbeat_timeout: float | None = 30.0
    start_timeout: float = 120.0

    def check(self):
        check_fields(self)
        if self.backend is not None and self.backend not in self.BACKENDS:
            raise OptionError(f"backend: expected one of {list(self.BACKENDS)}, got "
                              f"{self.backend!r}")
        if self.workers is not None:
            try:
                positive_int(self.workers)
            except ValueError as exc:
                raise OptionError(f"workers: {exc}") from None
        from .runtime import check_timeout

        if self.heartbeat_timeout is not None:
            check_timeout(self.heartbeat_timeout)
        check_timeout(self.start_timeout, "start_timeout")
        return self
