"""Textual-inversion embedding files: read them and add their tokens to the text encoders.

Reads the formats people have: diffusers ``learned_embeds`` (``{token: tensor}``), kohya /
A1111 ``.safetensors`` (``emb_params``), A1111 ``.pt`` (``string_to_param``), and SDXL files
with ``clip_l`` / ``clip_g``. A file with N vectors adds the tokens ``token``,
``token_1`` … ``token_{N-1}`` (diffusers' convention: prompts use the expanded form, as
``TextualInversionLoaderMixin.maybe_convert_prompt`` produces).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kubetune.errors import UserError


class EmbeddingError(UserError):
    """An embeddings file is missing, unreadable or does not fit the model."""


def read_embedding_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an embeddings file, keyed ``clip_l`` / ``clip_g`` or ``""`` (single)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise EmbeddingError(f"{path}: cannot read embeddings file: {err}") from err
    if isinstance(data, torch.Tensor):
        return {"": data}
    if "clip_l" in data or "clip_g" in data:
        return {k: data[k] for k in ("clip_l", "clip_g") if k in data}
    if "string_to_param" in data:
        data = data["string_to_param"]
    if "emb_params" in data:
        return {"": data["emb_params"]}
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        raise EmbeddingError(f"{path}: expected one embedding tensor, found keys {list(data)}")
    return {"": tensors[0]}


def token_names(token: str, num_vectors: int) -> list[str]:
    """``token``, ``token_1`` … ``token_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def multi_vector_tokens(tokenizer: Any) -> dict[str, str]:
    """Added tokens that have ``token_1`` … siblings → their full expansion
    (``"<t>" → "<t> <t>_1 <t>_2"``): trained placeholders and ``base_embeddings`` alike."""
    added = set(tokenizer.get_added_vocab())
    out: dict[str, str] = {}
    for token in added:
        names = [token]
        while f"{token}_{len(names)}" in added:
            names.append(f"{token}_{len(names)}")
        if len(names) > 1:
            out[token] = " ".join(names)
    return out


def expand_placeholders(caption: str, expansions: Mapping[str, str]) -> str:
    """Write every multi-vector token in ``caption`` as all its vectors, wherever it appears
    (template, original caption, prefix), as invoke-training does before tokenizing and
    diffusers' ``maybe_convert_prompt`` at inference. An already expanded occurrence is left
    as it is, so expanding twice changes nothing."""
    for token in sorted(expansions, key=len, reverse=True):
        full = expansions[token]
        pattern = f"{re.escape(full)}|{re.escape(token)}(?!_\\d)"
        caption = re.sub(pattern, lambda _m, full=full: full, caption)
    return caption


def add_token_embeddings(
    tokenizer: Any, text_encoder: Any, token: str, vectors: torch.Tensor, *, source: str
) -> list[int]:
    """Add ``token`` (+ ``token_i``) to ``tokenizer`` with rows ``vectors``; return their ids."""
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    table = text_encoder.get_input_embeddings().weight
    if vectors.ndim != 2 or vectors.shape[1] != table.shape[1]:
        raise EmbeddingError(
            f"{source}: embedding width {tuple(vectors.shape)} does not fit this text encoder "
            f"(width {table.shape[1]}): it was trained for another base model"
        )
    names = token_names(token, vectors.shape[0])
    existing = [n for n in names if n in tokenizer.get_vocab()]
    if existing:
        raise EmbeddingError(f"{source}: token {existing[0]!r} is already in the vocabulary")
    tokenizer.add_tokens(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(names)
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[ids] = vectors.to(device=weight.device, dtype=weight.dtype)
    return ids


def load_base_embeddings(comps: Any, embeddings: Mapping[str, str]) -> None:
    """Load each ``token → local file`` into ``comps``' tokenizer(s) and text encoder(s)."""
    for token, path in embeddings.items():
        tensors = read_embedding_file(path)
        if comps.is_sdxl:
            if set(tensors) != {"clip_l", "clip_g"}:
                raise EmbeddingError(f"{path}: SDXL embeddings need both clip_l and clip_g")
            add_token_embeddings(
                comps.tokenizer, comps.text_encoder, token, tensors["clip_l"], source=path
            )
            add_token_embeddings(
                comps.tokenizer_2, comps.text_encoder_2, token, tensors["clip_g"], source=path
            )
        else:
            vectors = tensors.get("") if "" in tensors else tensors.get("clip_l")
            if vectors is None:
                raise EmbeddingError(f"{path}: no SD1.5 (clip_l) embedding in this file")
            add_token_embeddings(comps.tokenizer, comps.text_encoder, token, vectors, source=path)
