"""Typed records read from and written to JSON: one generic, checked conversion.

Every file ann2snn writes or reads as data (calibration profile, artifact metadata, report) is a
tree of dataclasses. ``from_json(cls, value, where)`` builds it, checking every field's presence
and type and naming the offending key (``profile.json: field 'layers[2].params' is missing``), and refusing unknown keys;
``to_json(record)`` writes it back in field order, leaving out optional fields that are ``None``
(files written before a field existed read back and write out unchanged). Data never selects
code: only the types declared here are built, whatever the file says.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

from ann2snn.errors import UserError

R = TypeVar("R")


def from_json(cls: type[R], value: Any, where: str, path: str = "") -> R:
    """Build a ``cls`` from parsed JSON; ``where`` names the file in errors."""
    return _convert(cls, value, where, path)


def to_json(record: Any) -> Any:
    """Plain JSON values from a record (dataclasses become objects in field order)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        out = {}
        for f in dataclasses.fields(record):
            value = getattr(record, f.name)
            if value is None and f.metadata.get("omit_none", True) and _optional(f):
                continue
            out[f.name] = to_json(value)
        return out
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [to_json(v) for v in record]
    return record


def field(default: Any = dataclasses.MISSING, *, keep_none: bool = False,
          default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that, with ``keep_none``, writes ``null`` rather than leaving out ``None``."""
    meta = {"omit_none": not keep_none}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _optional(f: dataclasses.Field) -> bool:
    return f.default is None


def _label(path: str) -> str:
    return path or "(top level)"


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where, path)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: field '{_label(path)}' must be an object, not {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = [k for k in value if k not in known]
        if unknown:
            sub = f"{path}.{unknown[0]}" if path else str(unknown[0])
            raise UserError(f"{where}: unknown field '{sub}' (expected {', '.join(sorted(known))})")
        kwargs = {}
        for f in dataclasses.fields(tp):
            key = f.name
            sub = f"{path}.{key}" if path else key
            if key not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise UserError(f"{where}: field '{sub}' is missing")
                continue
            kwargs[f.name] = _convert(hints[f.name], value[key], where, sub)
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: field '{_label(path)}': {exc}") from None
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise UserError(f"{where}: field '{_label(path)}' must be a list, not {type(value).__name__}")
        item = args[0] if args else Any
        items = [_convert(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: field '{_label(path)}' must be an object, not {type(value).__name__}")
        return value
    return _scalar(tp, value, where, path)


def _scalar(tp: Any, value: Any, where: str, path: str) -> Any:
    """A plain value of type ``tp`` (float, int, str, bool or list), checked."""
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp in (str, bool):
        ok = isinstance(value, tp)
    elif tp is list:
        ok = isinstance(value, list)
    else:
        raise TypeError(f"records: unsupported field type {tp!r}")
    if not ok:
        raise UserError(f"{where}: field '{_label(path)}' must be {tp.__name__}, not {type(value).__name__}")
    if tp is float:  # an integer too large for a float (10**400) is no number ann2snn can compute with
        try:
            value = float(value)
        except OverflowError:
            raise UserError(f"{where}: field '{_label(path)}' is beyond the range of a float") from None
    return value
