"""Every training type kubetune accepts, in one list: the discriminated union over `type`.

A new training type is a config class (beside its siblings in this package) plus one entry
here; the loader, the schema, `launcher init` and the UI's tabs all read this list.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from kubetune.config.flux import FluxLoraConfig
from kubetune.config.pipelines import (
    SdLoraConfig,
    SdTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlLoraConfig,
    SdxlTextualInversionConfig,
)
from kubetune.config.sdxl_finetune import SdxlFinetuneConfig

PIPELINE_CLASSES = (
    SdLoraConfig,
    SdxlLoraConfig,
    SdTextualInversionConfig,
    SdxlTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlFinetuneConfig,
    FluxLoraConfig,
)
PIPELINE_TYPES = tuple(cls.model_fields["type"].default for cls in PIPELINE_CLASSES)
PipelineConfig = (
    SdLoraConfig
    | SdxlLoraConfig
    | SdTextualInversionConfig
    | SdxlTextualInversionConfig
    | SdxlLoraAndTextualInversionConfig
    | SdxlFinetuneConfig
    | FluxLoraConfig
)
TrainConfig = Annotated[PipelineConfig, Field(discriminator="type")]
