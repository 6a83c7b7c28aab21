"""Settings dataclasses whose fields are checked against their declared types and ranges.

A hyper-parameter or an evaluation setting is declared once: its type is the annotation (``int``,
``float``, ``tuple[int, ...]``, ``Literal["saliency", "random"]``, ``X | None``) and, where it has
one, its range is the field's metadata (``bounded``). ``check_fields`` checks an instance against
both when it is built, so a value that cannot work — ``lr: "fast"``, a NaN, negative steps, a
percentile of 500, an unknown ``score`` — is refused where the settings are made (when a spec is
loaded, before any actor starts), not after a model has loaded. Values are checked, never
converted: what a trajectory's id hashes stays what the YAML said.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass


def is_number(value) -> bool:
    """A real number as YAML gives one: ``int`` or ``float``, never ``bool`` (``True`` is an int in Python).
    The one number test of every settings check: hyper-parameters, run specs and tune specs."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return is_number(value) and math.isfinite(value)


@dataclass(frozen=True)
class Range:
    """Bounds on a number (each number of a tuple): ``minimum``/``maximum`` inclusive, ``above``/``below``
    exclusive."""

    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None

    def problem(self, value) -> str | None:
        if isinstance(value, tuple):
            return next((f"item {i}: {p}" for i, p in enumerate(map(self.problem, value)) if p), None)
        if not is_number(value):
            return None  # a None of an optional field; types are checked first
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {self.minimum:g}, got {value!r}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum:g}, got {value!r}"
        if self.above is not None and not value > self.above:
            return f"must be above {self.above:g}, got {value!r}"
        if self.below is not None and not value < self.below:
            return f"must be below {self.below:g}, got {value!r}"
        return None


def bounded(default, *, minimum: float | None = None, maximum: float | None = None, above: float | None = None,
            below: float | None = None):
    """A dataclass field with a default and a range (``Range``)."""
    return dataclasses.field(default=default, metadata={"range": Range(minimum, maximum, above, below)})


def added_later(default, **bounds):
    """A setting added after results were stored under ids that hash their settings (``identity``): it
    is hashed only while it holds another value than ``default``, so the work stored before it existed
    keeps its trajectory id and its edit logs' binding, and asking for the new value makes new work.
    ``bounds`` as for ``bounded``."""
    return dataclasses.field(default=default, metadata={"range": Range(**bounds), "hashed_when_set": True})


def identity(settings) -> dict:
    """A settings dataclass as trajectory ids and edit-log bindings hash it: every field, nested
    settings as mappings (like ``dataclasses.asdict``), less each ``added_later`` field at its default."""
    values = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.metadata.get("hashed_when_set") and value == f.default:
            continue
        values[f.name] = identity(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return values


class FieldError(ValueError):
    """A field whose value does not fit its declaration. ``path`` is the dotted field name
    (``eac.gamma_percentile``); ``source`` the file or input the value came from, when known."""

    def __init__(self, path: str, problem: str, source: str | None = None):
        self.path, self.problem, self.source = path, problem, source
        super().__init__(f"{source + ': ' if source else ''}field {path!r}: {problem}")

    def within(self, section: str = "", source: str | None = None) -> "FieldError":
        """The same problem seen from the enclosing settings: ``section.path``, and its source."""
        return FieldError(f"{section}.{self.path}" if section else self.path, self.problem, source or self.source)


class Checked:
    """Base of a settings dataclass: ``check_fields`` runs when an instance is built."""

    def __post_init__(self) -> None:
        check_fields(self)


def check_fields(instance) -> None:
    """Raise ``FieldError`` for the first field whose value is not of its annotated type or not in its range."""
    hints = type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        problem = type_problem(value, hints[f.name])
        if problem is None and "range" in f.metadata:
            problem = f.metadata["range"].problem(value)
        if problem is not None:
            raise FieldError(f.name, problem)


@functools.cache
def type_hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def type_problem(value, hint) -> str | None:
    """Why ``value`` is not a ``hint`` (None when it is). Integers pass as floats (YAML's ``lr: 1``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if any(type_problem(value, arg) is None for arg in args):
            return None
        return f"expected {describe(hint)}, got {value!r}"
    if origin is typing.Literal:
        return None if any(value == arg and type(value) is type(arg) for arg in args) else \
            f"{value!r} is not one of {list(args)}"
    if hint is float:
        if not is_number(value):
            return f"expected a number, got {value!r}"
        return None if is_finite_number(value) else f"expected a finite number, got {value!r}"
    if origin is tuple or hint is tuple:
        if not isinstance(value, tuple):
            return f"expected a list, got {value!r}"
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif args and len(args) != len(value):
            return f"expected {len(args)} items, got {len(value)}: {value!r}"
        return next((f"item {i}: {p}" for i, (item, arg) in enumerate(zip(value, args))
                     if (p := type_problem(item, arg))), None)
    if origin is dict:
        if not isinstance(value, dict):
            return f"expected a mapping, got {value!r}"
        key_hint, value_hint = args or (typing.Any, typing.Any)
        return next((f"{key!r}: {p}" for key, item in value.items()
                     if (p := type_problem(key, key_hint) or type_problem(item, value_hint))), None)
    simple = {bool: bool, int: numbers.Integral, str: str, type(None): type(None)}.get(hint, origin or hint)
    if isinstance(value, simple) and not (hint is int and isinstance(value, bool)):
        return None
    return f"expected {describe(hint)}, got {value!r}"


def describe(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if typing.get_origin(hint) is tuple or hint is tuple:
        return "a list"
    return names.get(hint, getattr(hint, "__name__", str(hint)))
