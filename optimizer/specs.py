"""Pass specs: the inline form (``name:key=value,...``), recipe files (TOML), and option parsing.

Inline specs come from ``--passes`` (repeatable; a single argument may also hold several specs
separated by ``;``). A recipe file lists passes in order::

    target = "ort-cpu"          # optional

    [[pass]]
    name = "cleanup"

    [[pass]]
    name = "quantize"
    mode = "dynamic"

Option values are converted to the type the pass's ``Options`` dataclass declares: ``int``,
``float``, ``bool`` (true/false/yes/no/1/0), ``str``, ``tuple[int, ...]`` written ``3+7``, and
optional forms of these. Unknown options and values that do not convert are ``PassError``s.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import PassError

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    passes: list[PassSpec]
    target: str | None = None


def parse_spec(text: str) -> list[PassSpec]:
    """Parse one ``--passes`` argument into specs (``;`` separates several)."""
    specs = []
    for chunk in text.split(";"):
        chunk = chunk.strip()
        if not chunk:
            continue
        name, _, rest = chunk.partition(":")
        options = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise PassError(f"option {item!r} of pass {name!r} is not key=value; write e.g. '{name}:key=value'.")
            options[key.strip()] = value.strip()
        specs.append(PassSpec(name.strip(), options))
    if not specs:
        raise PassError("an empty --passes value was given; write e.g. --passes cleanup.")
    return specs


def load_recipe(path: str | Path) -> Recipe:
    """Read a TOML recipe file (see the module docstring for its form)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PassError(f"recipe {path} does not exist; give the path of a .toml recipe file.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PassError(f"recipe {path} is not valid TOML ({exc}); fix the file.") from None
    entries = data.get("pass", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise PassError(f"recipe {path} must list passes as [[pass]] tables, each with a name.")
    specs = [PassSpec(str(e["name"]), {k: v for k, v in e.items() if k != "name"}) for e in entries]
    return Recipe(passes=specs, target=data.get("target"))


def build_options(options_cls: type, raw: dict[str, Any], pass_name: str) -> Any:
    """Instantiate a pass's Options dataclass from raw (string or TOML) values."""
    hints = typing.get_type_hints(options_cls)
    fields = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise PassError(f"pass {pass_name!r} has no option {unknown[0]!r}; its options are: {allowed}.")
    values = {key: _convert(value, hints[key], key, pass_name) for key, value in raw.items()}
    instance = options_cls(**values)
    check = getattr(instance, "validate", None)
    if check:
        check()
    return instance


def _convert(value: Any, hint: Any, key: str, pass_name: str) -> Any:
    try:
        return _coerce(value, hint)
    except (ValueError, TypeError):
        raise PassError(f"option {key}={value!r} of pass {pass_name!r} is not {_describe(hint)}.") from None


def _describe(hint: Any) -> str:
    """How a value of ``hint``'s type is written, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "none" for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])} joined by + (e.g. 3+7)"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in {"none", ""}):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except (ValueError, TypeError):
                continue
        raise ValueError(value)
    if origin is tuple:
        items = value.split("+") if isinstance(value, str) else list(value)
        return tuple(_coerce(item, args[0]) for item in items if item != "")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(value)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(value)
    if hint is int:
        if isinstance(value, float) or isinstance(value, bool):
            raise TypeError(value)
        return int(value)
    if hint is float:
        return float(value)
    if hint is str:
        return str(value)
    raise TypeError(f"unsupported option type {hint}")
