"""What the 2-process tests and their single-process references share: model, data, training schedule.

Imported by `train.py` (run under torchrun, with tests/ on PYTHONPATH) and by `tests/test_distributed.py` (the
single-process side). The model is conftest's tiny DiNAT.
"""

from __future__ import annotations

import torch

from conftest import Stripes, tiny_model
from dinat import DinatBackbone

WORLD_SIZE = 2
GLOBAL_BATCH = 8  # split over the ranks: each sees GLOBAL_BATCH // WORLD_SIZE samples a step
STEPS = 3
LEARNING_RATE = 0.05
IMAGE = 32


def backbone_without_last_stage(seed: int = 0):
    """A backbone whose out_features skip the last stage: that stage gets no gradient."""
    return tiny_model(DinatBackbone, seed=seed, out_features=["stage1", "stage2"])


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of GLOBAL_BATCH (pixels, labels); rank r takes rows r::WORLD_SIZE of each."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=generator),
             torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)) for _ in range(STEPS)]


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = batch
    return pixels[rank::WORLD_SIZE], labels[rank::WORLD_SIZE]


def sgd_steps(model, batches, loss_of) -> None:
    """Plain SGD on `loss_of(model, pixels, labels)`: the same schedule on one process and on many."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for pixels, labels in batches:
        optimizer.zero_grad()
        loss_of(model, pixels, labels).backward()
        optimizer.step()


def classification_loss(model, pixels, labels) -> torch.Tensor:
    return model(pixel_values=pixels, labels=labels).loss


def early_features_loss(backbone, pixels, labels) -> torch.Tensor:
    """A loss on a backbone whose out_features skip the last stage: the last stage gets no gradient."""
    return sum(fm.square().mean() for fm in backbone(pixels).feature_maps)


def trainer_arguments(output_dir: str, per_device_batch: int, accumulation: int):
    from transformers import TrainingArguments

    # plain SGD without clipping: the update is proportional to the gradient, so a wrongly scaled loss shows in
    # the parameters (AdamW and gradient clipping would hide a constant factor)
    return TrainingArguments(output_dir=output_dir, per_device_train_batch_size=per_device_batch,
                             per_device_eval_batch_size=4, gradient_accumulation_steps=accumulation,
                             max_steps=STEPS, learning_rate=LEARNING_RATE, optim="sgd", max_grad_norm=0.0,
                             lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0)


def train_with_trainer(output_dir: str, per_device_batch: int, accumulation: int):
    """(model, logged train losses, eval loss) after STEPS Trainer steps on Stripes."""
    from transformers import Trainer

    model = tiny_model()
    trainer = Trainer(model=model, args=trainer_arguments(output_dir, per_device_batch, accumulation),
                      train_dataset=Stripes(48, 0), eval_dataset=Stripes(16, 1))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses, trainer.evaluate()["eval_loss"]
