"""The config form, generated from the pydantic schema: one flat list of widgets per
training type, each with its dotted config path, kind, default, choices, bounds, help text,
section and the widget that shows it (a union's select, an optional section's checkbox).

Nothing here names a config field to build a widget: a field added to a model appears in
the form as it is. Only the section a path goes in is a rule (`SECTIONS`); a path no rule
names goes in General Training (Advanced).
"""

from __future__ import annotations

import functools
import typing
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from kubetune.config.base import document_fields, reachable_models

SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Basic", ("type", "model", "hf_variant", "single_file_config", "vae_model",
               "base_output_dir", "seed", "max_train_steps", "max_train_epochs",
               "save_every_n_steps", "save_every_n_epochs", "max_checkpoints", "report_to",
               "base_embeddings", "prediction_type", "save_checkpoint_format", "save_dtype")),
    ("Data Source", ("data_loader.dataset*", "data_loader.instance_dataset*",
                     "data_loader.class_dataset*")),
    ("Aspect Ratio Bucketing", ("data_loader.aspect_ratio_buckets*",)),
    ("Data Loading", ("data_loader*",)),
    ("Textual Inversion", ("num_vectors", "placeholder_token", "initializer_token",
                           "initial_phrase", "initial_embedding_file", "train_ti",
                           "ti_train_steps_ratio", "textual_inversion_learning_rate")),
    ("Optimizer", ("optimizer*", "lr_scheduler", "lr_warmup_steps", "*learning_rate")),
    ("Validation", ("*validation*", "validate_every_*")),
    ("Job", ("job*",)),
    ("Storage", ("storage*",)),
    ("Notify", ("notify*",)),
)  # fmt: skip
GENERAL = "General Training"
GENERAL_PRIMARY = (
    "train_unet",
    "train_text_encoder",
    "lora_checkpoint_format",
    "weight_dtype",
    "mixed_precision",
    "gradient_checkpointing",
    "cache_*",
    "use_masks",
)
"""General Training fields shown outside its Advanced part; the rest (LoRA rank, min SNR
gamma, max grad norm, batch size and any new field) go in Advanced."""
SECTION_ORDER = [name for name, _ in SECTIONS[:5]] + ["Optimizer", GENERAL, "Validation"]
SECTION_ORDER += ["Job", "Storage", "Notify"]
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_MISSING = object()
_DOCUMENTED: set[type[BaseModel]] = set()


@dataclass
class Widget:
    """One form control. `kind`: const, bool, int, number, text, enum, lines (a list of
    strings, one per line), json (anything else, as JSON text), group (a heading),
    optional (a checkbox: the section is set or null), union (the select of a tagged union's
    tag)."""

    id: str
    path: str
    kind: str
    label: str
    section: str
    advanced: bool = False
    help: str = ""
    default: Any = None
    required: bool = False
    nullable: bool = False
    choices: list[Any] = field(default_factory=list)
    bounds: dict[str, Any] = field(default_factory=dict)
    parent: list[Any] | None = None
    """[widget id, value]: shown only while that widget shows this value (and is shown)."""
    depth: int = 0


def section_of(path: str) -> tuple[str, bool]:
    """(section, advanced) of a dotted config path."""
    for name, patterns in SECTIONS:
        if any(fnmatchcase(path, p) for p in patterns):
            return name, False
    return GENERAL, not any(fnmatchcase(path, p) for p in GENERAL_PRIMARY)


@functools.cache
def form_for(cls: type[BaseModel]) -> list[dict[str, Any]]:
    """The widgets of one training type's form, in schema order."""
    models = {m.__name__: m for m in reachable_models(cls)}
    fresh = [m for m in models.values() if m not in _DOCUMENTED]
    document_fields(fresh)  # field docstrings → descriptions (rebuilds: once per model)
    _DOCUMENTED.update(fresh)
    schema = cls.model_json_schema()
    walker = _Walker(schema.get("$defs", {}), models)
    walker.model(schema, cls, "", "", None, None, 0)
    return [asdict(w) for w in walker.widgets]


def forms(classes: typing.Iterable[type[BaseModel]]) -> list[dict[str, Any]]:
    """One tab per training type: its `type` value, the sections in order and the widgets."""
    tabs = []
    for cls in classes:
        widgets = form_for(cls)
        present = {w["section"] for w in widgets}
        sections = [s for s in SECTION_ORDER if s in present]
        sections += sorted(present - set(sections))
        tabs.append(
            {"type": cls.model_fields["type"].default, "sections": sections, "widgets": widgets}
        )
    return tabs


class _Walker:
    """Walks a model's JSON Schema (and the classes behind it, for factory defaults)."""

    def __init__(self, defs: dict[str, Any], models: dict[str, type[BaseModel]]) -> None:
        self.defs, self.models = defs, models
        self.widgets: list[Widget] = []

    def model(
        self,
        schema: dict[str, Any],
        cls: type[BaseModel] | None,
        path: str,
        wid: str,
        parent: list[Any] | None,
        defaults: Any,
        depth: int,
        skip: str | None = None,
    ) -> None:
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            if name == skip:
                continue
            default = self._default(name, prop, cls, defaults)
            self.field(
                prop, f"{path}{name}", f"{wid}{name}", parent, default, depth,
                required=name in required and default is _MISSING,
            )  # fmt: skip

    def _default(self, name: str, prop: dict[str, Any], cls: Any, defaults: Any) -> Any:
        if isinstance(defaults, dict) and name in defaults:
            return defaults[name]
        if "default" in prop:
            return prop["default"]
        info = cls.model_fields.get(name) if cls is not None else None
        if info is not None and info.default_factory is not None:
            return to_jsonable_python(info.get_default(call_default_factory=True))
        return _MISSING

    def field(
        self,
        prop: dict[str, Any],
        path: str,
        wid: str,
        parent: list[Any] | None,
        default: Any,
        depth: int,
        *,
        required: bool = False,
    ) -> None:
        nullable, inner = _strip_null(prop)
        section, advanced = section_of(path)
        base = {
            "id": wid, "path": path, "label": path.rsplit(".", 1)[-1], "section": section,
            "advanced": advanced, "help": prop.get("description", ""), "parent": parent,
            "depth": depth, "nullable": nullable, "required": required,
            "default": None if default is _MISSING else default,
        }  # fmt: skip
        variants = self._variants(inner)
        if "$ref" in inner or variants:
            self._section(inner, variants, base, default)
            return
        kind, choices = _primitive(inner)
        bounds = {k: inner[k] for k in BOUNDS if k in inner}
        self.widgets.append(Widget(kind=kind, choices=choices, bounds=bounds, **base))

    def _section(
        self, inner: dict[str, Any], variants: list[tuple[str, str, dict[str, Any]]],
        base: dict[str, Any], default: Any,
    ) -> None:  # fmt: skip
        """A nested model (a heading) or a tagged union (a select); an optional one gets a
        checkbox first."""
        parent, depth, wid, path = base["parent"], base["depth"], base["id"], base["path"]
        if base["nullable"]:
            self.widgets.append(Widget(**{**base, "kind": "optional", "default": bool(default)}))
            parent = [wid, True]
        values = default if isinstance(default, dict) else None
        if not variants:
            ref = inner["$ref"].rsplit("/", 1)[-1]
            if not base["nullable"]:
                self.widgets.append(Widget(**{**base, "kind": "group", "default": None}))
            self.model(self.defs[ref], self.models.get(ref), f"{path}.", f"{wid}.", parent,
                       values, depth + 1)  # fmt: skip
            return
        tag = variants[0][0]
        tags = [value for _, value, _ in variants]
        chosen = values.get(tag) if values and values.get(tag) in tags else tags[0]
        union = {**base, "id": f"{wid}.{tag}", "path": f"{path}.{tag}", "label": f"{path}.{tag}"}
        union.update(kind="union", default=chosen, choices=tags, parent=parent, nullable=False)
        self.widgets.append(Widget(**union))
        for _, value, ref in variants:
            own = values if values and values.get(tag) == value else None
            self.model(self.defs[ref], self.models.get(ref), f"{path}.", f"{wid}[{value}].",
                       [union["id"], value], own, depth + 1, skip=tag)  # fmt: skip

    def _variants(self, inner: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        """(tag field, tag value, $def name) of each branch of a tagged union, else []."""
        branches = inner.get("oneOf") or inner.get("anyOf") or []
        refs = [b.get("$ref", "").rsplit("/", 1)[-1] for b in branches]
        if not refs or not all(r in self.defs for r in refs):
            return []
        for tag in ("type", "optimizer_type", *self.defs[refs[0]].get("properties", {})):
            consts = [self.defs[r].get("properties", {}).get(tag, {}).get("const") for r in refs]
            if all(isinstance(c, str) for c in consts) and len(set(consts)) == len(consts):
                return [(tag, c, r) for c, r in zip(consts, refs, strict=True)]
        return []


def _strip_null(prop: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(nullable, the schema without its null branch)."""
    branches = prop.get("anyOf")
    if not branches or {"type": "null"} not in branches:
        return False, prop
    rest = [b for b in branches if b != {"type": "null"}]
    return True, rest[0] if len(rest) == 1 else {"anyOf": rest}


def _primitive(inner: dict[str, Any]) -> tuple[str, list[Any]]:
    """(kind, choices) of a non-model schema."""
    if "const" in inner:
        return "const", [inner["const"]]
    if "enum" in inner:
        return "enum", list(inner["enum"])
    kind = inner.get("type")
    if kind == "boolean":
        return "bool", []
    if kind == "integer":
        return "int", []
    if kind == "number":
        return "number", []
    if kind == "string":
        return "text", []
    if kind == "array" and inner.get("items", {}).get("type") == "string":
        return "lines", []
    return "json", []
