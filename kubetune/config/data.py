"""Dataset and data-loader sections (invoke-training field names)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from kubetune.config.base import ConfigModel, FieldProblems, Problems

Resolution = int | tuple[int, int]


class HFHubImageCaptionDatasetConfig(ConfigModel):
    """A dataset from the Hugging Face Hub (or saved locally with `datasets`)."""

    type: Literal["HF_HUB_IMAGE_CAPTION_DATASET"] = "HF_HUB_IMAGE_CAPTION_DATASET"
    dataset_name: str
    """Hub name (e.g. `lambdalabs/pokemon-blip-captions`) or a local `save_to_disk` directory."""
    dataset_config_name: str | None = None
    """The dataset configuration name, for datasets that have several."""
    hf_cache_dir: str | None = None
    """Where `datasets` caches downloads. Default: the `datasets` default cache."""
    image_column: str = "image"
    """The column holding the images."""
    caption_column: str = "text"
    """The column holding the captions."""


class ImageCaptionJsonlDatasetConfig(ConfigModel):
    """A JSONL file: one object per line with an image path and a caption."""

    type: Literal["IMAGE_CAPTION_JSONL_DATASET"] = "IMAGE_CAPTION_JSONL_DATASET"
    jsonl_path: str
    """Local path or `s3://bucket/key` of the .jsonl file; image paths are relative to it."""
    image_column: str = "image"
    """The key holding the image path (relative, absolute, or an s3:// URI)."""
    caption_column: str = "text"
    """The key holding the caption."""
    keep_in_memory: bool = False
    """Keep decoded images in memory after the first read (faster epochs, more RAM); kubetune
    keeps them resized to their bucket's scale, within half the container's memory."""


class ImageCaptionDirDatasetConfig(ConfigModel):
    """A folder of images, each with a same-named `.txt` caption file."""

    type: Literal["IMAGE_CAPTION_DIR_DATASET"] = "IMAGE_CAPTION_DIR_DATASET"
    dataset_dir: str
    """Local folder or `s3://bucket/prefix`."""
    keep_in_memory: bool = False
    """Keep decoded images in memory after the first read (faster epochs, more RAM); kubetune
    keeps them resized to their bucket's scale, within half the container's memory."""


class ImageDirDatasetConfig(ConfigModel):
    """A folder of images without captions (captions come from presets / templates)."""

    type: Literal["IMAGE_DIR_DATASET"] = "IMAGE_DIR_DATASET"
    dataset_dir: str
    """Local folder or `s3://bucket/prefix`."""
    keep_in_memory: bool = False
    """Keep decoded images in memory after the first read (faster epochs, more RAM); kubetune
    keeps them resized to their bucket's scale, within half the container's memory."""


ImageCaptionDatasetConfig = Annotated[
    HFHubImageCaptionDatasetConfig | ImageCaptionJsonlDatasetConfig | ImageCaptionDirDatasetConfig,
    Field(discriminator="type"),
]
AnyDatasetConfig = Annotated[
    HFHubImageCaptionDatasetConfig
    | ImageCaptionJsonlDatasetConfig
    | ImageCaptionDirDatasetConfig
    | ImageDirDatasetConfig,
    Field(discriminator="type"),
]


class AspectRatioBucketConfig(ConfigModel):
    """Aspect-ratio buckets, built as invoke-training does: for each height from start_dim to
    end_dim in steps of divisible_by, the width closest to (not above) target_resolution²
    pixels, rounded down to divisible_by; and the transposed pair."""

    target_resolution: int = Field(gt=0)
    """Side of the square whose area every bucket approximates (e.g. 512 or 1024)."""
    start_dim: int = Field(gt=0)
    """First bucket side (may exceed target_resolution, as in invoke-training)."""
    end_dim: int = Field(gt=0)
    """Last bucket side."""
    divisible_by: int = Field(gt=0)
    """Every bucket side is a multiple of this (any positive value, as in invoke-training;
    the VAE and UNet accept sides that are not multiples of 8)."""
    order: Literal["invoke", "streaming"] = "invoke"
    """How batches are drawn from the buckets (kubetune extension). `invoke` (default):
    invoke-training's order: every image's size is read first, then each bucket is shuffled
    and cut into batches and the batches are shuffled; step 1 waits for all the image headers
    (100,000 images on object storage: about a minute). `streaming`: the images are taken
    in a seeded shuffled order and a bucket yields a batch each time it has filled one (its
    partial batches end the epoch), so step 1 needs only the first few hundred sizes while
    the other headers are read beside training. Same buckets, each image once per epoch,
    seeded and resumable; a different order than `invoke`. Not with `keep_in_memory` or
    DreamBooth."""

    @model_validator(mode="after")
    def _check(self) -> AspectRatioBucketConfig:
        # invoke-training asserts exactly these when it builds the buckets.
        p = Problems()
        step = self.divisible_by
        for name in ("target_resolution", "start_dim", "end_dim"):
            value = getattr(self, name)
            p.check(
                value % step == 0,
                name,
                f"must be a multiple of divisible_by ({step}) (got {value}; "
                f"try {max(step, round(value / step) * step)})",
            )
        p.check(
            self.start_dim <= self.end_dim,
            "start_dim",
            f"need start_dim <= end_dim (got {self.start_dim} > {self.end_dim})",
        )
        p.raise_if_any()
        return self


def _check_resolution(resolution: Resolution) -> Resolution:
    sides = (resolution,) if isinstance(resolution, int) else resolution
    for side in sides:
        if side <= 0:
            raise ValueError(f"must be positive (got {side}; e.g. 512)")
    return resolution


class _LoaderCommon(ConfigModel):
    aspect_ratio_buckets: AspectRatioBucketConfig | None = None
    """Enable aspect-ratio bucketing instead of a single square/fixed resolution."""
    resolution: Resolution = 512
    """Training resolution: an int (square) or [height, width]. Sides that are not multiples
    of 8 train as in invoke-training; validation images use the side rounded down to 8."""
    center_crop: bool = True
    """Crop the centre of each resized image; false crops at a random position."""
    random_flip: bool = False
    """Flip images horizontally at random."""
    dataloader_num_workers: int = Field(default=0, ge=0)
    """Worker processes for the torch DataLoader (0 loads in the main process)."""
    max_bad_image_share: float = Field(default=0.0, ge=0.0, le=1.0)
    """kubetune extension: the share (0-1) of examples that may turn out unreadable during
    training. Each is skipped with a warning naming it and counted in progress.json; one more
    stops the run with exit 2 and the list. Default 0: the first unreadable image stops the
    run, as in invoke-training."""

    _resolution = field_validator("resolution")(staticmethod(_check_resolution))

    @model_validator(mode="after")
    def _streaming_rules(self) -> _LoaderCommon:
        buckets = self.aspect_ratio_buckets
        if buckets is None or buckets.order != "streaming":
            return self
        p = Problems()
        datasets = [getattr(self, name, None) for name in ("dataset", "instance_dataset")]
        p.check(
            getattr(self, "type", "") != "DREAMBOOTH_SD_DATA_LOADER",
            "aspect_ratio_buckets.order",
            "streaming is not available for DreamBooth (its sampler pairs instance and class "
            "images from every size): remove it or set it to invoke",
        )
        p.check(
            not any(getattr(d, "keep_in_memory", False) for d in datasets),
            "aspect_ratio_buckets.order",
            "streaming cannot keep images in memory (slots are sized from every image "
            "first): set dataset.keep_in_memory to false or order to invoke",
        )
        p.raise_if_any()
        return self


class ImageCaptionSDDataLoaderConfig(_LoaderCommon):
    """Image/caption pairs for LoRA training."""

    type: Literal["IMAGE_CAPTION_SD_DATA_LOADER"] = "IMAGE_CAPTION_SD_DATA_LOADER"
    dataset: ImageCaptionDatasetConfig
    """Where the images and captions come from."""
    caption_prefix: str | None = None
    """Text prepended to every caption (e.g. a trigger word), separated by a space."""
    caption_dropout_rate: float = Field(default=0.0, ge=0, lt=1)
    """Train on the empty caption instead of the image's caption with this probability
    (kubetune extension; kohya `caption_dropout_rate`). Seeded per image and epoch, so a
    resumed run drops the same captions. 0 (default) disables it."""


class ImageCaptionFluxDataLoaderConfig(ImageCaptionSDDataLoaderConfig):
    """Image/caption pairs for FLUX_LORA (invoke-training's IMAGE_CAPTION_FLUX_DATA_LOADER:
    the same fields as the SD image/caption loader)."""

    type: Literal["IMAGE_CAPTION_FLUX_DATA_LOADER"] = "IMAGE_CAPTION_FLUX_DATA_LOADER"  # type: ignore[assignment]


class TextualInversionSDDataLoaderConfig(_LoaderCommon):
    """Images captioned from templates containing the placeholder token (TI, LoRA+TI)."""

    type: Literal["TEXTUAL_INVERSION_SD_DATA_LOADER"] = "TEXTUAL_INVERSION_SD_DATA_LOADER"
    dataset: AnyDatasetConfig
    """Where the images (and optional captions) come from."""
    caption_preset: Literal["object", "style"] | None = None
    """Built-in templates: `object` ("a photo of a {}") or `style` ("a painting in the style
    of {}")."""
    caption_templates: list[str] | None = None
    """Your own templates; each must contain `{}` where the placeholder goes."""
    keep_original_captions: bool = False
    """Keep dataset captions and add the template around them instead of replacing them."""
    shuffle_caption_delimiter: str | None = None
    """Split captions on this delimiter (e.g. ",") and shuffle the parts each time."""

    @model_validator(mode="before")
    @classmethod
    def _no_caption_dropout(cls, data: Any) -> Any:
        if isinstance(data, dict) and "caption_dropout_rate" in data:
            raise FieldProblems(
                [
                    (
                        "caption_dropout_rate",
                        "textual inversion captions carry the placeholder token being trained; "
                        "an empty caption would not train it: remove caption_dropout_rate",
                    )
                ]
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> TextualInversionSDDataLoaderConfig:
        p = Problems()
        if self.caption_preset is not None and self.caption_templates is not None:
            p.add(
                "caption_templates",
                "caption_preset and caption_templates are exclusive: remove one of them",
            )
        elif self.caption_preset is None and self.caption_templates is None:
            p.add("caption_preset", "set caption_preset (object | style) or caption_templates")
        if self.caption_templates is not None:
            if not self.caption_templates:
                p.add("caption_templates", "must not be empty (e.g. ['a photo of {}'])")
            for i, template in enumerate(self.caption_templates):
                if "{}" not in template:
                    p.add(
                        f"caption_templates.{i}",
                        f"template {template!r} must contain '{{}}' where the token goes",
                    )
        if self.keep_original_captions and self.dataset.type == "IMAGE_DIR_DATASET":
            p.add(
                "keep_original_captions",
                "IMAGE_DIR_DATASET has no captions to keep: set it to false or use a "
                "captioned dataset type",
            )
        if self.shuffle_caption_delimiter == "":
            p.add("shuffle_caption_delimiter", "must not be empty (e.g. ',')")
        p.raise_if_any()
        return self


class DreamboothSDDataLoaderConfig(_LoaderCommon):
    """DreamBooth: images of your subject (instance) and, for prior preservation, images of
    its class, each set with one fixed caption; instance and class examples are drawn in
    equal numbers (LoRA types only)."""

    type: Literal["DREAMBOOTH_SD_DATA_LOADER"] = "DREAMBOOTH_SD_DATA_LOADER"
    instance_caption: str
    """The caption of every instance image, e.g. "a photo of sks dog"."""
    class_caption: str | None = None
    """The caption of every class image, e.g. "a photo of a dog" (needed with class_dataset)."""
    instance_dataset: ImageDirDatasetConfig
    """The folder of instance images (local or `s3://`)."""
    class_dataset: ImageDirDatasetConfig | None = None
    """The folder of class images for prior preservation (None: instance images only)."""
    class_data_loss_weight: float = 1.0
    """The loss weight of class examples; instance examples weigh 1.0."""
    caption_dropout_rate: float = Field(default=0.0, ge=0, lt=1)
    """Train on the empty caption instead of the instance / class caption with this
    probability (kubetune extension; kohya `caption_dropout_rate`), seeded per image and
    epoch. 0 (default) disables it."""

    @model_validator(mode="after")
    def _check(self) -> DreamboothSDDataLoaderConfig:
        p = Problems()
        p.check(
            self.class_dataset is None or self.class_caption is not None,
            "class_caption",
            "class_dataset needs a class_caption (e.g. 'a photo of a dog'), or remove "
            "class_dataset",
        )
        p.raise_if_any()
        return self


_IMAGE_CAPTION = "IMAGE_CAPTION_SD_DATA_LOADER"


def _lora_loader_tag(value: Any) -> str:
    """The loader's `type`; a mapping without one is an image/caption loader (kubetune has
    always accepted that; invoke-training requires the key)."""
    if isinstance(value, dict):
        return str(value.get("type", _IMAGE_CAPTION))
    return str(getattr(value, "type", _IMAGE_CAPTION))


LoraDataLoaderConfig = Annotated[
    Annotated[ImageCaptionSDDataLoaderConfig, Tag(_IMAGE_CAPTION)]
    | Annotated[DreamboothSDDataLoaderConfig, Tag("DREAMBOOTH_SD_DATA_LOADER")],
    Discriminator(_lora_loader_tag),
]
