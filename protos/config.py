"""Role configs as files: one codec between frozen dataclasses, TOML, command-line flags and JSON.

Why here: the edge (torch-free) and the cloud, FL and launcher roles all read their settings the
same way, and ``protos`` is the one package both sides of the edge/core wall may import. Each
role declares one frozen dataclass — the single place its fields, defaults, help and validation
live — and this module does the rest:

- :func:`from_mapping` builds it from a TOML table (or a Flower run config, or JSON), refusing an
  unknown key with its name and the valid ones, and a value of the wrong type with its key;
- :func:`to_toml` writes it back as TOML (help as comments), so ``--print-config > f.toml`` and
  ``--config f.toml --print-config`` print the same text;
- :func:`add_config_flags` generates one flag per field (``--batch-size``; a section's fields keep
  their own names unless the field says ``flag=``; two flags with one name are refused) and
  :func:`resolve` layers them: defaults < ``--config FILE`` < flags;
- :func:`coerce` is the one value coercion, for TOML, flags and Flower's run config alike.

Conventions: TOML keys are the field names (``snake_case``); a nested dataclass is a ``[section]``;
``None`` has no TOML spelling, so a field whose default is ``None`` is omitted while unset (flags
take ``none``). Fields declare help with :func:`option`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 boards (e.g. Jetson's Ubuntu 22.04): the same parser, from PyPI
    import tomli as tomllib

T = TypeVar("T")
_NONE_WORDS = ("none", "off", "null")
_NON_FINITE = ("inf", "-inf", "nan")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: Sequence[Any] | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text (and optionally its flag name and choices)."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def same_as(cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field that mirrors ``cls.name`` (its help, and its default unless one is given): a
    setting that a scenario passes on to a role is documented and defaulted in one place."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default is dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return option(default, f.metadata.get("help", ""), choices=f.metadata.get("choices"))


def section(factory: Any, help: str = "", *, prefix: str = "") -> Any:
    """A nested dataclass field: a ``[section]`` in TOML. ``factory`` makes its default (the class
    itself, or a function returning an instance); ``prefix`` is put before its fields' flags
    (``prefix="edge-"``: ``--edge-batch-size``)."""
    field = option(help=help, default_factory=factory)
    field.metadata = types.MappingProxyType({**field.metadata, "prefix": prefix})
    return field


# ------------------------------------------------------------------------------------ values


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, key: str, *, text: bool = False) -> Any:
    """``value`` as type ``hint`` or a ``ValueError`` naming ``key``.

    Strict for typed sources (TOML, JSON: an int is accepted for a float, an integral float for
    an int); with ``text=True`` strings are parsed too (flags, ``--set``, Flower run config given
    as strings): ``true``/``false``/``1``/``0``, numbers, ``none``, comma-separated lists.
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        nullable = type(None) in args
        if value is None or (text and nullable and isinstance(value, str) and value.lower() in _NONE_WORDS):
            if nullable:
                return None
            raise ValueError(f"{key}: a value is required")
        errors = []
        for option_type in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option_type, key, text=text)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a table, got {value!r}")
        return from_mapping(hint, value, where=key, text=text)
    if origin in (tuple, list):
        if text and isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[int, int, int]
            if len(value) != len(args):
                raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, key, text=text) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [coerce(v, inner, key, text=text) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a table, got {value!r}")
        kt, vt = args or (Any, Any)
        return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}", text=text) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if text and isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value in _NON_FINITE:  # JSON's spelling of them (records)
            return float(value)
        if text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if text and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"{key}: unsupported field type {hint!r}")
    raise ValueError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def from_mapping(cls: type[T], data: Mapping[str, Any], *, where: str = "", text: bool = False,
                 kebab: bool = False) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ValueError``.

    ``kebab=True`` reads hyphenated keys (Flower's run config) for the top-level fields.
    """
    hints = _hints(cls)
    by_key = {(f.name.replace("_", "-") if kebab else f.name): f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - set(by_key)):
        place = f"[{where}]" if where else "the top level"
        raise ValueError(f"unknown key {unknown[0]!r} in {place}; valid keys: {', '.join(by_key)}")
    kwargs = {}
    for key, value in data.items():
        f = by_key[key]
        kwargs[f.name] = coerce(value, hints[f.name], f"{where}.{key}" if where else key, text=text)
    return cls(**kwargs)


def to_mapping(obj: Any) -> dict[str, Any]:
    """A dataclass as plain nested dicts / lists (tuples become lists): JSON- and TOML-ready."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(obj)


# ------------------------------------------------------------------------------------- TOML


def toml_value(v: Any, key: str = "value") -> str:
    """One value as a TOML literal (also Flower's ``--run-config`` values)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON's string escapes are valid TOML
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x, key) for x in v) + "]"
    raise ValueError(f"{key}: cannot write {v!r} as TOML")


def to_toml(obj: Any, *, header: str = "") -> str:
    """``obj`` (a dataclass instance) as TOML: scalars first, then one table per section."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables: list[tuple[str, Any]] = []

    def emit(o: Any, prefix: str) -> None:
        for f in dataclasses.fields(o):
            v = getattr(o, f.name)
            if dataclasses.is_dataclass(v):
                tables.append((f"{prefix}{f.name}", v))
                continue
            if f.metadata.get("help"):
                lines.append(f"# {f.metadata['help']}")
            if v is None:
                lines.append(f"# {f.name} = (not set)")
            else:
                lines.append(f"{f.name} = {toml_value(v, prefix + f.name)}")

    emit(obj, "")
    while tables:
        name, value = tables.pop(0)
        lines += ["", f"[{name}]"]
        emit(value, name + ".")
    return "\n".join(lines) + "\n"


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a role config file; errors name the file."""
    try:
        return from_mapping(cls, load_toml(path))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def write_config(path: str | Path, cfg: Any, header: str = "") -> Path:
    """Write ``cfg`` as TOML (atomically: readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_toml(cfg, header=header))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------ flags


def _leaves(cls: type, path: tuple[str, ...] = (), flag_prefix: str = "") -> list[tuple[tuple[str, ...], str, dataclasses.Field, Any]]:
    """(path, flag, field, type) of every scalar field, sections flattened."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _leaves(hint, (*path, f.name), flag_prefix + (f.metadata.get("prefix") or ""))
        else:
            out.append(((*path, f.name), flag_prefix + (f.metadata.get("flag") or f.name.replace("_", "-")), f, hint))
    return out


def _scalar_parser(hint: Any, flag: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return coerce(text, hint, flag, text=True)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = _type_name(hint)
    return parse


def _default_text(help_text: str, default: Any) -> str:
    """`` (default: X)`` after the help, unless the help already says what the default is."""
    if "(default" in help_text:
        return ""
    if default is None:
        return " (default: not set)"
    if isinstance(default, (list, tuple)):
        default = " ".join(map(str, default)) if default else "none"
    return f" (default: {default})" if default != "" else ""


def _value_at(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, title: str = "settings") -> None:
    """``--config FILE``, ``--print-config`` and one flag per field of ``cls``.

    Flags carry no defaults (``SUPPRESS``): only what was typed overrides the file.
    """
    parser.add_argument("--config", type=Path, metavar="FILE", help="read settings from this TOML file "
                        "(flags override it)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as TOML and exit")
    groups: dict[tuple[str, ...], Any] = {}
    seen: dict[str, str] = {}
    defaults = cls()  # the defaults as resolved (a section's own factory may differ from its class's)
    for path, flag, f, hint in _leaves(cls):
        dest = "cfg:" + ".".join(path)
        if flag in seen:
            raise ValueError(f"{cls.__name__}: flag --{flag} would set both {seen[flag]} and {'.'.join(path)}; "
                             f"give one of them flag=")
        seen[flag] = ".".join(path)
        group = groups.get(path[:-1])
        if group is None:
            group = groups[path[:-1]] = parser.add_argument_group(
                f"[{'.'.join(path[:-1])}] {title}" if path[:-1] else title)
        help_text = f.metadata.get("help") or ""
        help_text += _default_text(help_text, _value_at(defaults, path))
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        origin = get_origin(hint)
        if hint is bool:
            group.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin in (tuple, list) and get_args(hint)[-1:] == (Ellipsis,) or origin is list:
            kwargs["nargs"] = "*"
            kwargs["type"] = _scalar_parser(get_args(hint)[0], f"--{flag}")
            kwargs["metavar"] = _type_name(get_args(hint)[0]).upper()
        else:
            kwargs["type"] = _scalar_parser(hint, f"--{flag}")
            kwargs["metavar"] = "X" if "choices" in kwargs else _metavar(hint)
            if "choices" in kwargs:
                kwargs.pop("metavar")
        group.add_argument(f"--{flag}", **kwargs)


def _metavar(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {int: "N", float: "X", str: "TEXT"}.get(base, _type_name(base).upper())


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as a nested mapping (``selection.method`` → ``{"selection":
    {"method": …}}``)."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:"):
            continue
        *parents, leaf = dest[4:].split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``, table by table."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def resolve(cls: type[T], args: argparse.Namespace) -> T:
    """Defaults < ``--config FILE`` < the flags given."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        data = load_toml(args.config)
    try:
        return from_mapping(cls, merge(data, flag_values(args)))
    except ValueError as exc:
        where = f"{args.config}: " if getattr(args, "config", None) is not None else ""
        raise ValueError(f"{where}{exc}") from exc


def resolve_or_print(cls: type[T], args: argparse.Namespace) -> T | None:
    """The resolved config; with ``--print-config`` it is printed as TOML instead and ``None`` is
    returned (the command then exits 0)."""
    cfg = resolve(cls, args)
    if getattr(args, "print_config", False):
        print(to_toml(cfg), end="")
        return None
    return cfg
