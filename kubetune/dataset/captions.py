"""Final captions: prefix (LoRA), templates around the placeholder (TI), shuffling."""

from __future__ import annotations

import random

from kubetune.config.data import ImageCaptionSDDataLoaderConfig, TextualInversionSDDataLoaderConfig
from kubetune.errors import DataError

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
    "a photo in the style of {}",
    "an image in the style of {}",
    "a drawing in the style of {}",
    "a sketch in the style of {}",
    "a digital work in the style of {}",
    "a digital rendering in the style of {}",
    "a photograph in the style of {}",
    "photography in the style of {}",
]
PRESETS = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

LoaderConfig = ImageCaptionSDDataLoaderConfig | TextualInversionSDDataLoaderConfig


class CaptionBuilder:
    """Turns a dataset caption (or None) into the final training caption.

    LoRA loaders prepend `caption_prefix`. TI loaders fill a template's `{}` with
    `placeholder_text` (the placeholder token; multi-vector expansion happens when the
    caption is tokenized); with
    `keep_original_captions` the filled template is followed by the original caption
    (invoke-training's format). `shuffle_caption_delimiter` then shuffles the parts.
    All randomness comes from the `rng` passed to `build`, so a seed fixes the result.
    """

    def __init__(self, loader: LoaderConfig, placeholder_text: str | None = None) -> None:
        self.prefix: str | None = None
        self.templates: list[str] | None = None
        self.keep_original = False
        self.delimiter: str | None = None
        self.placeholder = placeholder_text
        if isinstance(loader, TextualInversionSDDataLoaderConfig):
            if placeholder_text is None:
                raise ValueError("TI data loaders need placeholder_text (the token string)")
            preset = loader.caption_preset
            self.templates = list(PRESETS[preset] if preset else loader.caption_templates or [])
            self.keep_original = loader.keep_original_captions
            self.delimiter = loader.shuffle_caption_delimiter
        else:
            self.prefix = loader.caption_prefix

    @property
    def needs_captions(self) -> bool:
        """Whether the dataset's own captions are used."""
        return self.templates is None or self.keep_original

    def build(self, caption: str | None, rng: random.Random, example_id: str = "") -> str:
        """The final caption for one draw of an example."""
        if self.templates is None:
            if caption is None:
                raise DataError(f"{example_id}: no caption", hint="add a caption for this image")
            text = f"{self.prefix} {caption}" if self.prefix else caption
        else:
            template = self.templates[rng.randrange(len(self.templates))]
            text = template.replace("{}", self.placeholder or "")
            if self.keep_original and caption:
                text = f"{text} {caption}"
        if self.delimiter:
            parts = [p.strip() for p in text.split(self.delimiter)]
            rng.shuffle(parts)
            joiner = self.delimiter if self.delimiter.strip() == "" else f"{self.delimiter} "
            text = joiner.join(p for p in parts if p)
        return text


def needs_captions(loader: LoaderConfig) -> bool:
    """Whether the dataset's own captions are read."""
    if isinstance(loader, TextualInversionSDDataLoaderConfig):
        return loader.keep_original_captions
    return True
