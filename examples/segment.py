"""Segment an image with a DiNAT segmentation model and save a coloured overlay.

    python examples/segment.py IMAGE [--model shi-labs/oneformer_ade20k_dinat_large] [--out overlay.png]

Any image-segmentation checkpoint whose backbone is DiNAT works (OneFormer, Mask2Former, UperNet): a hub id or a
local `save_pretrained` folder holding the model and its processor. `import dinat` makes transformers build this
package's DiNAT backbone for it (no NATTEN needed). Each class gets a fixed colour; the PNG shows the image under
the colour of its class, with a legend of the classes found, largest first.
"""

from __future__ import annotations

import argparse
import colorsys
import importlib.util
import sys

import numpy as np
from PIL import Image, ImageDraw

import dinat  # noqa: F401  (registers DiNAT with transformers' Auto classes)


def class_colour(label_id: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per class id (golden-ratio hues, alternating brightness)."""
    hue = (label_id * 0.618033988749895) % 1.0
    value = 0.95 if label_id % 2 == 0 else 0.7
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, value))


def label_map(segments: list[dict], label2id: dict[str, int], size: tuple[int, int]) -> np.ndarray:
    """(H, W) class ids from the pipeline's per-class masks; -1 where no mask covers a pixel."""
    labels = np.full((size[1], size[0]), -1, dtype=np.int64)
    for segment in segments:
        labels[np.asarray(segment["mask"]) > 0] = label2id[segment["label"]]
    return labels


def overlay(image: Image.Image, labels: np.ndarray, alpha: float) -> Image.Image:
    """The image blended with each pixel's class colour (`alpha` of colour); uncovered pixels stay as they are."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = np.zeros_like(pixels)
    for label_id in np.unique(labels[labels >= 0]):
        colours[labels == label_id] = class_colour(int(label_id))
    covered = (labels >= 0)[..., None]
    blended = np.where(covered, (1 - alpha) * pixels + alpha * colours, pixels)
    return Image.fromarray(np.round(blended).astype(np.uint8))


def with_legend(picture: Image.Image, rows: list[tuple[str, int, float]]) -> Image.Image:
    """`picture` above a legend: a swatch, the class name and its share of the image, per row."""
    line = 16
    canvas = Image.new("RGB", (max(picture.width, 220), picture.height + line * len(rows) + 6), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, label_id, share) in enumerate(rows):
        top = picture.height + 4 + i * line
        draw.rectangle([4, top + 2, 16, top + 12], fill=class_colour(label_id), outline="black")
        draw.text((22, top + 1), f"{name}  {100 * share:.1f}%", fill="black")
    return canvas


def segment(image_path: str, model: str, out: str, subtask: str = "semantic", alpha: float = 0.55,
            legend: bool = True) -> list[tuple[str, int, float]]:
    """Run the image-segmentation pipeline on `image_path`, write the overlay to `out`; returns the legend rows."""
    from transformers import pipeline

    segmenter = pipeline("image-segmentation", model=model)
    image = Image.open(image_path).convert("RGB")
    # semantic: one mask per class present (OneFormer, Mask2Former and UperNet all support it)
    segments = segmenter(image, subtask=subtask)
    label2id = {name: int(i) for i, name in segmenter.model.config.id2label.items()}
    labels = label_map(segments, label2id, image.size)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    id2label = segmenter.model.config.id2label
    rows = sorted(((id2label[int(i)], int(i), c / labels.size) for i, c in zip(ids, counts)), key=lambda r: -r[2])
    picture = overlay(image, labels, alpha)
    (with_legend(picture, rows) if legend else picture).save(out)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="image file (any format PIL reads)")
    parser.add_argument("--model", default="shi-labs/oneformer_ade20k_dinat_large",
                        help="hub id or save_pretrained folder of a segmentation model with a DiNAT backbone")
    parser.add_argument("--out", default="overlay.png", help="where to write the overlay PNG")
    parser.add_argument("--subtask", default="semantic", choices=["semantic", "instance", "panoptic"],
                        help="segmentation kind, for models that do several (OneFormer, Mask2Former)")
    parser.add_argument("--alpha", type=float, default=0.55, help="colour opacity over the image, 0 to 1")
    parser.add_argument("--no-legend", action="store_true", help="write the overlay without the legend")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.subtask != "semantic" and importlib.util.find_spec("torchvision") is None:
        # transformers 5.24's PIL-only OneFormer/Mask2Former processors call torchvision in these post-processings
        parser.error(f"--subtask {args.subtask} needs torchvision (transformers' post-processing uses it): "
                     "pip install torchvision, or use --subtask semantic")
    rows = segment(args.image, args.model, args.out, args.subtask, args.alpha, legend=not args.no_legend)
    for name, _, share in rows:
        print(f"{name}: {100 * share:.1f}%")
    print(f"overlay: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
