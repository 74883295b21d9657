"""Training on 2 processes (torch.distributed, gloo, CPU) equals training on one.

One `torchrun --nproc_per_node 2` launch runs `distributed_workers/train.py`: DDP, transformers' Trainer (global
batch 8 as 2 x 4, and as 2 x 2 with gradient accumulation 2), FSDP2 `fully_shard` per layer with activation
checkpointing and a gathered full state dict, and DDP on a backbone whose out_features skip the last stage.
Each test here compares one of its results with the same training on this single process (`common.py` holds
what both sides share). The launch takes most of this file's time; each test reads its part.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TESTS, TINY, tiny_model
from dinat import DinatForImageClassification
from distributed_workers import common

WORKERS = TESTS / "distributed_workers"

PARAMETER_TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    python_path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))  # for conftest
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(common.WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKERS / "train.py"), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return out


@pytest.fixture(scope="module")
def single_process_sgd() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model = tiny_model()
    common.sgd_steps(model, common.global_batches(), common.classification_loss)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def single_process_trainer(tmp_path_factory):
    model, losses, eval_loss = common.train_with_trainer(str(tmp_path_factory.mktemp("trainer")),
                                                         common.GLOBAL_BATCH, 1)
    return {name: p.detach() for name, p in model.named_parameters()}, losses, eval_loss


def assert_same_parameters(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                           moved_from: dict[str, torch.Tensor] | None = None) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=PARAMETER_TOLERANCE, msg=name)
    if moved_from is not None:  # training did something: parity of untouched models would prove nothing
        assert any((expected[n] - moved_from[n]).abs().max() > 100 * PARAMETER_TOLERANCE for n in expected)


def initial_parameters() -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in tiny_model().named_parameters()}


def test_ddp_equals_one_process(distributed_run, single_process_sgd):
    got = load_file(distributed_run / "ddp.safetensors")
    assert_same_parameters(got, single_process_sgd, moved_from=initial_parameters())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_under_torchrun_equals_one_process(distributed_run, single_process_trainer, accumulation):
    """2 processes x 4 samples (accumulation 1) or x 2 samples x 2 micro-batches (accumulation 2) against one
    process with 8: the same samples each step, so the same parameters, and the same logged train and eval loss
    (Trainer logs the mean over processes)."""
    expected_params, expected_losses, expected_eval_loss = single_process_trainer
    logged = json.loads((distributed_run / "trainer.json").read_text())[f"accumulation{accumulation}"]
    got = load_file(distributed_run / f"trainer_accumulation{accumulation}.safetensors")
    assert len(logged["losses"]) == len(expected_losses) == common.STEPS
    assert logged["losses"] == pytest.approx(expected_losses, rel=1e-5, abs=1e-6)
    assert logged["eval_loss"] == pytest.approx(expected_eval_loss, rel=1e-5, abs=1e-6)
    assert_same_parameters(got, expected_params, moved_from=initial_parameters())


def test_fsdp2_with_checkpointing_gathers_a_loadable_state_dict(distributed_run, single_process_sgd):
    """fully_shard per DinatLayer and on the root, activation checkpointing on; the full state dict gathered
    with get_model_state_dict(full_state_dict=True) and written by save_pretrained loads with from_pretrained
    and holds the parameters of the same training on one process."""
    model = DinatForImageClassification.from_pretrained(distributed_run / "fsdp_model")
    assert model.config.embed_dim == TINY["embed_dim"]
    got = {name: p.detach() for name, p in model.named_parameters()}
    assert_same_parameters(got, single_process_sgd, moved_from=initial_parameters())


def test_ddp_backbone_with_unused_last_stage(distributed_run):
    """out_features without the last stage: that stage gets no gradient. With find_unused_parameters=True DDP
    trains like one process; without it, DDP stops with its unused-parameters error."""
    backbone = common.backbone_without_last_stage()
    before = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    common.sgd_steps(backbone, common.global_batches(), common.early_features_loss)
    expected = {name: p.detach() for name, p in backbone.named_parameters()}
    assert_same_parameters(load_file(distributed_run / "ddp_unused.safetensors"), expected, moved_from=before)
    assert torch.equal(expected["encoder.levels.2.layers.0.attention.self.rpb"],
                       before["encoder.levels.2.layers.0.attention.self.rpb"])  # the unused stage did not move

    error = json.loads((distributed_run / "unused_without_flag.json").read_text())["error"]
    assert error is not None and "find_unused_parameters" in error
