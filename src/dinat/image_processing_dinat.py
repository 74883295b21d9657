"""DinatImageProcessor: images (PIL, numpy, torch, file paths) -> normalized (B, 3, H, W) float32 pixel values.

Pure pillow + numpy. It reads both forms of `preprocessor_config.json` found on the hub: the legacy
`ViTFeatureExtractor` form the DiNAT checkpoints carry (int `size`, `resample` 2/3) and the current form
(`size` as {"height", "width"} or {"shortest_edge"}, `do_rescale`, `rescale_factor`, `crop_size`, `crop_pct`).
With the defaults it reproduces transformers' `ViTImageProcessor` (PIL path): RGB -> PIL resize -> x/255 ->
(x - mean) / std. Setting `crop_pct` gives the original repository's evaluation transform instead: resize the
shorter side to floor(size / crop_pct), then center crop to `size`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

from . import atomic
from .config_validation import ConfigFileError, read_json_object
from .hub import clear_loading_errors
from .registry import DEFAULT_PRETRAINED_CFG, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PretrainedCfg, get_variant

ImageLike = Union[Image.Image, np.ndarray, "torch.Tensor", str, os.PathLike]  # noqa: F821

# PIL modes whose RGB conversion PIL does itself; the high-bit-depth modes are rescaled to 8 bits first.
_PIL_RGB_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "La"}
_RESAMPLE_NAMES = {r.name.lower(): r for r in Image.Resampling}

# Bounds on what a setting or an odd image can ask for (one float32 RGB image at the bound is 0.8 GB).
MAX_SIZE = 8192  # any side given in size / crop_size
MAX_RESIZE_PIXELS = MAX_SIZE * MAX_SIZE  # the image after resizing (e.g. a 60000x1 strip to shortest_edge 224)
_EXIF_ORIENTATION = 0x0112


class DinatImagesKwargs(TypedDict, total=False):
    """The settings a DinatImageProcessor reads from `preprocessor_config.json` or accepts per call."""

    do_convert_rgb: bool
    do_resize: bool
    size: dict
    resample: int
    do_center_crop: bool
    crop_size: dict
    crop_pct: float
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: list
    image_std: list


class DinatImageProcessor(BaseImageProcessor):
    r"""Preprocess images for DiNAT: RGB, resize, rescale, normalize, channels-first float32, batch.

    Args:
        do_resize: resize to `size` (default True).
        size: {"height": h, "width": w}, {"shortest_edge": s} (keeps the aspect ratio) or an int n (n x n, the
            legacy form). Default 224 x 224.
        resample: PIL filter, an int (2 bilinear, 3 bicubic, ...) or its name. Default bilinear, as ViT.
        do_center_crop / crop_size: after resizing, center crop to `crop_size` ({"height", "width"} or int).
        crop_pct: the paper's evaluation transform: resize the shorter side to floor(size / crop_pct), then
            center crop to `size` (e.g. 0.875: 256 -> 224). When set, it replaces the plain resize and crop.
        do_rescale / rescale_factor: multiply 8-bit values by `rescale_factor` (1/255). Float inputs are taken
            to be in [0, 1] already and are not rescaled.
        do_normalize / image_mean / image_std: (x - mean) / std per channel (ImageNet statistics by default).
        do_convert_rgb: convert every input to 3-channel RGB first (default True).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = DinatImagesKwargs

    def __init__(
        self,
        do_resize: bool = True,
        size: int | dict[str, int] | None = None,
        resample: int | str | Image.Resampling = Image.Resampling.BILINEAR,
        do_center_crop: bool = False,
        crop_size: int | dict[str, int] | None = None,
        crop_pct: float | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        # keys of other processors' configs (e.g. "feature_extractor_type", "image_processor_type") are dropped
        super().__init__()
        self.do_resize = _flag(do_resize, "do_resize")
        self.size = _size_dict(224 if size is None else size, "size")
        self.resample = _resample(resample)
        self.do_center_crop = _flag(do_center_crop, "do_center_crop")
        self.crop_size = None if crop_size is None else _size_dict(crop_size, "crop_size")
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("DinatImageProcessor: do_center_crop=True needs crop_size")
        if crop_pct is not None and not 0.0 < _number(crop_pct, "crop_pct") <= 1.0:
            raise ValueError(f"DinatImageProcessor: crop_pct must be in (0, 1], got {crop_pct!r}")
        self.crop_pct = None if crop_pct is None else float(crop_pct)
        if self.crop_pct is not None and "height" not in self.size:
            raise ValueError("DinatImageProcessor: crop_pct needs a fixed output size ({'height', 'width'} or int)")
        self.do_rescale = _flag(do_rescale, "do_rescale")
        self.rescale_factor = _number(rescale_factor, "rescale_factor")
        if not self.rescale_factor > 0:
            raise ValueError(f"DinatImageProcessor: rescale_factor must be positive, got {rescale_factor!r}")
        self.do_normalize = _flag(do_normalize, "do_normalize")
        self.image_mean = _per_channel(IMAGENET_DEFAULT_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = _per_channel(IMAGENET_DEFAULT_STD if image_std is None else image_std, "image_std")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"DinatImageProcessor: image_std must be non-zero, got {self.image_std}")
        self.do_convert_rgb = _flag(do_convert_rgb, "do_convert_rgb")

    # -- configuration ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The current `preprocessor_config.json` form (also readable by transformers' ViTImageProcessor)."""
        output = {
            "image_processor_type": type(self).__name__,
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": int(self.resample),
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        if self.crop_size is not None:
            output["crop_size"] = dict(self.crop_size)
        if self.crop_pct is not None:
            output["crop_pct"] = self.crop_pct
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args,
                        **kwargs) -> "DinatImageProcessor":
        """Load `preprocessor_config.json` from a folder, a JSON file or a hub id (cached copies work offline)."""
        with clear_loading_errors(pretrained_model_name_or_path, "image processor"):
            # a file that is there but corrupt is reported as corrupt (transformers would say "missing")
            for path in _local_processor_files(pretrained_model_name_or_path, kwargs):
                read_json_object(path, os.path.basename(path))
            try:
                return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            except (ConfigFileError, json.JSONDecodeError):
                raise
            except ValueError as err:
                raise ValueError(f"{pretrained_model_name_or_path}: invalid preprocessor_config.json: {err}") from None

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> "DinatImageProcessor":
        settings = read_json_object(json_file, os.path.basename(json_file))
        try:
            return cls(**settings)
        except ValueError as err:
            raise ValueError(f"{json_file}: invalid image processor settings: {err}") from None

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Write `preprocessor_config.json` atomically (dinat.atomic): the folder's other files are kept,
        a file path or a folder holding the working directory is refused."""
        if push_to_hub:  # transformers' upload path, unchanged
            return super().save_pretrained(save_directory, push_to_hub=True, **kwargs)
        with atomic.replace_checkpoint(save_directory, owns=atomic.processor_owns) as staging:
            written = super().save_pretrained(staging, **kwargs)
        return [os.path.join(save_directory, os.path.basename(name)) for name in written]

    @classmethod
    def from_variant(cls, variant: str | PretrainedCfg | None = None, **overrides) -> "DinatImageProcessor":
        """The evaluation transform of a registered variant's weights (dinat.registry: a preset name, a hub id, or
        a `PretrainedCfg`): its input size, crop, interpolation and mean/std. None: timm's ImageNet defaults."""
        if variant is None:
            data = DEFAULT_PRETRAINED_CFG
        elif isinstance(variant, PretrainedCfg):
            data = variant
        else:
            data = get_variant(variant).pretrained
        settings = dict(size=dict(zip(("height", "width"), data.input_size)), resample=data.interpolation,
                        crop_pct=data.crop_pct, image_mean=list(data.mean), image_std=list(data.std))
        settings.update(overrides)
        return cls(**settings)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of the pixel values for any image, or None when it depends on the image."""
        if self.crop_pct is not None:
            return self.size["height"], self.size["width"]
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    # -- entry points -------------------------------------------------------------------------------
    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Turn one image or a list of them into `BatchFeature({"pixel_values": ...})`.

        `images`: PIL images, numpy arrays (HWC or CHW; uint8, or float in [0, 1]), torch tensors (CHW or HWC),
        file paths (str or pathlib.Path), or a list of these. A 4-D array or tensor is a batch.
        `return_tensors`: "pt" (torch, (B, 3, H, W)), "np" (numpy, same shape) or None (a list of (3, H, W)
        float32 arrays). Other keyword arguments override this processor's settings for this call.
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        processor = self._with_overrides(kwargs) if kwargs else self
        items = _as_list(images)
        pixel_values = [processor._process_one(image, f"input {i}") for i, image in enumerate(items)]
        if return_tensors is None:
            return BatchFeature({"pixel_values": pixel_values})
        shapes = {p.shape for p in pixel_values}
        if len(shapes) > 1:
            raise ValueError(f"images were processed to different shapes {sorted(shapes)} and cannot be batched; "
                             "use a fixed size ({'height', 'width'}), a center crop, or return_tensors=None")
        batch = np.stack(pixel_values)
        if return_tensors == "pt":
            import torch

            return BatchFeature({"pixel_values": torch.from_numpy(batch)})
        return BatchFeature({"pixel_values": batch})

    def _with_overrides(self, overrides: dict[str, Any]) -> "DinatImageProcessor":
        unknown = sorted(set(overrides) - set(DinatImagesKwargs.__annotations__))
        if unknown:
            raise ValueError(f"DinatImageProcessor got unknown arguments {unknown}; "
                             f"it accepts {sorted(DinatImagesKwargs.__annotations__)}")
        settings = self.to_dict()
        settings.pop("image_processor_type")
        settings.update(overrides)
        return type(self)(**settings)

    # -- one image ------------------------------------------------------------------------------------
    def _process_one(self, image: ImageLike, where: str) -> np.ndarray:
        """One input -> (3, H, W) float32."""
        channels, on_255, exact_uint8, where = _decode(image, where, self.do_convert_rgb)
        top = 255.0 if on_255 else 1.0  # resampling overshoot is clipped to this range, for every input type
        height, width = channels[0].shape
        if height == 0 or width == 0:
            raise ValueError(f"{where}: the image is empty ({width}x{height} pixels)")

        if self.crop_pct is not None:
            # the original repo's evaluation transform (timm): shorter side to floor(size / crop_pct), center crop
            target_h, target_w = self.size["height"], self.size["width"]
            if target_h == target_w:
                new_h, new_w = _shortest_edge_size(height, width, math.floor(target_h / self.crop_pct))
            else:
                new_h, new_w = math.floor(target_h / self.crop_pct), math.floor(target_w / self.crop_pct)
            _check_resize(where, height, width, new_h, new_w)
            channels = _resize(channels, new_h, new_w, self.resample, exact_uint8, top)
            channels = [_center_crop(c, target_h, target_w) for c in channels]
        else:
            if self.do_resize:
                if "shortest_edge" in self.size:
                    new_h, new_w = _shortest_edge_size(height, width, self.size["shortest_edge"])
                else:
                    new_h, new_w = self.size["height"], self.size["width"]
                _check_resize(where, height, width, new_h, new_w)
                channels = _resize(channels, new_h, new_w, self.resample, exact_uint8, top)
            if self.do_center_crop:
                channels = [_center_crop(c, self.crop_size["height"], self.crop_size["width"]) for c in channels]

        pixels = np.stack(channels).astype(np.float32)  # (C, H, W)
        if self.do_rescale and on_255:
            pixels = pixels * np.float32(self.rescale_factor)
        if self.do_normalize:
            if pixels.shape[0] != len(self.image_mean):
                raise ValueError(f"{where}: image has {pixels.shape[0]} channels but image_mean/image_std have "
                                 f"{len(self.image_mean)} values")
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels, dtype=np.float32)


# -------------------------------------------------------------------------------------------------
# Input handling
# -------------------------------------------------------------------------------------------------
def _as_list(images) -> list:
    if isinstance(images, (list, tuple)) or _is_batch_array(images):  # a 4-D array or tensor is a batch
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ValueError("no images given (empty list)")
    return items


def _is_batch_array(images) -> bool:
    ndim = getattr(images, "ndim", None)
    return isinstance(ndim, int) and ndim == 4 and not isinstance(images, Image.Image)


def _decode(image: ImageLike, where: str, convert_rgb: bool) -> tuple[list, bool, bool, str]:
    """One input -> ((H, W) planes, values on the 0..255 scale (else [0, 1]), planes are exact uint8, the input's
    name for messages: "input 3", or "input 3 ('cat.jpg')" for a file)."""
    if isinstance(image, (str, os.PathLike)):
        image, where = open_image(image, where), f"{where} ({os.fspath(image)!r})"
    if isinstance(image, Image.Image):
        _check_bomb(image, where)
        return (*_pil_channels(exif_transpose(image), where, convert_rgb), where)
    array = _array_from(image, where)
    return (*_array_channels(array, where, convert_rgb), where)


def decode_image(image: ImageLike, where: str = "image") -> np.ndarray:
    """An image (file path, PIL image or array) decoded as the processor reads it: upright (EXIF), RGB, (3, H, W),
    uint8 for 8-bit data, else float32 in [0, 1]. The processor gives this array the result it gives the image,
    so callers that hand images on (e.g. to transformers' pipeline, whose own PIL conversion clips 16-bit data)
    decode files here and get errors that name the file."""
    channels, on_255, exact_uint8, _ = _decode(image, where, convert_rgb=True)
    if exact_uint8:
        return np.stack(channels)
    planes = np.stack(channels).astype(np.float32)
    return planes / np.float32(255.0) if on_255 else planes


def exif_transpose(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated / mirrored by its EXIF Orientation tag, as transformers'
    `load_image` does (PIL.ImageOps.exif_transpose); unchanged (no copy) when there is no such tag."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (a damaged EXIF block: PIL's own exif_transpose would fail the same way)
        return image
    return image if orientation in (None, 1) else ImageOps.exif_transpose(image)


class _BombRefused(ValueError):
    pass


def _check_bomb(image: Image.Image, where: str) -> None:
    """Refuse to decode an image past PIL.Image.MAX_IMAGE_PIXELS, from its header size: PIL itself only warns
    there, and a warnings filter set elsewhere in the process (another thread's catch_warnings) decides whether
    that warning stops anything. Images already in memory (not from a file) are not limited."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit and isinstance(image, ImageFile.ImageFile) and width * height > limit:
        raise _BombRefused(f"{where}: image is larger than PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS "
                           f"= {limit}): {width}x{height} = {width * height} pixels; raise that limit to read it")


def open_image(path: str | os.PathLike, where: str = "image") -> Image.Image:
    """Open and fully decode an image file, turning every failure into a ValueError that names the file."""
    path = Path(path)
    label = f"{where} ({str(path)!r})"
    if not path.exists():
        raise ValueError(f"{label}: no such file")
    if path.is_dir():
        raise ValueError(f"{label}: is a directory, not an image file")
    try:
        image = Image.open(path)  # reads the header only
        _check_bomb(image, label)  # before decoding; independent of any warnings filter
        image.load()  # decode now so a truncated file fails here, not later
    except _BombRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # PIL's own check, past 2x
        raise _BombRefused(f"{label}: image is larger than PIL's decompression-bomb limit "
                           f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {err}") from None
    except UnidentifiedImageError:
        raise ValueError(f"{label}: not an image file PIL can read") from None
    except PermissionError:
        raise ValueError(f"{label}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated / corrupt data
        raise ValueError(f"{label}: cannot decode image (truncated or corrupt file?): {err}") from None
    return image


def _pil_channels(image: Image.Image, where: str, convert_rgb: bool) -> tuple[list, bool, bool]:
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{where}: the image is empty ({width}x{height} pixels)")
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # high-bit-depth grayscale: PIL's RGB conversion clips at 255, so map the value range instead
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{where}: image contains NaN or infinite pixel values ({_count_bad(values)})")
        if mode.startswith("I;16"):
            plane, on_255 = values / 257.0, True  # 0..65535 -> 0..255
        elif mode == "F" and values.size and 0.0 <= values.min() and values.max() <= 1.0:
            plane, on_255 = values, False  # already in [0, 1]
        else:  # "I" (often 16-bit PNG data) or "F" on a larger scale: 8-bit if it fits, else 16-bit, else its max
            top = float(values.max()) if values.size else 0.0
            scale = 1.0 if top <= 255.0 else 257.0 if top <= 65535.0 else top / 255.0
            plane, on_255 = np.clip(values, 0.0, None) / scale, True
        planes = [plane.astype(np.float32)] * (3 if convert_rgb else 1)
        return planes, on_255, False
    if convert_rgb and mode != "RGB":
        if mode not in _PIL_RGB_MODES:
            raise ValueError(f"{where}: cannot convert PIL mode {mode!r} to RGB")
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    exact_uint8 = array.dtype == np.uint8
    return [array[:, :, c] for c in range(array.shape[2])], True, exact_uint8


def _is_torch(obj) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def _array_from(image, where: str) -> np.ndarray:
    if _is_torch(image):
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            image = image.float()
        return image.numpy()
    if isinstance(image, np.ndarray):
        return image
    raise ValueError(f"{where}: unsupported input type {type(image).__name__}; give a PIL image, a numpy array, "
                     "a torch tensor or a file path")


def _array_channels(array: np.ndarray, where: str, convert_rgb: bool) -> tuple[list, bool, bool]:
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        if _channel_axis(array, where) == ChannelDimension.LAST:
            array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(f"{where}: image array must be 2-D (H, W) or 3-D (H, W, C) / (C, H, W), "
                         f"got {array.ndim}-D shape {array.shape}")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"{where}: the image is empty (shape {array.shape})")

    if array.dtype == np.uint8:
        on_255 = True
    elif np.issubdtype(array.dtype, np.floating):
        on_255 = False
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: image contains NaN or infinite pixel values ({_count_bad(array)})")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{where}: float images must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                             "pass uint8 data for the 0..255 range")
    elif array.dtype == np.bool_:
        array, on_255 = array.astype(np.uint8) * 255, True
    else:
        raise ValueError(f"{where}: unsupported array dtype {array.dtype}; use uint8 or float in [0, 1]")

    planes = [array[c] for c in range(array.shape[0])]
    if convert_rgb:
        if len(planes) == 1:
            planes = planes * 3
        elif len(planes) == 4:
            planes = planes[:3]  # drop alpha, as PIL's RGBA -> RGB does
    return planes, on_255, array.dtype == np.uint8


def _channel_axis(array: np.ndarray, where: str) -> ChannelDimension:
    """(C, H, W) or (H, W, C), decided as transformers' processors decide (1 or 3 channels; an ambiguous shape
    such as (3, 5, 3) is taken as channels-first, with transformers' warning); then 4 channels (RGBA) likewise."""
    for num_channels in ((1, 3), (4,)):
        try:
            return infer_channel_dimension_format(array, num_channels=num_channels)
        except ValueError:
            continue
    raise ValueError(f"{where}: array of shape {array.shape} has no channel axis of size 1, 3 or 4 "
                     "(expected (H, W, C) or (C, H, W))")


def _count_bad(values: np.ndarray) -> str:
    return f"{int(np.isnan(values).sum())} NaN, {int(np.isinf(values).sum())} infinite of {values.size}"


# -------------------------------------------------------------------------------------------------
# Geometry
# -------------------------------------------------------------------------------------------------
def _check_resize(where: str, height: int, width: int, new_h: int, new_w: int) -> None:
    if new_h * new_w > MAX_RESIZE_PIXELS:
        raise ValueError(f"{where}: resizing this {width}x{height} image gives {new_w}x{new_h} = {new_w * new_h} "
                         f"pixels, more than the limit of {MAX_RESIZE_PIXELS} (DinatImageProcessor's "
                         "MAX_RESIZE_PIXELS); its aspect ratio is too extreme for this size setting")


def _resize(planes: list, height: int, width: int, resample: Image.Resampling, exact_uint8: bool,
            top: float) -> list:
    """Resize (H, W) planes with PIL. uint8 data takes PIL's 8-bit path, as transformers' ViT processor does
    (an RGB image at once: PIL resamples each band alike); anything else is resized per plane in float mode "F".
    Either way the filter's overshoot is clipped to the input's range [0, top], as the 8-bit path does by its
    nature, so uint8 and float copies of one image agree to rounding."""
    if planes[0].shape == (height, width):
        return planes
    if exact_uint8:
        if len(planes) == 3:
            image = Image.fromarray(np.ascontiguousarray(np.stack(planes, axis=-1)))
            resized = np.asarray(image.resize((width, height), resample=resample, reducing_gap=None))
            return [resized[:, :, c] for c in range(3)]
        return [np.asarray(Image.fromarray(np.ascontiguousarray(p)).resize(
            (width, height), resample=resample, reducing_gap=None)) for p in planes]
    return [_resize_float(p, height, width, resample, top) for p in planes]


def _resize_float(plane: np.ndarray, height: int, width: int, resample: Image.Resampling, top: float) -> np.ndarray:
    # PIL's 8-bit path resamples in two passes, rows first unless that would widen an image about to be made
    # shorter, clipping after each; do the same in float so the two paths differ only by the 8-bit rounding
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    old_w, old_h = image.size
    passes = [(width, old_h), (width, height)]
    if width > old_w and height < old_h:
        passes = [(old_w, height), (width, height)]
    for size in passes:
        if image.size != size:
            image = Image.fromarray(np.clip(np.asarray(image.resize(size, resample=resample, reducing_gap=None)),
                                            0.0, top))
    return np.asarray(image)


def _shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """Scale the shorter side to `shortest`, keeping the aspect ratio (the longer side rounded down)."""
    if height <= width:
        return shortest, int(shortest * width / height)
    return int(shortest * height / width), shortest


def _center_crop(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop, zero-padding first if the plane is smaller (as torchvision's CenterCrop)."""
    h, w = plane.shape
    if h < height or w < width:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        plane = np.pad(plane, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
        h, w = plane.shape
    top = int(round((h - height) / 2.0))
    left = int(round((w - width) / 2.0))
    return plane[top:top + height, left:left + width]


# -------------------------------------------------------------------------------------------------
# Settings
# -------------------------------------------------------------------------------------------------
def _size_dict(size, name: str) -> dict[str, int]:
    if isinstance(size, bool):
        raise ValueError(f"DinatImageProcessor: {name} must be an int or a dict, got {size!r}")
    if isinstance(size, int):
        size = {"height": size, "width": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict):
        raise ValueError(f"DinatImageProcessor: {name} must be an int, (height, width) or a dict, got {size!r}")
    size = dict(size)
    if set(size) == {"height", "width"} or set(size) == {"shortest_edge"}:
        pass
    elif "shortest_edge" in size and set(size) <= {"shortest_edge", "longest_edge"}:
        raise ValueError(f"DinatImageProcessor: {name} with 'longest_edge' is not supported, got {size!r}")
    else:
        raise ValueError(f"DinatImageProcessor: {name} must be {{'height', 'width'}} or {{'shortest_edge'}}, "
                         f"got {size!r}")
    for key, value in size.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"DinatImageProcessor: {name}[{key!r}] must be a positive integer, got {value!r}")
        if value > MAX_SIZE:
            raise ValueError(f"DinatImageProcessor: {name}[{key!r}] = {value} is larger than the limit of {MAX_SIZE} "
                             "pixels (DinatImageProcessor's MAX_SIZE)")
    return size


def _resample(value) -> Image.Resampling:
    if isinstance(value, str):
        key = value.lower()
        if key not in _RESAMPLE_NAMES:
            raise ValueError(f"DinatImageProcessor: unknown resample {value!r}; choose from {sorted(_RESAMPLE_NAMES)}")
        return _RESAMPLE_NAMES[key]
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError):
        raise ValueError(f"DinatImageProcessor: resample must be a PIL filter (0-5 or a name), got {value!r}") from None


def _per_channel(value, name: str) -> list[float]:
    if not isinstance(value, (list, tuple)):
        return [_number(value, name)] * 3
    values = [_number(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if not values:
        raise ValueError(f"DinatImageProcessor: {name} is empty")
    return values


def _flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"DinatImageProcessor: {name} must be True or False, got {value!r}")
    return bool(value)


def _number(value, name: str) -> float:
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"DinatImageProcessor: {name} must be a finite number, got {value!r}")
    return float(value)


def _local_processor_files(name, kwargs: dict) -> list[str]:
    """The processor JSON files `from_pretrained(name)` would read, where they are already on disk (a file, a
    folder, or a hub id's cached snapshot)."""
    filenames = ("processor_config.json", kwargs.get("image_processor_filename", "preprocessor_config.json"))
    name = os.fspath(name)
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isfile(name):
        return [name]
    if os.path.isdir(name):
        return [p for p in (os.path.join(name, subfolder, f) for f in filenames) if os.path.isfile(p)]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = [try_to_load_from_cache(name, f if not subfolder else f"{subfolder}/{f}",
                                         cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
                  for f in filenames]
    except Exception:  # noqa: BLE001 (not a valid repo id: transformers reports it)
        return []
    return [p for p in cached if isinstance(p, str) and os.path.isfile(p)]


__all__ = ["DinatImageProcessor", "MAX_RESIZE_PIXELS", "MAX_SIZE", "decode_image", "exif_transpose", "open_image"]
