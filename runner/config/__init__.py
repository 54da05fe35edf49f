"""The one config schema shared by the launcher and the runner (pydantic + pyyaml only)."""

from runner.config.cluster import CredentialsSecretRef, JobConfig, StorageConfig, sanitize_name
from runner.config.data import (
    AspectRatioBucketConfig,
    HFHubImageCaptionDatasetConfig,
    ImageCaptionDirDatasetConfig,
    ImageCaptionJsonlDatasetConfig,
    ImageCaptionSDDataLoaderConfig,
    ImageDirDatasetConfig,
    TextualInversionSDDataLoaderConfig,
)
from runner.config.loader import (
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
from runner.config.pipelines import (
    PIPELINE_CLASSES,
    PIPELINE_TYPES,
    AdamOptimizerConfig,
    PipelineConfig,
    ProdigyOptimizerConfig,
    SdLoraConfig,
    SdTextualInversionConfig,
    SdxlLoraAndTextualInversionConfig,
    SdxlLoraConfig,
    SdxlTextualInversionConfig,
    TrainConfig,
    is_sdxl,
    trains_lora,
    trains_ti,
)

__all__ = [
    "PIPELINE_CLASSES", "PIPELINE_TYPES", "AdamOptimizerConfig", "AspectRatioBucketConfig",
    "CredentialsSecretRef", "HFHubImageCaptionDatasetConfig", "ImageCaptionDirDatasetConfig",
    "ImageCaptionJsonlDatasetConfig", "ImageCaptionSDDataLoaderConfig", "ImageDirDatasetConfig",
    "JobConfig", "PipelineConfig", "ProdigyOptimizerConfig", "SdLoraConfig",
    "SdTextualInversionConfig", "SdxlLoraAndTextualInversionConfig", "SdxlLoraConfig",
    "SdxlTextualInversionConfig", "StorageConfig", "TextualInversionSDDataLoaderConfig",
    "TrainConfig", "apply_overrides", "config_hash", "config_to_dict", "config_to_yaml",
    "is_sdxl", "json_schema", "load_config", "output_uri", "parse_config", "run_name",
    "sanitize_name", "trains_lora", "trains_ti",
]
