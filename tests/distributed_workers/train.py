"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_distributed.py: DDP, Trainer and FSDP2
training of a small DiNAT. Rank 0 writes what it ends with to OUT_DIR; the test compares it with one process.

Usage: python -m torch.distributed.run --nproc_per_node 2 train.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

import common  # next to this script: on the path of a script run by torchrun
from conftest import tiny_model
from dinat.modeling_dinat import DinatLayer


def save_parameters(model, path: Path) -> None:
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, str(path))


def run_ddp(out: Path, rank: int) -> None:
    model = tiny_model()
    ddp = DistributedDataParallel(model)
    common.sgd_steps(ddp, [common.shard(b, rank) for b in common.global_batches()], common.classification_loss)
    if rank == 0:
        save_parameters(model, out / "ddp.safetensors")

    # a backbone whose out_features skip the last stage leaves that stage without gradients: DDP needs to be told
    backbone = common.backbone_without_last_stage()
    ddp = DistributedDataParallel(backbone, find_unused_parameters=True)
    common.sgd_steps(ddp, [common.shard(b, rank) for b in common.global_batches()], common.early_features_loss)
    if rank == 0:
        save_parameters(backbone, out / "ddp_unused.safetensors")


def run_unused_without_flag(out: Path, rank: int) -> None:
    """Without find_unused_parameters, DDP refuses such a backbone at the second step (run last: it leaves
    that DDP instance unusable)."""
    backbone = common.backbone_without_last_stage()
    ddp = DistributedDataParallel(backbone)
    try:
        common.sgd_steps(ddp, [common.shard(b, rank) for b in common.global_batches()], common.early_features_loss)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    if rank == 0:
        (out / "unused_without_flag.json").write_text(json.dumps({"error": error}))


def run_trainer(out: Path, rank: int) -> None:
    results = {}
    for per_device_batch, accumulation in ((4, 1), (2, 2)):  # a global batch of 8 either way
        model, losses, eval_loss = common.train_with_trainer(str(out / "trainer_run"), per_device_batch,
                                                             accumulation)
        if rank == 0:
            save_parameters(model, out / f"trainer_accumulation{accumulation}.safetensors")
            results[f"accumulation{accumulation}"] = {"losses": losses, "eval_loss": eval_loss}
    if rank == 0:
        (out / "trainer.json").write_text(json.dumps(results))


def run_fsdp(out: Path, rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = tiny_model()
    model.activation_checkpointing_enable()  # DinatLayer is a GradientCheckpointingLayer: FSDP2 hooks stay outside
    for module in model.modules():
        if isinstance(module, DinatLayer):
            fully_shard(module)
    fully_shard(model)
    model.train()
    common.sgd_steps(model, [common.shard(b, rank) for b in common.global_batches()], common.classification_loss)
    # every rank takes part in gathering the full state dict; rank 0 writes a from_pretrained folder
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out / "fsdp_model", state_dict=state)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == common.WORLD_SIZE
    for name in sys.argv[2:] or ("ddp", "trainer", "fsdp", "unused_without_flag"):
        globals()[f"run_{name}"](out, rank)
        dist.barrier()
        if rank == 0:
            (out / f"{name}.done").write_text("")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
