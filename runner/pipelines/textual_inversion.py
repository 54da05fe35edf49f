"""Textual Inversion (SD1.5 / SDXL): new placeholder tokens whose embedding vectors train.

Only the new vectors are parameters: each text encoder's token embedding is wrapped by
``TrainableTokenEmbedding``, which looks up the frozen table and substitutes the trainable
rows for the new ids. Every other row is therefore bit-identical by construction, the
optimizer holds only ``num_vectors × width`` values, and weight decay touches nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune.config import (
    SdTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlTextualInversionConfig,
)
from kubetune.errors import UserError
from runner.checkpoint.exporters import export_embeddings
from runner.models.embeddings import read_embedding_file, token_names
from runner.models.loading import Components
from runner.pipelines.base import TrainingPipeline
from runner.training.optim import ParamGroups

TiConfigs = (
    SdTextualInversionConfig | SdxlTextualInversionConfig | SdxlLoraAndTextualInversionConfig
)
ENCODER_KEYS = ("clip_l", "clip_g")
log = logging.getLogger(__name__)


class _NewRows(nn.Module):
    """The trainable float32 rows, in a submodule of their own (see TrainableTokenEmbedding)."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(vectors.detach().float().clone())


class TrainableTokenEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose rows ``first_id .. first_id+n-1`` come from the
    trainable float32 ``vectors`` instead. The vectors sit in a submodule registered after
    the table: transformers' ``encoder.dtype`` is the first floating parameter, and it must
    stay the table's weight dtype (pipelines cast prompts and latents to it; float32 there
    broke bfloat16 validation)."""

    def __init__(self, base: nn.Embedding, first_id: int, vectors: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.rows = _NewRows(vectors)

    @property
    def vectors(self) -> nn.Parameter:
        """The trainable rows (float32)."""
        return self.rows.vectors

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (as ``nn.Embedding.weight``; the new rows hold their init)."""
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        offset = ids - self.first_id
        mask = (offset >= 0) & (offset < self.vectors.shape[0])
        new = self.vectors.to(out.dtype)[offset.clamp(0, self.vectors.shape[0] - 1)]
        return torch.where(mask.unsqueeze(-1), new, out)


def _first_token_id(tokenizer: Any, token: str) -> int:
    """The initializer's first token id; a multi-token word logs a warning (invoke-training
    does the same)."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"initializer_token {token!r} has no tokens", hint="use a word like 'cat'")
    if len(ids) > 1:
        log.warning(
            "initializer_token %r is %d tokens for the CLIP tokenizer; only the first is used "
            "(pick a single-token word such as 'cat', or use initial_phrase)",
            token,
            len(ids),
        )
    return ids[0]


def phrase_token_ids(tokenizer: Any, phrase: str) -> list[int]:
    """The token ids of ``initial_phrase``: one new vector per token (invoke-training)."""
    ids = list(tokenizer(phrase, add_special_tokens=False).input_ids)
    if not ids:
        raise UserError(f"initial_phrase {phrase!r} has no tokens", hint="use a few words")
    return ids


def vector_count(cfg: TiConfigs, tokenizer: Any) -> int:
    """How many vectors the concept gets: the phrase's token count with initial_phrase,
    else num_vectors."""
    if cfg.initial_phrase is not None:
        return len(phrase_token_ids(tokenizer, cfg.initial_phrase))
    return cfg.num_vectors


def _initial_vectors(
    cfg: TiConfigs, tokenizer: Any, table: torch.Tensor, file_vectors: torch.Tensor | None, n: int
) -> torch.Tensor:
    if file_vectors is not None:
        vectors = (
            file_vectors.reshape(-1, table.shape[1]) if file_vectors.ndim == 1 else (file_vectors)
        )
        if tuple(vectors.shape) != (n, table.shape[1]):
            raise UserError(
                f"initial_embedding_file holds shape {tuple(vectors.shape)}, need "
                f"({n}, {table.shape[1]})",
                hint="set num_vectors to match the file",
            )
        return vectors.float()
    if cfg.initializer_token is not None:
        ids = [_first_token_id(tokenizer, cfg.initializer_token.strip())] * n
    else:
        ids = phrase_token_ids(tokenizer, cfg.initial_phrase or "")
    return table[ids].detach().float().clone()


def _file_vectors(cfg: TiConfigs, is_sdxl: bool) -> list[torch.Tensor | None]:
    count = 2 if is_sdxl else 1
    if cfg.initial_embedding_file is None:
        return [None] * count
    tensors = read_embedding_file(_local_file(cfg))
    if is_sdxl:
        if set(tensors) != set(ENCODER_KEYS):
            raise UserError(f"{cfg.initial_embedding_file}: SDXL needs clip_l and clip_g")
        return [tensors["clip_l"], tensors["clip_g"]]
    return [tensors.get("", tensors.get("clip_l"))]


def _local_file(cfg: TiConfigs) -> str:
    uri = cfg.initial_embedding_file or ""
    from kubetune.storage import is_remote, open_store, split_uri

    if not is_remote(uri):
        return uri
    import tempfile

    parent, name = split_uri(uri)
    local = Path(tempfile.mkdtemp(prefix="kubetune-emb-")) / name
    open_store(parent, cfg.storage).get_file(name, local)
    return str(local)


class TextualInversionPart:
    """Adds the placeholder tokens to every tokenizer / text encoder and owns their vectors."""

    def __init__(self, cfg: TiConfigs, comps: Components) -> None:
        self.cfg = cfg
        self.num_vectors = vector_count(cfg, comps.tokenizer)
        self.names = token_names(cfg.placeholder_token, self.num_vectors)
        self.embeddings: list[TrainableTokenEmbedding] = []
        self.table_std: list[torch.Tensor] = []
        """Per encoder: std of every embedding row except the new ones (a constant)."""
        pairs = list(zip(comps.tokenizers, comps.text_encoders, strict=True))
        for (tokenizer, encoder), file_vec in zip(
            pairs, _file_vectors(cfg, comps.is_sdxl), strict=True
        ):
            self.embeddings.append(self._add(tokenizer, encoder, file_vec))

    def _add(
        self, tokenizer: Any, encoder: nn.Module, file_vec: torch.Tensor | None
    ) -> TrainableTokenEmbedding:
        taken = [n for n in self.names if n in tokenizer.get_vocab()]
        if taken:
            raise UserError(
                f"placeholder_token {taken[0]!r} is already a token",
                hint="choose a new word, e.g. <my-concept>",
            )
        table = encoder.get_input_embeddings().weight
        init = _initial_vectors(self.cfg, tokenizer, table, file_vec, self.num_vectors)
        tokenizer.add_tokens(self.names)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids = tokenizer.convert_tokens_to_ids(self.names)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise RuntimeError(f"new token ids are not contiguous: {ids}")
        base = encoder.get_input_embeddings()
        with torch.no_grad():
            base.weight[ids] = init.to(base.weight.dtype)
        keep = torch.ones(base.weight.shape[0], dtype=torch.bool)
        keep[ids] = False
        self.table_std.append(base.weight.detach()[keep.to(base.weight.device)].float().std())
        wrapper = TrainableTokenEmbedding(base, ids[0], init).to(base.weight.device)
        encoder.set_input_embeddings(wrapper)
        return wrapper

    def parameters(self) -> dict[str, nn.Parameter]:
        return {
            f"ti.{key}": emb.vectors
            for key, emb in zip(ENCODER_KEYS, self.embeddings, strict=False)
        }

    def param_groups(self, lr: float) -> ParamGroups:
        """One group per text encoder, as invoke-training (``ti_embeddings`` for SD,
        ``ti_embeddings_1`` / ``ti_embeddings_2`` for SDXL)."""
        if len(self.embeddings) == 1:
            return [{"params": [self.embeddings[0].vectors], "lr": lr, "name": "ti_embeddings"}]
        return [
            {"params": [e.vectors], "lr": lr, "name": f"ti_embeddings_{i}"}
            for i, e in enumerate(self.embeddings, start=1)
        ]

    @torch.no_grad()
    def pull_towards_table_std(self) -> None:
        """After each optimizer step, scale the new vectors by (std of the frozen table / std
        of the new vectors) ** 0.1, as invoke-training's ``restore_original_embeddings``
        does: keeps the new embeddings' spread near the vocabulary's."""
        for emb, target in zip(self.embeddings, self.table_std, strict=True):
            emb.vectors.mul_((target / emb.vectors.std()) ** 0.1)

    def set_trainable(self, trainable: bool) -> None:
        for emb in self.embeddings:
            emb.vectors.requires_grad_(trainable)
            if not trainable:
                emb.vectors.grad = None

    def export(self, out_dir: Path) -> list[Path]:
        vectors = [e.vectors for e in self.embeddings]
        return [export_embeddings(out_dir, self.cfg.placeholder_token, vectors)]


class TextualInversionPipeline(TrainingPipeline):
    """SD_TEXTUAL_INVERSION and SDXL_TEXTUAL_INVERSION."""

    def __init__(
        self,
        cfg: SdTextualInversionConfig | SdxlTextualInversionConfig,
        comps: Components,
        device: torch.device,
    ) -> None:
        super().__init__(cfg, comps, device)
        self.ti = TextualInversionPart(cfg, comps)
        self.ti.set_trainable(True)
        self.train_text_encoders = True  # gradients flow through the frozen encoders

    def param_groups(self) -> ParamGroups:
        return self.ti.param_groups(self.cfg.optimizer.learning_rate)

    def after_optimizer_step(self) -> None:
        """Normalise the vectors, then update the EMA (of the normalised vectors)."""
        self.ti.pull_towards_table_std()
        super().after_optimizer_step()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self.ti.parameters()

    def trained_modules(self) -> list[nn.Module]:
        return list(self.ti.embeddings)

    def export(self, out_dir: Path) -> list[Path]:
        return self.ti.export(out_dir)
