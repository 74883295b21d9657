"""benchmarks/: the developer benchmark runs end to end on a tiny DiNAT and writes JSON, tables and charts;
the reference-stack runner refuses an environment without the reference stack in one line.

Run as a maintainer runs them (subprocesses of the scripts); no timing is asserted.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FOUR_STAGES, tiny_batch, tiny_config, tiny_model

from dinat.ops import cpp_backend

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_benchmark_runs_every_part_on_a_tiny_dinat(tmp_path):
    config_dir = tmp_path / "tiny-dinat"
    tiny_config(**FOUR_STAGES, num_labels=1000).save_pretrained(config_dir)
    output, markdown, charts = tmp_path / "bench.json", tmp_path / "tables.md", tmp_path / "charts"
    result = run("benchmark.py", "--model", str(config_dir), "--peers", "", "--batch", "2", "--size", "64",
                 "--backbone-size", "64", "--scaling-sizes", "64,96", "--op-batch", "1", "--op-dtypes", "float32",
                 "--memory-batch", "1", "--rounds", "1", "--compile-rounds", "2", "--min-run-time", "0.01",
                 "--threads", "1", "--compile-backend", "aot_eager", "--output", str(output),
                 "--markdown", str(markdown), "--plot", str(charts), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(output.read_text())
    parts = {row["part"] for row in results["rows"]}
    assert parts == {"gemm", "models", "compile", "latency", "backbone", "ops", "scaling", "memory"}
    compiled = [r for r in results["rows"] if r["part"] == "compile" and r["compiled"]]
    assert {r["mode"] for r in compiled} == {"inference fp32", "training step fp32"}
    assert all(r["compile_backend"] == "aot_eager" and r["compile_s"] > 0 for r in compiled)
    assert results["settings"]["compile_rounds"] == 2
    assert sorted(r["size"] for r in results["rows"] if r["part"] == "scaling") == [64, 96]
    # every DiNAT-mini stage shape, both passes, and the linear-layer yardstick per stage
    ops = [r for r in results["rows"] if r["part"] == "ops"]
    assert {r["stage"] for r in ops} == {"stage1", "stage2", "stage3", "stage4"}
    assert {(r["stage"], r["dilation"], r["pass"]) for r in ops if r["model"] == "torch"} >= {
        ("stage1", 8, "forward+backward"), ("stage4", 1, "forward")}
    assert all(r["peak_memory_mib"] > 0 for r in results["rows"] if r["part"] == "memory")
    tables = markdown.read_text()
    assert "| stage1 (56x56 x2 heads) | 8 |" in tables and "compiled / eager" in tables
    assert "backend aot_eager), batch 2, 2 interleaved rounds" in tables
    assert {p.name for p in charts.iterdir()} == {"performance_models.png", "performance_scaling.png"}
    assert all(p.read_bytes()[:8] == PNG for p in charts.iterdir())
    # the tables again from the JSON alone, and the charts script alone
    again = run("benchmark.py", "--report", str(output), "--markdown", str(tmp_path / "again.md"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.md").read_text() == tables
    again = run("plot.py", str(output), "--out-dir", str(tmp_path / "again"), "--prefix", "x", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "x_models.png").read_bytes()[:8] == PNG


def test_reference_stack_needs_its_own_environment(tmp_path):
    # this environment has transformers 5 and no NATTEN 0.17: both scripts say so in one line, before measuring
    result = run("reference_stack.py", "--check", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("reference_stack.py: ") and result.stderr.count("\n") == 1
    result = run("benchmark.py", "--reference-python", sys.executable, "--parts", "models", cwd=tmp_path)
    assert result.returncode == 1
    assert "benchmark.py: error: " in result.stderr and "reference" in result.stderr
    assert not (tmp_path / "bench-results").exists()


def test_breakdown_sorts_a_tiny_dinats_time_into_kinds_of_op(tmp_path):
    config_dir = tmp_path / "tiny-dinat"
    tiny_config(**FOUR_STAGES, num_labels=1000).save_pretrained(config_dir)
    result = run("breakdown.py", "--model", str(config_dir), "--peers", "", "--batch", "2", "--size", "64",
                 "--rounds", "1", "--min-run-time", "0.01", "--iterations", "1", "--threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| DiNAT")]
    assert [r[1].strip() for r in rows] == ["inference fp32", "training step fp32"]
    for row in rows:
        total = float(row[2])
        kinds = [float(cell.split("(")[0]) for cell in row[3:]]
        assert len(kinds) == 5 and abs(sum(kinds) - total) <= 0.4  # the kinds split the whole (each to 0.1 ms)
        assert kinds[0] > 0 and kinds[1] > 0  # linear layers and neighborhood attention both ran


def _breakdown_category():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from breakdown import category
    finally:
        sys.path.remove(str(BENCHMARKS))
    return category


def test_breakdown_names_the_kind_of_each_op():
    category = _breakdown_category()
    assert category("dinat::na2d_cpp_packed_backward") == "attention"
    # the training forward: the profiler records the op's autograd Function, not the op
    assert category("GeneratedBackwardFor_dinat_na2d_cpp_packed_default") == "attention"
    assert category("mkldnn::_linear_pointwise") == category("aten::addmm") == category("aten::mm") == "linear"
    assert category("aten::convolution_backward") == category("aten::mkldnn_convolution") == "convolution"
    assert category("aten::native_layer_norm_backward") == "normalization"
    assert category("aten::gelu") == "other"


def test_breakdown_counts_the_attention_forward_of_a_training_step_as_attention():
    if cpp_backend.unavailable_reason() is not None:
        pytest.skip(cpp_backend.unavailable_reason())
    category = _breakdown_category()
    model = tiny_model(**FOUR_STAGES).train()
    pixels, labels = tiny_batch()
    with torch.profiler.profile() as prof:
        model(pixels, labels=labels).loss.backward()
    names = {event.key for event in prof.key_averages() if "na2d" in event.key}
    assert any(not name.lower().endswith("backward") for name in names), names  # the forward is among them
    assert {name: category(name) for name in names} == dict.fromkeys(names, "attention")
