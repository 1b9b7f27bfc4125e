"""Build argparse options from a stage's config dataclass, so the CLI never keeps a parallel list.

Each field becomes ``--field-name``; its help text is the comment after the field in the source.
Options default to ``None`` so that only flags the user gave override a preset or a YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any

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
