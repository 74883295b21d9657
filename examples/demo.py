"""End-to-end DiNAT demo, offline: fine-tune a small DiNAT on scikit-learn's handwritten digits.

    make demo                      # sets up .venv, then runs this file
    python examples/demo.py --help

Steps: load the 1,797 bundled 8x8 digits -> stratified 80/20 split -> upsample to 32x32 (PIL, as the image
processor does) -> train a small DiNAT from scratch -> held-out accuracy -> save_pretrained (model and
preprocessor config) -> from_pretrained and re-check -> classify a few held-out PNGs with `dinat predict`.
The last line is `accuracy: 0.xxx`, the reloaded model's held-out accuracy.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from dinat import DinatConfig, DinatForImageClassification, DinatImageProcessor
from dinat.atomic import save_together
from dinat.training import autocast, parameter_groups

# Preprocessing, saved as the model's image processor so that `dinat predict` does exactly what training did:
# convert to RGB, PIL-resize to SIZE x SIZE, scale to [0, 1], normalize with MEAN / STD.
SIZE = 32
RESAMPLE = Image.BILINEAR  # PIL code 2, the value saved in the config
MEAN = STD = [0.5, 0.5, 0.5]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="where the model is saved")
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 autocast helps on CPUs with native bf16 matmuls (AMX)")
    parser.add_argument("--seed", type=int, default=0)
    # one thread: this model's ops are too small to gain from a second one, and when another program busies a
    # core, two threads stall each other at every op (measured: 3x to 50x slower on a shared 2-core machine)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--num-predict", type=int, default=5, help="held-out images to classify with dinat predict")
    return parser.parse_args()


def digit_images() -> tuple[list[Image.Image], np.ndarray]:
    """The bundled digits (pixel values 0..16) as 8-bit grayscale PIL images, and their labels."""
    digits = load_digits()
    images = [Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L") for pixels in digits.images]
    return images, digits.target


def preprocess(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, SIZE, SIZE) pixel values, the same steps as the saved image-processor config."""
    arrays = [np.asarray(image.convert("RGB").resize((SIZE, SIZE), RESAMPLE), dtype=np.float32) for image in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def image_processor() -> DinatImageProcessor:
    return DinatImageProcessor(size={"height": SIZE, "width": SIZE}, resample=RESAMPLE, image_mean=MEAN,
                               image_std=STD)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale and shift per image (digits are not centred identically)."""
    n = pixels.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(20)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    background = -torch.tensor(MEAN).view(1, 3, 1, 1) / torch.tensor(STD).view(1, 3, 1, 1)  # black, normalized
    return F.grid_sample(pixels - background, grid, align_corners=False) + background


def build_model(seed: int) -> DinatForImageClassification:
    """A small DiNAT for 32x32 inputs: 8x8 tokens, stage 1 mixes plain and dilated (d=2) neighborhoods."""
    torch.manual_seed(seed)
    config = DinatConfig(embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], kernel_size=3,
                         dilations=[[1, 2], [1, 1], [1, 1]], mlp_ratio=2.0, drop_path_rate=0.1,
                         num_labels=10, id2label={i: str(i) for i in range(10)},
                         label2id={str(i): i for i in range(10)})
    return DinatForImageClassification(config)


@torch.no_grad()
def accuracy(model: DinatForImageClassification, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(batch).logits.argmax(-1) for batch in pixels.split(256)])
    return (predictions == labels).float().mean().item()


def train(model, pixels, labels, args) -> None:
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay=0.05), lr=args.lr)
    steps_per_epoch = math.ceil(len(labels) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    progress = tqdm(total=args.epochs * steps_per_epoch, desc="training", unit="step", file=sys.stdout)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(args.batch_size):
            with autocast("cpu", args.precision):
                loss = model(augment(pixels[batch], generator), labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
            progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    progress.close()


def save(model, output_dir: Path) -> None:
    """Model and image processor staged beside output_dir and swapped in together (dinat.atomic): an interrupted
    run leaves the previous model or the new one, complete."""
    save_together(output_dir, model, image_processor())


def check_processor(output_dir: Path, images: list[Image.Image], expected: torch.Tensor) -> None:
    """The saved processor must reproduce the training preprocessing, or `dinat predict` would see other inputs."""
    processor = DinatImageProcessor.from_pretrained(output_dir)
    got = processor(images, return_tensors="pt")["pixel_values"]
    difference = (got - expected).abs().max().item()
    print(f"saved image processor vs training preprocessing: max difference {difference:.1e}")
    if difference > 1e-4:
        raise SystemExit("the saved image processor does not reproduce the training preprocessing")


def predict_with_cli(output_dir: Path, images: list[Image.Image], labels: list[int]) -> None:
    """Write held-out digits as PNGs and classify them with the `dinat predict` command."""
    image_dir = output_dir.parent / "demo-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = image_dir / f"heldout_{i}_label{label}.png"
        image.save(path)
        paths.append(str(path))
    script = Path(sys.executable).with_name("dinat")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dinat.cli"]
    print(f"$ dinat predict {' '.join(Path(p).name for p in paths)} --model {output_dir} --top-k 1")
    result = subprocess.run(command + ["predict", *paths, "--model", str(output_dir), "--top-k", "1"],
                            check=False, capture_output=True, text=True)
    print(result.stdout.rstrip())
    if result.returncode != 0:
        print(result.stderr.rstrip())
        raise SystemExit(f"dinat predict failed with exit code {result.returncode}")
    print("true labels:", " ".join(str(label) for label in labels))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    images, targets = digit_images()
    train_idx, test_idx = train_test_split(np.arange(len(targets)), test_size=0.2, stratify=targets,
                                           random_state=args.seed)
    pixels, labels = preprocess(images), torch.from_numpy(targets).long()
    print(f"digits: {len(train_idx)} training and {len(test_idx)} held-out images, upsampled 8x8 -> {SIZE}x{SIZE}")

    model = build_model(args.seed)
    print(f"model: DiNAT with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{torch.get_num_threads()} CPU threads, {args.precision}")
    train(model, pixels[train_idx], labels[train_idx], args)
    trained_accuracy = accuracy(model, pixels[test_idx], labels[test_idx])
    print(f"held-out accuracy after training: {trained_accuracy:.3f} ({time.perf_counter() - start:.0f}s)")

    save(model, args.output_dir)
    print(f"saved model and preprocessor config to {args.output_dir}")
    reloaded = DinatForImageClassification.from_pretrained(args.output_dir)
    reloaded_accuracy = accuracy(reloaded, pixels[test_idx], labels[test_idx])
    print(f"reloaded with from_pretrained: held-out accuracy {reloaded_accuracy:.3f}")
    if reloaded_accuracy != trained_accuracy:
        raise SystemExit("the reloaded model does not reproduce the trained one")
    shown = test_idx[:args.num_predict]
    check_processor(args.output_dir, [images[i] for i in shown], pixels[shown])
    predict_with_cli(args.output_dir, [images[i] for i in shown], [int(targets[i]) for i in shown])

    print(f"total time: {time.perf_counter() - start:.0f}s")
    print(f"accuracy: {reloaded_accuracy:.3f}")


if __name__ == "__main__":
    main()
