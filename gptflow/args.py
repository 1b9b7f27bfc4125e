"""Build argparse options from a stage's config dataclass, so the CLI never keeps a parallel list.

Each field becomes ``--field-name``; its help text is the comment after the field in the source.
Options default to ``None`` so that only flags the user gave override a preset or a YAML file.
Every command merges its config the same way (``merged_fields``): defaults < ``--config`` YAML < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:\s*[^=]+=\s*.+?#\s*(.+)$")


def field_help(cls: type) -> dict[str, str]:
    """Map field name -> trailing source comment, for every class in the MRO that has source."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            if m := _FIELD_LINE.match(line):
                helps[m.group(1)] = m.group(2).strip()
    return helps


def _scalar_type(tp: Any) -> Any:
    """The argparse ``type=`` for an annotation (Optional[X] -> X, tuple[X, ...] -> X with nargs)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0])
    return tp


def add_config_args(
    parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = (), prefix: str = ""
) -> None:
    """Add one ``--[prefix-]field`` option per dataclass field of ``cls``."""
    helps = field_help(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        kw: dict[str, Any] = dict(dest=f"{prefix.replace('-', '_')}{f.name}", default=None)
        kw["help"] = f"{helps.get(f.name, '')} (default: {default})".strip()
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (tuple, list):
            inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
            kw.update(nargs="*", type=inner[0] if inner else str)
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        group.add_argument(flag, **kw)


def config_overrides(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` that the user set on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f"{prefix.replace('-', '_')}{f.name}", None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def _init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _checked(path: Path, data: dict[str, Any], cls: type, where: str = "") -> dict[str, Any]:
    """``data`` if every key is a field of ``cls``; else an error naming the key, the file and the fix."""
    known = _init_fields(cls)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{path}{where}: unknown {cls.__name__} field {key!r}; {hint}known fields: {', '.join(known)}"
            )
    return dict(data)


def read_config_file(path: str | Path | None, schema: type | dict[str, type]) -> dict[str, Any]:
    """The fields a ``--config`` YAML file sets (none for no file), their names checked.

    ``schema`` a dataclass: the file is a flat mapping of its fields. ``{section: dataclass}``: the file
    holds those sections (``model:``, ``train:``), each a mapping of fields; returns ``{section: fields}``.
    Values are checked where the config is built, after the file's fields are applied.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    data = {} if data is None else data
    if not isinstance(schema, dict):
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} must be a mapping of {schema.__name__} fields (field: value), "
                f"got a {type(data).__name__}"
            )
        return _checked(path, data, schema)
    names = ", ".join(f"`{s}:`" for s in schema)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a mapping with {names} sections, got a {type(data).__name__}")
    unknown = [k for k in data if k not in schema]
    if unknown:
        raise ValueError(f"{path}: unknown section {unknown[0]!r}; the file may hold {names} sections")
    out = {}
    for section, cls in schema.items():
        fields = data.get(section) or {}
        if not isinstance(fields, dict):
            raise ValueError(
                f"{path}: section `{section}:` must be a mapping of {cls.__name__} fields (field: value), "
                f"got a {type(fields).__name__}: {fields!r}"
            )
        out[section] = _checked(path, fields, cls, where=f", section `{section}:`")
    return out


def merged_fields(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """defaults < ``--config`` YAML file (``args.config``) < flags given on the command line.

    Returns only the fields the file or the flags set, so the caller applies them over whatever the
    defaults are (the dataclass's, a preset's, a task's): a key the file leaves out changes nothing.
    """
    return {**read_config_file(args.config, cls), **config_overrides(args, cls, prefix)}


def merged_sections(args: argparse.Namespace, sections: dict[str, tuple[type, str]]) -> dict[str, dict]:
    """``merged_fields`` for a YAML file made of sections: ``{section: (dataclass, flag prefix)}``."""
    file = read_config_file(args.config, {name: cls for name, (cls, _) in sections.items()})
    return {
        name: {**file.get(name, {}), **config_overrides(args, cls, prefix)}
        for name, (cls, prefix) in sections.items()
    }
