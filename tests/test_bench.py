"""`dinat bench`: it runs end to end, writes what it says, counts FLOPs right, rejects bad options in one line.

No timing is asserted here: performance numbers live in docs/performance.md.
"""

import json
import os

import pytest
import torch

from dinat import bench
from dinat.cli import main

# Multiply-accumulates per 224x224 image, as the papers report them (DiNAT: arXiv 2209.15001, Table 2;
# ConvNeXt-T: arXiv 2201.03545; Swin-T: arXiv 2103.14030): an independent check of the FLOP counting
# that the "fraction of the GEMM rate" rests on, including the NA op's nominal cost.
PAPER_GMAC = {"DiNAT-mini": 2.7, "DiNAT-tiny": 4.3, "ConvNeXt-T": 4.5, "Swin-T": 4.5}


def test_forward_flops_match_the_papers():
    contenders = [bench.dinat_contender("mini"), bench.dinat_contender("tiny")] + [p() for p in bench.PEERS.values()]
    for contender in contenders:
        gmac = bench.forward_flops(bench._seeded(contender.classifier), 224) / 2e9
        assert gmac == pytest.approx(PAPER_GMAC[contender.name], rel=0.03), contender.name


def test_dinat_bench_runs_side_by_side_and_writes_json(tmp_path, capsys):
    output = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    code = main(["bench", "--parts", "gemm,models,latency,backbone", "--batch", "1", "--size", "224",
                 "--backbone-size", "224", "--rounds", "1", "--min-run-time", "0.01", "--threads", "1",
                 "--output", str(output)])
    assert code == 0
    assert torch.get_num_threads() == threads  # --threads is the run's, not the calling process's, from then on
    results = json.loads(output.read_text())
    names = ["DiNAT-mini", "ConvNeXt-T", "Swin-T"]
    assert results["settings"]["dinat"] == "DiNAT-mini" and results["settings"]["peers"] == names[1:]
    for part, modes in (("models", bench.MODES), ("latency", bench.MODES[:2]),
                        ("backbone", ("backbone inference fp32",))):
        for mode in modes:
            for name in names:
                row = bench._find(results["rows"], part=part, mode=mode, model=name)
                assert row is not None and row["images_per_s"] > 0, (part, mode, name)
    assert {r["model"] for r in results["rows"] if r["part"] == "gemm"} == {"float32", "bfloat16"}
    row = bench._find(results["rows"], part="models", mode="training step fp32", model="ConvNeXt-T")
    assert row["gemm_dtype"] == "float32" and 0 < row["gemm_fraction"]
    # a training step is counted as three forward passes
    inference = bench._find(results["rows"], part="models", mode="inference fp32", model="ConvNeXt-T")
    assert row["gflop_per_image"] == pytest.approx(3 * inference["gflop_per_image"])
    # one target per mode and peer, each the ratio of the two rows it names
    assert len(results["targets"]) == len(bench.MODES) * 2
    for target in results["targets"]:
        mode, peer = target["target"].split(", ")[1], target["target"].split(" / ")[1].split(",")[0]
        mine = bench._find(results["rows"], part="models", mode=mode, model="DiNAT-mini")
        theirs = bench._find(results["rows"], part="models", mode=mode, model=peer)
        assert target["value"] == pytest.approx(mine["images_per_s"] / theirs["images_per_s"])
        assert target["met"] == (target["value"] >= bench.TARGET_SPEEDUP)
    # DiNAT's bf16 matmuls run as float32 ones on CPUs without bf16 instructions: its row names that rate.
    # Whether this CPU has them, asked of torch directly (where torch cannot tell, DiNAT keeps oneDNN's bf16)
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    as_float32 = all(callable(check) for check in checks) and not any(check() for check in checks)
    bf16 = {name: bench._find(results["rows"], part="models", mode="inference bf16 autocast", model=name)
            for name in ("DiNAT-mini", "ConvNeXt-T")}
    assert bf16["DiNAT-mini"]["gemm_dtype"] == ("float32" if as_float32 else "bfloat16")
    assert bf16["ConvNeXt-T"]["gemm_dtype"] == "bfloat16"
    out = capsys.readouterr().out
    assert "| inference bf16 autocast |" in out and "DiNAT-mini / Swin-T" in out and "1.4x target" in out
    assert ("its bf16 row is set against the float32 rate" in out) == as_float32


def test_allocator_settings_are_recorded_and_printed(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "LD_PRELOAD"]:
        monkeypatch.delenv(name)
    results = {"rows": [], "machine": bench.machine(1),
               "settings": {"dinat": "DiNAT-mini", "peers": [], "threads": 1, "rounds": 1, "batch": 1, "size": 224,
                            "backbone_size": 224}}
    assert results["machine"]["allocator"] == {} and "Allocator settings" not in bench.format_markdown(results)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    results["machine"] = bench.machine(1)
    assert results["machine"]["allocator"] == {"MALLOC_TRIM_THRESHOLD_": "1073741824"}
    assert "Allocator settings: MALLOC_TRIM_THRESHOLD_=1073741824." in bench.format_markdown(results)


@pytest.mark.parametrize("argv, message", [
    (["--parts", "everything"], "--parts must be"),
    (["--model", "huge"], "--model must be a DiNAT preset"),
    (["--peers", "resnet-50"], "--peers must be"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--compile-modes", "fast"], "--compile-modes must be"),
    (["--compile-rounds", "0"], "--compile-rounds must be >= 1"),
    (["--compile-options", "[1]"], "--compile-options must be a JSON object"),
    (["--compile-options", '{"no_such_option": 1}'], "not an inductor option: no_such_option"),
    (["--compile-options", '{"reorder_for_peak_memory": false}', "--compile-backend", "aot_eager"],
     "--compile-options are inductor's options"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinat bench: error: ") and message in err and "\n" not in err


def _tiny_contenders() -> list[bench.Contender]:
    from transformers import ConvNextConfig, ConvNextForImageClassification, SwinConfig, SwinForImageClassification

    from dinat import DinatConfig, DinatForImageClassification

    # 1000 classes: bench.compile_cases labels its images with ImageNet classes
    dinat = DinatConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], kernel_size=3,
                        dilations=[[1], [1], [1], [1]], num_labels=1000)
    convnext = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=1000)
    swin = SwinConfig(image_size=64, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                      num_labels=1000)
    return [bench.Contender("tiny DiNAT", lambda: DinatForImageClassification(dinat), None),
            bench.Contender("tiny ConvNeXt", lambda: ConvNextForImageClassification(convnext), None),
            bench.Contender("tiny Swin", lambda: SwinForImageClassification(swin), None)]


def test_every_compiled_case_runs_compiled_when_several_models_are_compiled():
    # transformers' models share one decorated forward, and dynamo's recompile limit on it (8) would make the
    # later models run eagerly, without an error, and be timed as compiled: each timed call must run a graph
    calls = []

    def counting_backend(graph, example_inputs):
        def run(*args):
            calls.append(1)
            return graph.forward(*args)
        return run

    contenders, modes = _tiny_contenders(), ["inference fp32", "training step fp32"]
    with bench.compile_room(len(contenders) * len(modes)):
        cases = bench.compile_cases(contenders, 2, 64, modes, counting_backend, lambda _: None)
        compiled = [case for case in cases if case.extra["compiled"]]
        assert len(compiled) == len(contenders) * len(modes)
        for case in compiled:
            before = len(calls)
            case.fn()
            assert len(calls) > before, f"{case.model} ({case.mode}) ran eagerly"


def test_compile_options_reach_torch_compile_and_the_tables(monkeypatch):
    options = {"reorder_for_peak_memory": False}
    seen = []

    def recording_compile(model, **kwargs):
        seen.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    cases = bench.compile_cases(_tiny_contenders()[:1], 2, 64, ["inference fp32"], "inductor", lambda _: None, options)
    assert seen == [{"backend": "inductor", "options": options}]
    rows = []
    for case, images_per_s in zip(cases, (10.0, 12.5)):
        rows.append(dict(part="compile", mode=case.mode, model=case.model, images_per_s=images_per_s, **case.extra))
    results = {"rows": rows, "machine": bench.machine(1),
               "settings": {"dinat": "tiny DiNAT", "peers": [], "threads": 1, "rounds": 1, "batch": 2, "size": 64,
                            "backbone_size": 64}}
    tables = bench.format_markdown(results)
    assert 'torch.compile (backend inductor, options {"reorder_for_peak_memory": false}), batch 2' in tables
    assert "| tiny DiNAT | inference fp32 | 10.0 | 12.5 | 1.25x |" in tables
