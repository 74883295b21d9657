"""Fine-tune DiNAT on your own images: a plain PyTorch training loop to adapt.

Data layout (one subfolder per class; the class names come from the train folder):

    DATA/train/cat/001.jpg  DATA/train/dog/002.png  ...
    DATA/val/cat/101.jpg    DATA/val/dog/102.png    ...

Start from a pretrained checkpoint (a from_pretrained folder, e.g. one made by `dinat convert`, or a hub id in
the local cache) with a new head, or from scratch with a preset:

    python examples/train_imagefolder.py DATA --pretrained converted/dinat-mini --epochs 10 --output-dir out
    python examples/train_imagefolder.py DATA --preset mini --image-size 224 --precision bfloat16 \\
        --grad-checkpointing --drop-path 0.1

Features: AdamW without weight decay on norms/biases/rpb, warm-up + cosine schedule, autocast (bfloat16 on CPU or
GPU, float16 on GPU with loss scaling), gradient checkpointing (all stages or `--checkpoint-stages 0 1`), drop path
and dropout from the config, a progress bar, and the best epoch saved with save_pretrained (model +
preprocessor_config.json) so that `dinat predict image.jpg --model OUTPUT_DIR` and from_pretrained load it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinat import DinatConfig, DinatForImageClassification, DinatImageProcessor
from dinat.atomic import save_together
from dinat.registry import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dinat.training import autocast, grad_scaler, parameter_groups

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# -------------------------------------------------------------------------------------------------
# Data: class subfolders -> (pixels, label); the preprocessing is the one written to preprocessor_config.json
# -------------------------------------------------------------------------------------------------
class ImageFolder(Dataset):
    def __init__(self, root: Path, classes: list[str], image_size: int, mean, std, augment: bool):
        if not root.is_dir():
            raise SystemExit(f"error: {root} is not a folder (expected DATA/train and DATA/val with class subfolders)")
        self.samples = [(path, index) for index, name in enumerate(classes)
                        for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise SystemExit(f"error: no images found under {root}/<class>/")
        self.image_size, self.augment = image_size, augment
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = Image.open(path).convert("RGB")
        if self.augment:  # random crop of 70-100% of the area, random horizontal flip
            image = random_crop(image, torch.empty(1).uniform_(0.7, 1.0).item())
            if torch.rand(1).item() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std, label


def random_crop(image: Image.Image, area_fraction: float) -> Image.Image:
    width, height = image.size
    side = math.sqrt(area_fraction)
    crop_w, crop_h = max(1, int(width * side)), max(1, int(height * side))
    left = int(torch.randint(0, width - crop_w + 1, (1,)))
    top = int(torch.randint(0, height - crop_h + 1, (1,)))
    return image.crop((left, top, left + crop_w, top + crop_h))


def image_processor(image_size: int, mean, std) -> DinatImageProcessor:
    """The evaluation preprocessing above (bicubic resize, normalize), saved with the model for `dinat predict`."""
    return DinatImageProcessor(size={"height": image_size, "width": image_size}, resample=Image.BICUBIC,
                               image_mean=mean, image_std=std)


# -------------------------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------------------------
def build_model(args, classes: list[str]) -> DinatForImageClassification:
    id2label = dict(enumerate(classes))
    regularization = dict(drop_path_rate=args.drop_path, hidden_dropout_prob=args.dropout)
    regularization = {key: value for key, value in regularization.items() if value is not None}
    if args.pretrained:
        # a new head for our classes; the trunk keeps its pretrained weights
        model = DinatForImageClassification.from_pretrained(
            args.pretrained, num_labels=len(classes), id2label=id2label,
            label2id={name: i for i, name in id2label.items()}, ignore_mismatched_sizes=True, **regularization)
    else:
        config = DinatConfig.from_preset(args.preset, num_labels=len(classes), id2label=id2label,
                                         label2id={name: i for i, name in id2label.items()}, **regularization)
        model = DinatForImageClassification(config)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True, stages=args.checkpoint_stages)
    return model


def processor_settings(args) -> tuple[int, list[float], list[float]]:
    """Image size and normalization: the pretrained checkpoint's own, unless given on the command line."""
    size, mean, std = 224, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    if args.pretrained:
        try:
            processor = DinatImageProcessor.from_pretrained(args.pretrained)
        except OSError:  # a checkpoint without preprocessor_config.json: ImageNet defaults
            processor = None
        if processor is not None:
            size = processor.size.get("height", processor.size.get("shortest_edge", size))
            mean, std = list(processor.image_mean), list(processor.image_std)
    return args.image_size or size, mean, std


# -------------------------------------------------------------------------------------------------
# Loop
# -------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, device, precision) -> float:
    model.eval()
    correct = total = 0
    for pixels, labels in tqdm(loader, desc="validating", leave=False, file=sys.stdout):
        with autocast(device, precision):
            logits = model(pixels.to(device)).logits
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="folder with train/ and val/, each with one subfolder per class")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--pretrained", help="from_pretrained folder or cached hub id to fine-tune (new head)")
    start.add_argument("--preset", default="mini", help="architecture when training from scratch (default: mini)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/imagefolder"))
    parser.add_argument("--image-size", type=int, help="default: the checkpoint's, else 224")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    parser.add_argument("--checkpoint-stages", type=int, nargs="+", help="only these stages (default: all)")
    parser.add_argument("--drop-path", type=float, help="stochastic depth, linear over layers (default: config)")
    parser.add_argument("--dropout", type=float, help="hidden dropout (default: config)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    classes = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir()) \
        if (args.data / "train").is_dir() else []
    if len(classes) < 2:
        raise SystemExit(f"error: {args.data / 'train'} needs at least two class subfolders")
    image_size, mean, std = processor_settings(args)
    train_set = ImageFolder(args.data / "train", classes, image_size, mean, std, augment=True)
    val_set = ImageFolder(args.data / "val", classes, image_size, mean, std, augment=False)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)
    print(f"{len(classes)} classes, {len(train_set)} training and {len(val_set)} validation images, {image_size}px")

    device = torch.device(args.device)
    model = build_model(args, classes).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr)
    total_steps = args.epochs * len(train_loader)
    warmup_steps = int(args.warmup_epochs * len(train_loader))

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = grad_scaler(device, args.precision)

    best = -1.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        progress = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", file=sys.stdout)
        for pixels, labels in progress:
            with autocast(device, args.precision):
                loss = model(pixels.to(device), labels=labels.to(device)).loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
        accuracy = evaluate(model, val_loader, device, args.precision)
        print(f"epoch {epoch}: validation accuracy {accuracy:.3f}")
        if accuracy > best:
            best = accuracy
            save(model, args.output_dir, image_processor(image_size, mean, std))
    print(f"best validation accuracy {best:.3f}; model in {args.output_dir}")


def save(model, output_dir: Path, processor: DinatImageProcessor) -> None:
    """Model and processor staged beside the target and swapped in together (dinat.atomic): an interrupted save
    leaves the previous best model or the new one, complete."""
    save_together(output_dir, model, processor)


if __name__ == "__main__":
    main()
