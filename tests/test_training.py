"""Fine-tuning features: gradient checkpointing, drop path, dropout, autocast, new heads, Trainer, torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import Dataset

from conftest import TESTS, Stripes, count_layer_calls, load_case, tiny_batch, tiny_model
from dinat import DinatBackbone, DinatConfig, DinatForImageClassification
from dinat.modeling_dinat import DinatDropPath, DinatLayer, NeighborhoodAttention
from dinat.training import autocast, grad_scaler, parameter_groups


def gradients(model: DinatForImageClassification, pixels, labels) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(pixels, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# -------------------------------------------------------------------------------------------------
# Gradient checkpointing
# -------------------------------------------------------------------------------------------------
def test_old_and_new_switch_names_are_one_switch():
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; both names work (the
    # contract battery, test_contract.py, checks that checkpointing gives the same outputs and gradients)
    model = tiny_model().train()
    calls = count_layer_calls(model)
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing
    pixels, labels = tiny_batch()
    model(pixels, labels=labels).loss.backward()
    assert set(calls.values()) == {2}  # every layer recomputed
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing


def test_per_stage_checkpointing_and_every_n_layers():
    model = tiny_model().train()
    pixels, labels = tiny_batch()
    expected = gradients(model, pixels, labels)
    calls = count_layer_calls(model)
    model.set_grad_checkpointing(True, stages=[0, 2])
    got = gradients(model, pixels, labels)
    assert calls == {"dinat.encoder.levels.0.layers.0": 2, "dinat.encoder.levels.0.layers.1": 2,
                     "dinat.encoder.levels.1.layers.0": 1, "dinat.encoder.levels.2.layers.0": 2}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

    model.set_grad_checkpointing(False)
    model.activation_checkpointing_enable(every_n_layers=2)  # layers 0 and 2 of the 4, counted over stages
    calls.update({name: 0 for name in calls})
    gradients(model, pixels, labels)
    assert calls == {"dinat.encoder.levels.0.layers.0": 2, "dinat.encoder.levels.0.layers.1": 1,
                     "dinat.encoder.levels.1.layers.0": 2, "dinat.encoder.levels.2.layers.0": 1}
    model.set_grad_checkpointing(True, stages=[0])  # the per-stage switch takes every layer of the stage again
    calls.update({name: 0 for name in calls})
    gradients(model, pixels, labels)
    assert calls["dinat.encoder.levels.0.layers.1"] == 2 and calls["dinat.encoder.levels.2.layers.0"] == 1
    with pytest.raises(ValueError, match="stages \\[3\\] out of range"):
        model.set_grad_checkpointing(True, stages=[3])


def test_checkpointing_is_idle_in_eval_and_no_grad():
    model = tiny_model()
    model.set_grad_checkpointing(True)
    calls = count_layer_calls(model)
    pixels, _ = tiny_batch()
    model.eval()
    with torch.no_grad():
        model(pixels)
    assert set(calls.values()) == {1}


# -------------------------------------------------------------------------------------------------
# Drop path and dropout
# -------------------------------------------------------------------------------------------------
def test_drop_path_follows_a_linear_schedule_over_all_layers():
    model = tiny_model(drop_path_rate=0.3)  # 4 layers: 0, 0.1, 0.2, 0.3
    rates = [m.drop_path.drop_prob for m in model.modules() if isinstance(m, DinatLayer)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_drop_path_drops_whole_samples_in_training_only():
    module = DinatDropPath(0.5)
    x = torch.ones(400, 3, 4, 5)
    torch.manual_seed(0)
    out = module.train()(x)
    per_sample = out.flatten(1)
    kept = (per_sample == 2.0).all(1)  # kept samples are rescaled by 1 / keep_prob
    dropped = (per_sample == 0.0).all(1)
    assert bool((kept | dropped).all())
    assert 0.35 < kept.float().mean().item() < 0.65
    assert torch.equal(module.eval()(x), x)


@pytest.mark.parametrize("field", ["hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"])
def test_stochastic_regularizers_act_in_train_mode_only(field):
    model = tiny_model(**{field: 0.5})
    pixels, _ = tiny_batch(4)
    model.train()
    first, second = model(pixels).logits, model(pixels).logits
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def test_attention_dropout_matches_reference_in_eval():
    # the unfused path (taken when attention dropout is on) gives the reference's logits once dropout is off
    model, io = load_case("tiny_pad", attention_probs_dropout_prob=0.3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(io["pixel_values"]).logits, io["logits"], rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------
# Mixed precision
# -------------------------------------------------------------------------------------------------
def test_bfloat16_autocast_on_cpu_trains():
    model, io = load_case("tiny_pad")
    model.train()
    with autocast("cpu", "bf16"):
        outputs = model(io["pixel_values"], labels=io["labels"])
    assert outputs.logits.dtype == torch.bfloat16
    # bfloat16 keeps ~3 significant digits: compare with the reference loosely, relative to the logits' scale
    scale = io["logits"].abs().max()
    assert (outputs.logits.float() - io["logits"]).abs().max() < 0.05 * scale
    outputs.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_autocast_choices():
    with pytest.raises(ValueError, match="float16 autocast needs a CUDA device"):
        autocast("cpu", "float16")
    with pytest.raises(ValueError, match="unknown precision"):
        autocast("cpu", "int8")
    assert not grad_scaler("cpu", "bf16").is_enabled()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here"))])
def test_float16_autocast_gradients_match_reference(device):
    """float16 autocast: logits and unscaled gradients near the reference's float32 ones; a GradScaler step
    (whose first scale of 2**16 overflows float16 gradients by design, then is skipped) leaves finite weights."""
    model, io = load_case("tiny_pad")
    model.to(device).train()
    pixels, labels = io["pixel_values"].to(device), io["labels"].to(device)
    with torch.autocast(device, dtype=torch.float16):
        outputs = model(pixels, labels=labels)
    assert outputs.logits.dtype == torch.float16
    assert (outputs.logits.float().cpu() - io["logits"]).abs().max() < 0.01 * io["logits"].abs().max()
    outputs.loss.backward()
    for name, param in model.named_parameters():
        want = io["grad." + name]
        err = (param.grad.float().cpu() - want).abs().max().item()
        assert err <= 0.1 * max(want.abs().max().item(), 1e-3), f"{name}: float16 gradient off by {err:.3g}"

    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device)
    with torch.autocast(device, dtype=torch.float16):
        loss = model(pixels, labels=labels).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_parameter_groups_exempt_biases_norms_rpb_and_layer_scale():
    model = tiny_model(layer_scale_init_value=1e-5)
    decay, no_decay = parameter_groups(model, weight_decay=0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    for name in exempt:
        assert name.endswith((".bias", ".rpb", "layer_scale_parameters")) or "norm" in name, name
    for name in decayed:
        assert name.endswith(".weight") and "norm" not in name, name
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def exempt_by_module_type(model: torch.nn.Module) -> set[str]:
    """The rule training.parameter_groups applied before the model carried no_weight_decay(): by module type."""
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if (name == "bias" or isinstance(module, torch.nn.LayerNorm)
                    or (isinstance(module, NeighborhoodAttention) and name == "rpb")
                    or (isinstance(module, DinatLayer) and name == "layer_scale_parameters")):
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


@pytest.mark.parametrize("build", [
    lambda: tiny_model(layer_scale_init_value=1e-5),
    lambda: tiny_model(),
    lambda: DinatBackbone(DinatConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3,
                                      dilations=[[2], [1]], out_features=["stage1", "stage2"])),
], ids=["classifier with layer scale", "classifier", "backbone with its output norms"])
def test_no_weight_decay_names_what_the_module_type_rule_chose(build):
    model = build()
    assert model.no_weight_decay() == exempt_by_module_type(model)
    model.requires_grad_(True)
    frozen = next(p for n, p in model.named_parameters() if n.endswith(".rpb"))
    frozen.requires_grad_(False)
    decay, no_decay = model.parameter_groups(0.1)
    assert all(p is not frozen for group in (decay, no_decay) for p in group["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


# -------------------------------------------------------------------------------------------------
# New heads on a pretrained checkpoint
# -------------------------------------------------------------------------------------------------
def test_new_num_labels_from_pretrained_keeps_the_trunk(tmp_path):
    source = tiny_model(num_labels=10)
    source.save_pretrained(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DinatForImageClassification.from_pretrained(tmp_path / "ckpt", num_labels=4,
                                                            ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (4, source.dinat.num_features)
    trunk, loaded = source.dinat.state_dict(), model.dinat.state_dict()
    for key in trunk:
        torch.testing.assert_close(loaded[key], trunk[key], rtol=0, atol=0)

    model.reset_classifier(6, id2label={i: f"c{i}" for i in range(6)})
    pixels, _ = tiny_batch(3)
    labels = torch.tensor([0, 5, 3])
    loss = model.train()(pixels, labels=labels).loss
    loss.backward()
    assert model(pixels).logits.shape == (3, 6) and model.classifier.weight.grad is not None
    model.save_pretrained(tmp_path / "six")
    assert DinatForImageClassification.from_pretrained(tmp_path / "six").config.id2label[5] == "c5"


# -------------------------------------------------------------------------------------------------
# transformers' Trainer
# -------------------------------------------------------------------------------------------------
def test_trainer_runs_steps_with_checkpointing_and_saves(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, max_steps=6, learning_rate=2e-3, report_to=[],
                             gradient_checkpointing=True, use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True, dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = Trainer(model=model, args=args, train_dataset=Stripes(48, 0), eval_dataset=Stripes(32, 1))
        result = trainer.train()
    assert result.global_step == 6
    assert model.is_activation_checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = DinatForImageClassification.from_pretrained(tmp_path / "saved").eval()
    pixels, _ = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model.eval()(pixels).logits, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------
# torch.compile
# -------------------------------------------------------------------------------------------------
# aot_eager traces exactly what inductor compiles (one full graph, functionalized, with autograd) without
# generating C++ (a minute per test on 2 cores when the inductor cache is cold); inductor itself runs as slow
COMPILE_BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.slow
def test_inductor_inference_matches_eager_and_reference():
    # aot_eager inference of every head: test_contract.py
    backend = "inductor"
    torch._dynamo.reset()
    model, io = load_case("tiny_pad")
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: any graph break is an error
    with torch.no_grad():
        got = compiled(io["pixel_values"]).logits
        expected = model(io["pixel_values"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, io["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_fullgraph_training_step_matches_eager(backend):
    torch._dynamo.reset()
    model, io = load_case("odd_shapes")
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    compiled(io["pixel_values"], labels=io["labels"]).loss.backward()
    for name, param in model.named_parameters():
        expected = io[f"grad.{name}"]
        scale = expected.abs().max().clamp(min=1e-12)
        assert (param.grad - expected).abs().max() <= 1e-4 * scale + 1e-6, name


# -------------------------------------------------------------------------------------------------
# The image-folder example script
# -------------------------------------------------------------------------------------------------
def test_imagefolder_example_fine_tunes_and_saves(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 4)):
        for name in ("cats", "dogs"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(20 + i, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    tiny_model(num_labels=5).save_pretrained(tmp_path / "pretrained")
    script = TESTS.parent / "examples" / "train_imagefolder.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data"), "--pretrained", str(tmp_path / "pretrained"),
         "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--precision", "bfloat16",
         "--grad-checkpointing", "--checkpoint-stages", "0", "--drop-path", "0.1",
         "--output-dir", str(tmp_path / "out")],
        check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation accuracy" in result.stdout
    model = DinatForImageClassification.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {0: "cats", 1: "dogs"}
    assert model.config.drop_path_rate == 0.1
    assert (tmp_path / "out" / "preprocessor_config.json").exists()


def test_trainer_gradient_accumulation_equals_one_big_tiny_batch(tmp_path):
    """Batch 8 in one step vs two accumulated batches of 4 (the same 8 samples): the same loss and update.

    transformers' Trainer divides the loss by the accumulation steps unless the model says it normalizes by
    `num_items_in_batch` itself (`accepts_loss_kwargs`); a model that claims it but does not gets 2x gradients."""
    from transformers import Trainer, TrainingArguments

    results = {}
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = tiny_model()
        args = TrainingArguments(output_dir=str(tmp_path / f"run{accumulation}"),
                                 per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                 max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                 logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Stripes(24, 0))
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results[accumulation] = (losses, {name: p.detach().clone() for name, p in model.named_parameters()})
    (losses1, params1), (losses2, params2) = results[1], results[2]
    assert len(losses1) == len(losses2) == 3
    assert losses2 == pytest.approx(losses1, rel=1e-5, abs=1e-6)
    for name, value in params1.items():
        torch.testing.assert_close(params2[name], value, rtol=0, atol=1e-5, msg=name)
