"""Pydantic errors → located, human problems: the one translator for every strict schema.

Recipes, cluster profiles, eval specs and provenance sidecars are all strict pydantic models read
from YAML. Whatever the schema, a user sees ``file:line: key.path: message`` with the valid keys or
choices and a did-you-mean, never pydantic's own text. :func:`validate` is the entry point for
files without line tracking; the recipe loader passes the line of every key it parsed.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ValidationError

from affinage.errors import UserError

KeyPath = tuple[Union[str, int], ...]


# ------------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class Origin:
    """Where a value was written: a line of a file, a ``--set`` override, or a dict given in code."""

    file: Optional[Path] = None
    line: Optional[int] = None
    override: Optional[str] = None

    def __str__(self) -> str:
        if self.override is not None:
            return f"--set {self.override}"
        if self.file is None:
            return "<recipe dict>"
        return f"{show_path(self.file)}:{self.line}" if self.line else show_path(self.file)

    @property
    def folder(self) -> Path:
        """Folder that relative paths written here are relative to (the CWD for ``--set`` and dicts)."""
        return self.file.parent if self.file else Path.cwd()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, printed as ``where: key.path: message``."""

    origin: Origin
    key: str
    message: str

    def __str__(self) -> str:
        return ": ".join(part for part in (str(self.origin), self.key, self.message) if part)


def show_path(path: Path) -> str:
    """A path as the user would type it: relative to the CWD when under it."""
    cwd = Path.cwd()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def dotted(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)



@dataclass
class Where:
    """The origin of each key path of a document (its nearest ancestor's when it has none)."""

    origins: Mapping[KeyPath, "Origin"] = field(default_factory=dict)
    fallback: "Origin" = None  # type: ignore[assignment]

    def origin(self, path: KeyPath) -> "Origin":
        for end in range(len(path), -1, -1):
            if path[:end] in self.origins:
                return self.origins[path[:end]]
        return self.fallback or Origin()


# ---------------------------------------------------------------------------------- schema walk
def members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of an Optional/Union annotation (or the annotation itself)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def step(annotation: Any, part: Union[str, int]) -> Any:
    """Annotation of ``part`` inside a value of type ``annotation``; None if the schema has no such key."""
    for member in members(annotation):
        if isinstance(part, int) and typing.get_origin(member) is list:
            return typing.get_args(member)[0]
        if isinstance(part, str) and _is_model(member) and part in member.model_fields:
            return member.model_fields[part].annotation
    return None


def annotation_at(root: type[BaseModel], path: KeyPath) -> Any:
    annotation: Any = root
    for part in path:
        annotation = step(annotation, part)
        if annotation is None:
            return None
    return annotation


def model_at(root: type[BaseModel], path: KeyPath) -> Optional[type[BaseModel]]:
    return next((m for m in members(annotation_at(root, path)) if _is_model(m)), None)


def _all_field_paths(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """``{field name: dotted path}`` for every nested field, to place a key written at the wrong level."""
    found: dict[str, str] = {}
    for name, info in model.model_fields.items():
        found.setdefault(name, prefix + name)
        for member in members(info.annotation):
            inner = typing.get_args(member)[0] if typing.get_origin(member) is list else member
            if _is_model(inner) and name != "duration":  # a duration is written as text, not unit/value
                for sub, dotted in _all_field_paths(inner, f"{prefix}{name}.").items():
                    found.setdefault(sub, dotted)
    return found


def unknown_key(root: type[BaseModel], path: KeyPath) -> str:
    """Message for a key the schema does not have, with a did-you-mean and the valid keys."""
    key, parent = str(path[-1]), path[:-1]
    model = model_at(root, parent)
    valid = list(model.model_fields) if model else []
    text = f"unknown key {key!r}."
    close = difflib.get_close_matches(key, valid, n=1)
    elsewhere = _all_field_paths(root).get(key)  # a key written at the wrong level
    if close:
        text += f" Did you mean {close[0]!r}?"
    elif elsewhere:
        text += f" Did you mean {elsewhere!r}{'' if '.' in elsewhere else ' (a top-level key)'}?"
    where = f"in {dotted(parent)}" if parent else "at the top level"
    extra = ", base" if not parent and root.__name__ == "Recipe" else ""
    return f"{text} Valid keys {where}: {', '.join(valid)}{extra}"


def literal_choices(annotation: Any) -> list[Any]:
    return [c for m in members(annotation) if typing.get_origin(m) is Literal for c in typing.get_args(m)]


# --------------------------------------------------------------------------------- validation
_TYPE_TEXT = {
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected text (quote it if YAML reads it as a number or boolean)",
    "model_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
    "list_type": "expected a list",
}
def _short(value: Any) -> str:
    text = "nothing" if value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _schema_loc(root: type[BaseModel], loc: KeyPath) -> KeyPath:
    """Drop pydantic's union tags (``'list[str]'``, ``"literal['all-linear']"``) from an error location."""
    for end in range(len(loc), 0, -1):
        if annotation_at(root, loc[:end]) is not None:
            return loc[:end]
    return ()


def _named_key(message: str, loc: KeyPath, origins: Mapping[KeyPath, Any]) -> KeyPath:
    """The first key a model validator's message names that the recipe sets, else ``loc``.

    Model validators compare several keys ("method.kind: qlora with model.init: random"); pointing at
    the first one written in the recipe gives the user a line to edit rather than a whole section.
    """
    for token in re.findall(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*", message):
        if not re.search(r"[._\[]", token):
            continue  # plain words ("model", "data") are prose, not key paths
        parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]", token) if p)
        for candidate in (parts, loc + parts):
            if candidate in origins:
                return candidate
    return loc


def _problem(root: type[BaseModel], loc: KeyPath, errors: list[dict], where: Where, examples: Mapping[str, str]) -> Problem:
    """Turn the pydantic errors at one location into a located, human message."""
    kind, value = errors[0]["type"], errors[0].get("input")
    if kind == "extra_forbidden":
        return Problem(where.origin(loc), dotted(loc), unknown_key(root, loc))
    if kind == "missing":
        key = dotted(loc)
        pattern = ".".join("*" if isinstance(p, int) else str(p) for p in loc)
        info = model_at(root, loc[:-1]).model_fields[str(loc[-1])]
        hint = f"e.g. {examples[pattern]}" if pattern in examples else (info.description or "")
        level = f"in {dotted(loc[:-1])}" if loc[:-1] else "at the top level"
        return Problem(where.origin(loc[:-1]), key, f"missing required key {str(loc[-1])!r} {level}; {hint}".rstrip("; "))
    if kind in ("value_error", "assertion_error"):
        message = str(errors[0]["ctx"]["error"])
        if isinstance(value, dict):  # raised by a model validator: find the key it is about
            loc = _named_key(message, loc, where.origins)
        return Problem(where.origin(loc), dotted(loc), message)
    if kind in ("model_type", "dict_type") and value is None and loc:
        parent = model_at(root, loc[:-1])  # None for a list item
        optional = parent is not None and not parent.model_fields[str(loc[-1])].is_required()
        fix = "give it keys, or remove it to use the defaults" if optional else "give it keys"
        return Problem(where.origin(loc), dotted(loc), f"is empty: {fix}")
    if kind == "too_short":
        return Problem(where.origin(loc), dotted(loc), f"needs at least {errors[0]['ctx']['min_length']} item(s)")
    choices = [str(c) for c in literal_choices(annotation_at(root, loc))]
    if kind == "literal_error" and len(errors) == 1:
        text = f"invalid value {_short(value)}. Valid choices: {', '.join(choices)}"
        close = difflib.get_close_matches(str(value).lower(), choices, n=1)
        return Problem(where.origin(loc), dotted(loc), text + (f". Did you mean {close[0]!r}?" if close else ""))
    messages = []  # several errors at one location: the alternatives of a union, e.g. a list or 'all-linear'
    for error in errors:
        if error["type"] == "literal_error":
            messages.append(" or ".join(repr(c) for c in choices))
        else:
            messages.append(_TYPE_TEXT.get(error["type"], error["msg"][:1].lower() + error["msg"][1:]))
    return Problem(where.origin(loc), dotted(loc), f"{' or '.join(dict.fromkeys(messages))}, got {_short(value)}")


def translate(
    error: ValidationError, root: type[BaseModel], where: Where, examples: Mapping[str, str] = {}
) -> list[Problem]:
    """Every error of ``error`` (raised validating ``root``) as one located problem per location."""
    grouped: dict[KeyPath, list[dict]] = {}
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"]) if err["type"] == "extra_forbidden" else _schema_loc(root, tuple(err["loc"]))
        grouped.setdefault(loc, []).append(err)
    return [_problem(root, loc, errs, where, examples) for loc, errs in grouped.items()]


def validate(root: type[BaseModel], data: Any, file: Optional[Path] = None, error: type[UserError] = UserError,
             hint: str = ""):
    """``root.model_validate(data)``, or ``error`` whose text lists each problem as ``file: key: message``."""
    try:
        return root.model_validate(data)
    except ValidationError as e:
        problems = translate(e, root, Where(fallback=Origin(Path(file) if file else None)))
        lines = [str(p) for p in problems]
        text = lines[0] if len(lines) == 1 else "\n".join([f"{len(lines)} problems:"] + [f"  {line}" for line in lines])
        raise error(text + (f"\n{hint}" if hint else "")) from None
