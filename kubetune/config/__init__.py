"""The one config schema shared by the launcher and the runner (pydantic + pyyaml only)."""

from kubetune.config.cluster import CredentialsSecretRef, JobConfig, StorageConfig, sanitize_name
from kubetune.config.data import (
    AspectRatioBucketConfig,
    DreamboothSDDataLoaderConfig,
    HFHubImageCaptionDatasetConfig,
    ImageCaptionDirDatasetConfig,
    ImageCaptionFluxDataLoaderConfig,
    ImageCaptionJsonlDatasetConfig,
    ImageCaptionSDDataLoaderConfig,
    ImageDirDatasetConfig,
    TextualInversionSDDataLoaderConfig,
)
from kubetune.config.flux import FluxLoraConfig
from kubetune.config.loader import (
    apply_overrides,
    config_hash,
    config_to_dict,
    config_to_yaml,
    json_schema,
    load_config,
    output_uri,
    parse_config,
    run_name,
)
from kubetune.config.pipelines import (
    AdamOptimizerConfig,
    ProdigyOptimizerConfig,
    SdLoraConfig,
    SdTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlLoraConfig,
    SdxlTextualInversionConfig,
)
from kubetune.config.sdxl_finetune import SdxlFinetuneConfig
from kubetune.config.training_types import (
    PIPELINE_CLASSES,
    PIPELINE_TYPES,
    PipelineConfig,
    TrainConfig,
)

__all__ = [
    "PIPELINE_CLASSES",
    "PIPELINE_TYPES",
    "AdamOptimizerConfig",
    "AspectRatioBucketConfig",
    "DreamboothSDDataLoaderConfig",
    "FluxLoraConfig",
    "CredentialsSecretRef",
    "HFHubImageCaptionDatasetConfig",
    "ImageCaptionDirDatasetConfig",
    "ImageCaptionFluxDataLoaderConfig",
    "ImageCaptionJsonlDatasetConfig",
    "ImageCaptionSDDataLoaderConfig",
    "ImageDirDatasetConfig",
    "JobConfig",
    "PipelineConfig",
    "ProdigyOptimizerConfig",
    "SdLoraConfig",
    "SdTextualInversionConfig",
    "SdxlFinetuneConfig",
    "SdxlLoraAndTextualInversionConfig",
    "SdxlLoraConfig",
    "SdxlTextualInversionConfig",
    "StorageConfig",
    "TextualInversionSDDataLoaderConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "config_to_dict",
    "config_to_yaml",
    "json_schema",
    "load_config",
    "output_uri",
    "parse_config",
    "run_name",
    "sanitize_name",
]
