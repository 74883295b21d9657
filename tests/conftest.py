"""What the test files share: where the fixtures are, the golden cases, and the small DiNAT they build.

`tests/` is on the import path (pyproject.toml: pytest's `pythonpath`), so test files import these helpers
with `from conftest import ...`, and the reference tester with `from na_tester import ...`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from dinat import DinatConfig, DinatForImageClassification

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
CASES = FIXTURES / "cases"  # golden cases of the reference stack (tests/fixtures/README.md)

# The small DiNAT the tests build: 3 stages, 4 layers (the first stage with dilations 1 and 2), K=3 and
# head_dim 8 everywhere (a power of two: NATTEN >= 0.20 runs it on CPU). A 32x32 image gives 8x8, 4x4 and
# 2x2 maps; the last is smaller than the window and padded.
TINY = dict(embed_dim=16, depths=[2, 1, 1], num_heads=[2, 4, 8], kernel_size=3, dilations=[[1, 2], [1], [1]],
            mlp_ratio=2.0, num_labels=3, drop_path_rate=0.0)
TINY_WIDTHS = [16, 32, 64]  # channels of the stages (embed_dim * 2**i), stated rather than computed


def tiny_config(**overrides) -> DinatConfig:
    return DinatConfig(**{**TINY, **overrides})


def tiny_model(cls=DinatForImageClassification, seed: int = 0, **overrides):
    """A freshly initialised `cls` (any of the three heads) on `tiny_config(**overrides)`, seeded."""
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides))


def tiny_batch(size: int = 2, height: int = 32, width: int = 32, seed: int = 0, num_labels: int = 3):
    """(pixel_values, class labels) from their own generator (the global RNG is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 3, height, width, generator=generator),
            torch.randint(0, num_labels, (size,), generator=generator))


def load_case(name: str, folder: str = "model", cls=DinatForImageClassification):
    """(model in eval mode, io tensors) of golden case `name` (tests/fixtures/cases/<name>)."""
    return cls.from_pretrained(CASES / name / folder).eval(), load_file(CASES / name / "io.safetensors")


class Stripes(Dataset):
    """Three easy classes (horizontal, vertical or no stripes, with noise) as transformers Trainer items."""

    def __init__(self, size: int, seed: int, image: int = 32):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (size,), generator=generator)
        self.noise = torch.randn(size, 3, image, image, generator=generator) * 0.3
        stripes = (torch.arange(image) % 4 < 2).float()
        self.patterns = [stripes[:, None].expand(image, image), stripes[None, :].expand(image, image),
                         torch.zeros(image, image)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        return {"pixel_values": self.noise[index] + self.patterns[label], "labels": label}
