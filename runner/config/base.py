"""The base class every config section derives from, and the cross-field problem carrier."""

from __future__ import annotations

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
        use_attribute_docstrings=True,
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
