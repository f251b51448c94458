"""Safety-checker image preprocessing (CLIPImageProcessor as SD's feature_extractor), numpy + PIL."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.models.safety_checker import _positive_int

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """transformers' ``CLIPImageProcessor`` settings; defaults: SD v1.x's ``feature_extractor``.

    ``shortest_edge`` resizes keeping the aspect ratio (the long side truncated
    to int); ``resize_to`` (height, width) resizes to a fixed size instead.
    """

    do_resize: bool = True
    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None
    resample: int = 3  # PIL.Image.Resampling: 3 is BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.do_resize and (self.shortest_edge is None) == (self.resize_to is None):
            raise ValueError(f"ImageProcessorConfig needs exactly one of shortest_edge "
                             f"({self.shortest_edge!r}) and resize_to ({self.resize_to!r})")
        if self.shortest_edge is not None:
            _positive_int("ImageProcessorConfig", "shortest_edge", self.shortest_edge)
        for name in ("resize_to", "crop_size"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
                raise ValueError(f"ImageProcessorConfig.{name} must be (height, width) positive "
                                 f"ints, got {value!r}")
        if self.resample not in _PIL_FILTERS:
            raise ValueError(f"ImageProcessorConfig.resample {self.resample!r} is not a PIL filter; "
                             f"expected one of {_PIL_FILTERS}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"ImageProcessorConfig.{name} needs 3 values (RGB), "
                                 f"got {getattr(self, name)!r}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"ImageProcessorConfig.image_std has a zero: {self.image_std!r}")

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "ImageProcessorConfig":
        """From a ``preprocessor_config.json`` dict (``CLIPImageProcessor`` / ``CLIPFeatureExtractor``).

        Legacy integer ``size`` means the shortest edge and integer ``crop_size``
        a square, as transformers reads them; missing keys take its defaults.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a preprocessor_config.json dict, got {type(config).__name__}")
        size = config.get("size", {"shortest_edge": 224})
        shortest, resize_to = None, None
        if isinstance(size, int) and not isinstance(size, bool):
            shortest = size
        elif isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
            shortest = size["shortest_edge"]
        elif isinstance(size, Mapping) and set(size) == {"height", "width"}:
            resize_to = (size["height"], size["width"])
        else:
            raise ValueError(f"preprocessor size {size!r} is not supported; expected an int, "
                             f"{{'shortest_edge': n}} or {{'height': h, 'width': w}}")
        crop = config.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int) and not isinstance(crop, bool):
            crop = {"height": crop, "width": crop}
        if not (isinstance(crop, Mapping) and set(crop) == {"height", "width"}):
            raise ValueError(f"preprocessor crop_size {crop!r} is not supported; expected an int or "
                             f"{{'height': h, 'width': w}}")
        return cls(do_resize=bool(config.get("do_resize", True)), shortest_edge=shortest,
                   resize_to=resize_to, resample=int(config.get("resample", 3)),
                   do_center_crop=bool(config.get("do_center_crop", True)),
                   crop_size=(crop["height"], crop["width"]),
                   do_rescale=bool(config.get("do_rescale", True)),
                   rescale_factor=float(config.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(config.get("do_normalize", True)),
                   image_mean=tuple(float(v) for v in config.get("image_mean", CLIP_MEAN)),
                   image_std=tuple(float(v) for v in config.get("image_std", CLIP_STD)))


def read_preprocessor_config(folder: str | Path) -> ImageProcessorConfig:
    """``folder/feature_extractor/preprocessor_config.json`` (or ``folder/preprocessor_config.json``)
    if present, else the SD v1.x defaults."""
    folder = Path(folder)
    for path in (folder / "feature_extractor" / "preprocessor_config.json",
                 folder / "preprocessor_config.json"):
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
            return ImageProcessorConfig.from_transformers(config)
    return ImageProcessorConfig()


def _resize_size(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: (height, width)."""
    if config.resize_to is not None:
        return config.resize_to
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(image_hwc: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' ``center_crop``: top-left offset floored; zero-padded if the image is smaller."""
    height, width = image_hwc.shape[:2]
    crop_h, crop_w = size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return image_hwc[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + image_hwc.shape[2:], image_hwc.dtype)
    pad_top, pad_left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
    padded[pad_top:pad_top + height, pad_left:pad_left + width] = image_hwc
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2  # transformers' offsets after padding
    return padded[top:top + crop_h, left:left + crop_w]


def preprocess(images: Any, config: ImageProcessorConfig | None = None) -> np.ndarray:
    """uint8 RGB images (B, H, W, 3) -> CLIP pixel values (B, 224, 224, 3) float32, channels-last.

    Bit-for-bit transformers' PIL ``CLIPImageProcessor`` (transformers < 5, and
    5 without torchvision; with torchvision, transformers 5 resizes with torch's
    antialiased bicubic instead, which is not bit-identical to PIL's): PIL resize
    of the uint8 image, centre crop, float64 rescale cast to float32, float32
    normalisation. Float images in [0, 1]
    must first become uint8 as diffusers' ``numpy_to_pil`` does:
    ``(x * 255).round().astype(np.uint8)``.
    """
    from PIL import Image  # only the preprocessing needs Pillow

    config = config or ImageProcessorConfig()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"preprocess expects uint8 RGB images (batch, height, width, 3); got "
                         f"{images.dtype} {images.shape} (floats in [0, 1]: "
                         f"(x * 255).round().astype(np.uint8))")
    resample = getattr(Image.Resampling, _PIL_FILTERS[config.resample])
    mean, std = np.asarray(config.image_mean, np.float32), np.asarray(config.image_std, np.float32)
    out = []
    for image in images:  # (H, W, 3) uint8
        if config.do_resize:
            height, width = _resize_size(*image.shape[:2], config)
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
                (width, height), resample=resample))
        if config.do_center_crop:
            image = _center_crop(image, config.crop_size)
        if config.do_rescale:
            image = (image.astype(np.float64) * config.rescale_factor).astype(np.float32)
        else:
            image = image.astype(np.float32)
        if config.do_normalize:
            image = (image - mean) / std
        out.append(image)
    if len({im.shape for im in out}) > 1:
        raise ValueError(f"preprocessed images differ in shape {sorted({im.shape for im in out})}; "
                         f"enable do_resize/do_center_crop")
    return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------- the checker


@dataclasses.dataclass
class SafetyCheck:
    """A loaded safety checker: module, float32 parameters and preprocessing settings."""

    module: Any
    params: Any
    processor: ImageProcessorConfig

    def __call__(self, images_01: np.ndarray) -> tuple[list[bool], Any]:
        """(B, H, W, 3) floats in [0, 1] -> (has_nsfw per image, scores). Images are not changed."""
        from sd_jax.models.safety_checker import check_images

        uint8 = (np.asarray(images_01, np.float32) * 255).round().clip(0, 255).astype(np.uint8)
        return check_images(self.module, self.params, preprocess(uint8, self.processor))


def load_safety_checker(checker_dir: Path, feature_extractor_dir: Path | None = None) -> SafetyCheck:
    """Read a model folder's ``safety_checker/`` (and ``feature_extractor/``) strictly."""
    import jax

    from sd_jax.convert.diffusers import read_component_state, read_json
    from sd_jax.convert.safety_checker import safety_checker_state_to_params
    from sd_jax.models.safety_checker import SafetyChecker, SafetyCheckerConfig, abstract_params

    config_file = checker_dir / "config.json"
    try:
        config = SafetyCheckerConfig.from_transformers(read_json(config_file))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_file}: {err}") from None
    module = SafetyChecker(config)
    params, _ = safety_checker_state_to_params(read_component_state(checker_dir, "safety_checker"),
                                               abstract_params(module))
    processor = (read_preprocessor_config(feature_extractor_dir) if feature_extractor_dir is not None
                 else ImageProcessorConfig())
    return SafetyCheck(module=module, params=jax.device_put(params), processor=processor)
