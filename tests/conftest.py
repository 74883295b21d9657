"""What the test files share: where the fixtures are, the golden cases, and the small DiNAT they build.

`tests/` is on the import path (pyproject.toml: pytest's `pythonpath`), so test files import these helpers
with `from conftest import ...`, and the reference tester with `from na_tester import ...`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from dinat import DinatConfig, DinatForImageClassification
from dinat.modeling_dinat import DinatLayer

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
CASES = FIXTURES / "cases"  # golden cases of the reference stack (tests/fixtures/README.md)
REFERENCE_TOL = dict(atol=1e-4, rtol=1e-4)  # float32 agreement with the reference stack's outputs

# The small DiNAT the tests build: 3 stages, 4 layers (the first stage with dilations 1 and 2), K=3 and
# head_dim 8 everywhere (a power of two: NATTEN >= 0.20 runs it on CPU). A 32x32 image gives 8x8, 4x4 and
# 2x2 maps; the last is smaller than the window and padded.
TINY = dict(embed_dim=16, depths=[2, 1, 1], num_heads=[2, 4, 8], kernel_size=3, dilations=[[1, 2], [1], [1]],
            mlp_ratio=2.0, num_labels=3, drop_path_rate=0.0)
# the same with a fourth stage, for what reads four feature maps (dense heads) or four stages (benchmarks)
FOUR_STAGES = dict(depths=[1, 2, 1, 1], num_heads=[2, 4, 8, 16], dilations=[[1], [1, 2], [1], [1]])


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


def case_io(name: str) -> dict[str, torch.Tensor]:
    """The inputs and reference outputs of golden case `name` (tests/fixtures/cases/<name>/io.safetensors)."""
    return load_file(CASES / name / "io.safetensors")


def load_case(name: str, folder: str = "model", cls=DinatForImageClassification, **from_pretrained_kwargs):
    """(model in eval mode, io tensors) of golden case `name`."""
    return cls.from_pretrained(CASES / name / folder, **from_pretrained_kwargs).eval(), case_io(name)


def count_layer_calls(model) -> dict[str, int]:
    """Forward calls per DinatLayer: a checkpointed layer runs twice in a training step (forward, recompute).

    Counted at the layer's first submodule: transformers checkpoints the layer's `forward` (its own hooks stay
    outside the checkpoint), and the recompute may stop early, once it has what backward needs."""
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, DinatLayer):
            calls[name] = 0
            module.layernorm_before.register_forward_pre_hook(
                lambda mod, args, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


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
