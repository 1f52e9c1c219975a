"""``--rule-arg NAME=VALUE``: constructor options of a registered rule, typed from its signature.

The command line (`fbalign._src.cli`) reads ``fbalign train --rule-arg`` items with these
functions: `rule_options` lists what a rule constructor takes (with its type hints and defaults),
`parse_rule_value` reads one text value as such a type, `parse_rule_args` turns the items into
keyword arguments, and `check_rule_builds` tries them on the constructor. Errors are a
`UsageError`, the command line's error for a bad value (defined here so that this module needs
nothing from the command line; `fbalign._src.cli` re-exports it).
"""

from __future__ import annotations

import argparse
import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from fbalign._src.feedback_init import resolve_initializer
from fbalign._src.registry import RULES


class UsageError(ValueError):
    """A bad command-line value; the message says what is wrong and what is valid."""


_EMPTY = inspect.Parameter.empty
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def rule_arg_item(value: str) -> str:
    """One ``--rule-arg`` item, checked to be ``NAME=VALUE`` (typed once the rule is known)."""
    name, sep, _ = value.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE such as weight_decay=1e-3, got {value!r}")
    return value


def rule_options(make: Callable, _depth: int = 0) -> dict[str, tuple[Any, Any]]:
    """Named options of rule constructor ``make``: name -> (type hint or None, default). Only
    named parameters count; ``**kwargs`` that ``make`` declares it passes on to another function
    (`forwards_options`: DNI's `synthetic_gradients`) count as that function's named parameters
    it does not fix."""
    try:
        hints = typing.get_type_hints(make)
    except Exception:  # unresolvable annotations: the defaults' types decide
        hints = {}
    params = inspect.signature(make).parameters.values()
    out = {p.name: (None if hints.get(p.name, Any) is Any else hints[p.name], p.default)
           for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    fwd = getattr(make, "forwards_options", None) if _depth < 3 else None
    if fwd:  # declared with `forwards_options`
        callee, fixed = fwd
        for name, spec in rule_options(callee, _depth + 1).items():
            if name not in fixed and name not in out:
                out[name] = spec
    return out


def _value_kinds(hint: Any, default: Any = _EMPTY) -> tuple[list, bool]:
    """``(kinds, none_ok)``: what a text value may parse to (bool, int, float, str,
    ``("seq", elem, length)``, ``("literal", choices)``), from ``hint``, else the default."""
    if hint is None:  # no annotation: the type of the default
        if default is _EMPTY or default is None:
            return [str], default is None
        if isinstance(default, (tuple, list)) and all(type(v) is int for v in default):
            return [("seq", int, None)], False
        return ([type(default)] if type(default) in (bool, int, float, str) else []), False
    origin, targs = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds, none_ok = [], False
        for a in targs:
            k, n = _value_kinds(a)
            kinds, none_ok = kinds + k, none_ok or n
        return kinds, none_ok
    if hint is type(None):
        return [], True
    if origin is typing.Literal:
        return [("literal", targs)], None in targs
    if hint in (bool, int, float, str):
        return [hint], False
    elems = [a for a in targs if a is not Ellipsis]
    if (origin in (tuple, list, collections.abc.Sequence) and elems
            and all(e is elems[0] for e in elems) and elems[0] in (int, float)):
        fixed = origin is tuple and Ellipsis not in targs
        return [("seq", elems[0], len(elems) if fixed else None)], False
    return [], False


def _parse_kind(text: str, kind: Any) -> Any:
    """``text`` as one value kind of `_value_kinds`; ValueError if it is not one."""
    if kind is bool:
        if text.lower() not in _BOOLS:
            raise ValueError(text)
        return _BOOLS[text.lower()]
    if kind in (int, float, str):
        return kind(text)
    if kind[0] == "literal":
        for choice in kind[1]:
            if choice is not None and str(choice) == text:
                return choice
        raise ValueError(text)
    _, elem, length = kind
    inner = text.strip()
    if inner[:1] + inner[-1:] in ("()", "[]"):
        inner = inner[1:-1]
    parts = [v.strip() for v in inner.split(",")]
    if parts[-1] == "":  # "3," or "(3,)" or "()"
        parts.pop()
    value = tuple(elem(v) for v in parts)
    if length is not None and len(value) != length:
        raise ValueError(text)
    return value


_WORDS = {bool: "a bool (true/false, yes/no, 1/0)", int: "an int", float: "a float",
          str: "a string"}


def _describe(kinds: list, none_ok: bool) -> str:
    """The expected type of an option, for error messages: ``a float or none``."""
    out = []
    for kind in kinds:
        if kind in _WORDS:
            out.append(_WORDS[kind])
        elif kind[0] == "literal":
            out.append("one of " + ", ".join(repr(c) for c in kind[1] if c is not None))
        else:
            _, elem, length = kind
            example = ",".join(str(3 + i) for i in range(length or 2))
            out.append(f"a tuple of {f'{length} ' if length else ''}{elem.__name__}s such as "
                       f"{example}")
    return " or ".join(out + (["none"] if none_ok else []))


_ORDER = {"literal": 0, bool: 1, int: 2, float: 3, "seq": 4, str: 5}


def parse_rule_value(text: str, hint: Any, default: Any = _EMPTY) -> Any:
    """``text`` as a value of type ``hint`` (an annotation; None: the type of ``default``).
    ``none``/``None`` gives None only where None is allowed; ValueError names the type."""
    kinds, none_ok = _value_kinds(hint, default)
    if none_ok and text.strip().lower() == "none":
        return None
    for kind in sorted(kinds, key=lambda k: _ORDER[k if k in _ORDER else k[0]]):
        try:
            return _parse_kind(text.strip() if kind is not str else text, kind)
        except (ValueError, TypeError):
            continue
    raise ValueError(f"expected {_describe(kinds, none_ok) or 'a value'}, got {text!r}")


def parse_rule_args(rule: str, items: Sequence[str]) -> dict[str, Any]:
    """``--rule-arg NAME=VALUE`` items as typed constructor options of registered rule ``rule``;
    a `UsageError` for a malformed item, an unknown or repeated name, or a bad value."""
    options = rule_options(RULES[rule].make)
    settable = [n for n, spec in options.items() if _value_kinds(*spec)[0]]
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--rule-arg takes NAME=VALUE such as weight_decay=1e-3, "
                             f"got {item!r}")
        if name not in settable:
            what = (f"rule {rule!r} has no option {name!r}" if name not in options else
                    f"option {name!r} of rule {rule!r} has no command-line form")
            raise UsageError(f"--rule-arg {item}: {what}; valid: "
                             f"{', '.join(settable) or 'none (it takes no options)'}")
        if name in out:
            raise UsageError(f"--rule-arg {name} given twice; give each option once")
        try:
            out[name] = parse_rule_value(text, *options[name])
        except ValueError as err:
            raise UsageError(f"--rule-arg {item}: option {name!r} of rule {rule!r}: {err}"
                             ) from None
    return out


def check_rule_builds(rule: str, kwargs: dict[str, Any]) -> None:
    """Builds the rule once (cheap: no arrays) so that options it refuses stop the run before
    any data loads; a feedback ``init``/``scale`` is resolved too (rules resolve it only when
    they draw their feedback)."""
    try:
        RULES[rule].make(**kwargs)
        if "init" in kwargs or "scale" in kwargs:  # the feedback init resolves at rule.init
            resolve_initializer(kwargs.get("init", "gaussian"), kwargs.get("scale"), 1)
    except (TypeError, ValueError) as err:
        given = " ".join(f"{k}={v}" for k, v in kwargs.items())
        raise UsageError(f"rule {rule!r} refuses the options {given}: {err}") from None
