"""`tcserve serve`'s flags, generated from `Settings`: each field's name, type,
description and default (or the default model's default) become its flag and
its `--help` line, so nothing is declared twice."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from tcserve.config import LlamaCppModel, Settings


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        spec = _cli_spec(field)
        flag = spec.get("flag")
        if flag == "":
            continue  # an environment variable only
        flag = flag or "--" + name.replace("_", "-")
        help_text = f"{field.description} (default {_default_text(field, spec)}; env TCSERVE_{name.upper()})"
        if spec.get("const") is not None:
            parser.add_argument(flag, dest=name, action="store_const", const=spec["const"], help=help_text)
            continue
        kind, choices = _value_type(field.annotation)
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            choices=choices,
            action="append" if spec.get("repeat") else "store",
            metavar=spec.get("metavar") or (None if choices else name.upper()),
            help=help_text,
        )


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given, so variables and defaults apply)."""
    return {name: value for name in Settings.model_fields if (value := getattr(args, name, None)) is not None}


def _cli_spec(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    spec = extra.get("cli") if isinstance(extra, dict) else None
    return spec if isinstance(spec, dict) else {}


def _default_text(field: FieldInfo, spec: dict[str, Any]) -> str:
    if spec.get("default"):
        return str(spec["default"])
    if model_field := spec.get("model_default"):
        return str(LlamaCppModel.model_fields[model_field].default)
    default = field.default
    if default is None or default == ():
        return "none"
    return f"{default:g}" if isinstance(default, float) else str(default)


def _value_type(annotation: Any) -> tuple[type, list[str] | None]:
    """argparse's `type` and `choices` for a field: the non-None part of an optional,
    the item of a tuple, the values of a Literal."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _value_type(args[0])
    if origin is typing.Annotated or origin is tuple:
        return _value_type(args[0])
    if annotation in (int, float, str, Path):
        return annotation, None
    raise TypeError(f"no command-line type for {annotation!r}")
