"""The base class every config section derives from, and the cross-field problem carrier."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict


class FieldProblems(ValueError):
    """Raised by a model validator to report several cross-field problems at once.

    Each problem is ``(field_name, message)`` relative to the model that raised it; the config
    loader turns them into ``file:line: full.path: message`` lines.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in problems))


class ConfigModel(BaseModel):
    """Unknown keys are errors; field docstrings become the schema's descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        # Field docstrings are read on demand (document_fields), not at import: parsing the
        # source of every class at start-up doubled `launcher validate`'s cold start.
        use_attribute_docstrings=False,
        validate_default=True,
        frozen=False,
    )


class Problems:
    """Collects cross-field problems inside a validator; ``raise_if_any`` raises them all."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.items.append((field, message))

    def check(self, ok: bool, field: str, message: str) -> None:
        if not ok:
            self.add(field, message)

    def raise_if_any(self) -> None:
        if self.items:
            raise FieldProblems(self.items)


def exactly_one(problems: Problems, values: dict[str, object], what: str) -> None:
    """Require exactly one of the named fields to be set (not None)."""
    set_names = [name for name, value in values.items() if value is not None]
    names = " / ".join(values)
    if not set_names:
        problems.add(next(iter(values)), f"set exactly one of {names} ({what})")
    elif len(set_names) > 1:
        problems.add(set_names[1], f"set only one of {names}, not both ({what})")


def field_docstrings(cls: type) -> dict[str, str]:
    """The docstring written under each annotated field in ``cls``'s own source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def document_fields(models: list[type[BaseModel]]) -> None:
    """Copy field docstrings (nearest class in the MRO first) into the field descriptions
    and rebuild the models, for the JSON Schema and the config reference."""
    for model in models:
        merged: dict[str, str] = {}
        for klass in reversed(model.__mro__):
            if issubclass(klass, BaseModel) and klass is not BaseModel:
                merged.update(field_docstrings(klass))
        for name, field in model.model_fields.items():
            if not field.description and name in merged:
                field.description = merged[name]
        model.model_rebuild(force=True)


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through Optional, unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]
    return []


def reachable_models(*roots: type[BaseModel]) -> list[type[BaseModel]]:
    """Every model reachable from ``roots`` through their fields, once each, every model
    after the models its fields hold (sections before the types that use them)."""
    seen: list[type[BaseModel]] = []

    def walk(cls: type[BaseModel]) -> None:
        if cls in seen:
            return
        for field in cls.model_fields.values():
            for sub in models_in(field.annotation):
                walk(sub)
        seen.append(cls)

    for cls in roots:
        walk(cls)
    return seen
