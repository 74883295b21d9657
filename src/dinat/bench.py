"""`dinat bench` / `python -m dinat.bench`: neighborhood-attention and DiNAT throughput on this machine.

Three parts, each printed as a markdown table and written together as JSON:
  ops      na2d per available backend and peer (NATTEN >= 0.20 `na2d`, without RPB), float32 and bfloat16,
           forward and forward+backward, at the four stage shapes of DiNAT-mini at 224; plus the stage-1
           layer's linear layers (q/k/v, proj, MLP) for comparison.
  models   DiNAT-mini and -tiny at 224, batch 1 and 8: inference float32 and bfloat16 autocast, a training
           step (forward, cross-entropy, backward, SGD step), and the training step's peak memory.
  scaling  DiNAT-mini inference time per image at 224 .. 1024 (with `--plot FILE.png`, a chart).

Each timing is the median of `--repeat` runs after a warm-up (the best run is kept too). Peak memory is
the peak resident set of a fresh subprocess during its second training step, less its resident set before
the first (Linux /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ops
from .configuration_dinat import PRESETS, DinatConfig
from .modeling_dinat import DinatForImageClassification
from .ops import dispatch

# DiNAT-mini at 224: (name, height = width, heads, dilations used in the stage); head_dim 32, K = 7
MINI_STAGES = [("stage1", 56, 2, (1, 8)), ("stage2", 28, 4, (1, 4)), ("stage3", 14, 8, (1, 2)), ("stage4", 7, 16, (1,))]
HEAD_DIM, KERNEL = 32, 7
RESOLUTIONS = (224, 384, 512, 768, 1024)
# the reference stack (transformers 4.46.3 + NATTEN 0.17.5 CPU kernels) measured on this kind of 2-core
# machine, DiNAT-mini 224 batch 8 float32 (from the project's issue); used only when it is not installed
REFERENCE_IMAGES_PER_S = {"inference_fp32": 0.42, "train_fp32": 0.15}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def measure(fn: Callable[[], object], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median and best time (seconds; wall clock, or this process's CPU time with --clock cpu) of `repeat`
    calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return {"median_s": statistics.median(times), "best_s": min(times), "runs": repeat}


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "natten": dispatch.natten_label(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d %H:%M")}


# -- op level -----------------------------------------------------------------------------------------
def _op_runners(batch: int, height: int, heads: int, dilation: int, dtype: torch.dtype):
    """(label, needs RPB?, backend) rows to time: every backend with RPB (DiNAT's layer), and without it
    where only that runs (NATTEN >= 0.20)."""
    rows = []
    for backend in dispatch.BACKENDS:
        probe = torch.zeros(batch, heads, height, height, HEAD_DIM, dtype=dtype)
        for has_rpb in (True, False):
            if dispatch.why_not(backend, probe, has_rpb, needs_grad=False) is None:
                rows.append((backend, has_rpb))
                break
    return rows


def bench_ops(batch: int, repeat: int, dtypes: list[torch.dtype], include_flex_cpu: bool) -> list[dict]:
    results = []
    for stage, height, heads, dilations in MINI_STAGES:
        for dilation in dilations:
            for dtype in dtypes:
                for backend, has_rpb in _op_runners(batch, height, heads, dilation, dtype):
                    if backend == "flex" and not include_flex_cpu:
                        continue  # eager flex on CPU materializes all (H*W)^2 scores: not a speed path
                    results += _bench_one_op(stage, batch, height, heads, dilation, dtype, backend, has_rpb, repeat)
        results.append(_bench_linear(stage, batch, height, heads, repeat))
    return results


def _bench_one_op(stage, batch, height, heads, dilation, dtype, backend, has_rpb, repeat) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, height, height, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=g).to(dtype) if has_rpb else None
    base = {"part": "op", "stage": stage, "shape": [batch, heads, height, height, HEAD_DIM], "dilation": dilation,
            "dtype": str(dtype).replace("torch.", ""), "backend": backend, "rpb": has_rpb}
    rows = []
    with torch.no_grad():
        timing = measure(lambda: ops.na2d(q, k, v, KERNEL, dilation, rpb=rpb, backend=backend), repeat)
    rows.append({**base, "pass": "forward", **timing})
    leaves = [t.detach().requires_grad_() for t in (q, k, v) + ((rpb,) if has_rpb else ())]
    if dispatch.why_not(backend, leaves[0], has_rpb, needs_grad=True) is None:
        grad = torch.randn_like(q)

        def forward_backward():
            out = ops.na2d(*leaves[:3], KERNEL, dilation, rpb=leaves[3] if has_rpb else None, backend=backend)
            torch.autograd.grad(out, leaves, grad)

        rows.append({**base, "pass": "forward+backward", **measure(forward_backward, repeat)})
    else:
        rows.append({**base, "pass": "forward+backward", "skipped": dispatch.why_not(backend, leaves[0], has_rpb, True)})
    return rows


def _bench_linear(stage, batch, height, heads, repeat) -> dict:
    """The same layer's linear layers (fused q/k/v, proj, MLP 3x) at float32, forward: the yardstick for NA."""
    dim = heads * HEAD_DIM
    x = torch.randn(batch, height, height, dim)
    w_qkv, w_proj = torch.randn(3 * dim, dim), torch.randn(dim, dim)
    w_fc1, w_fc2 = torch.randn(3 * dim, dim), torch.randn(dim, 3 * dim)

    def linears():
        F.linear(x, w_qkv)
        F.linear(x, w_proj)
        F.linear(F.linear(x, w_fc1), w_fc2)

    with torch.no_grad():
        timing = measure(linears, repeat)
    return {"part": "op", "stage": stage, "shape": [batch, height, height, dim], "dtype": "float32",
            "backend": "linear layers (qkv+proj+mlp)", "pass": "forward", "dilation": None, "rpb": None, **timing}


# -- model level ----------------------------------------------------------------------------------------
def _model(preset: str) -> DinatForImageClassification:
    torch.manual_seed(0)
    return DinatForImageClassification(DinatConfig.from_preset(preset, num_labels=1000))


def bench_models(presets: list[str], batches: list[int], repeat: int, size: int = 224,
                 memory: bool = True) -> list[dict]:
    results = []
    for preset in presets:
        model = _model(preset)
        for batch in batches:
            pixels = torch.randn(batch, 3, size, size)
            labels = torch.randint(0, 1000, (batch,))
            base = {"part": "model", "model": f"dinat-{preset}", "size": size, "batch": batch}
            model.eval()
            with torch.inference_mode():
                timing = measure(lambda: model(pixels), repeat)
                results.append({**base, "mode": "inference fp32", **timing, "images_per_s": batch / timing["median_s"]})
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    timing = measure(lambda: model(pixels), repeat)
                results.append({**base, "mode": "inference bf16 autocast", **timing,
                                "images_per_s": batch / timing["median_s"]})
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

            def train_step():
                optimizer.zero_grad(set_to_none=True)
                model(pixels, labels=labels).loss.backward()
                optimizer.step()

            timing = measure(train_step, max(1, repeat // 2 + 1))
            row = {**base, "mode": "training step fp32", **timing, "images_per_s": batch / timing["median_s"]}
            if memory:
                try:
                    row["peak_memory_mib"] = training_peak_memory_mib(preset, batch, size)
                except subprocess.CalledProcessError as err:
                    row["peak_memory_error"] = (err.stderr or "").strip().splitlines()[-1:] or ["failed"]
            results.append(row)
            model.zero_grad(set_to_none=True)
    return results


def memory_row(preset: str, batch: int, size: int = 224) -> dict:
    """Only the training-step peak memory (for batches too large to time here)."""
    row = {"part": "memory", "model": f"dinat-{preset}", "size": size, "batch": batch, "mode": "training step fp32"}
    try:
        row["peak_memory_mib"] = training_peak_memory_mib(preset, batch, size)
    except subprocess.CalledProcessError as err:
        row["peak_memory_error"] = (err.stderr or "").strip().splitlines()[-1:] or ["failed"]
    return row


def training_peak_memory_mib(preset: str, batch: int, size: int = 224) -> float:
    """Growth of the peak resident set over one training step (after a warm-up step), in a fresh process."""
    code = (f"import torch, dinat.bench as b; torch.set_num_threads({torch.get_num_threads()}); "
            f"print(b._peak_in_this_process({preset!r}, {batch}, {size}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _peak_in_this_process(preset: str, batch: int, size: int) -> float:
    model = _model(preset).train()
    pixels, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    before = _rss_mib()
    model(pixels, labels=labels).loss.backward()  # warm-up: one-time allocations
    model.zero_grad(set_to_none=True)
    # the peak-RSS mark is inherited from the parent process: reset it (Linux: "5" > clear_refs)
    Path("/proc/self/clear_refs").write_text("5")
    model(pixels, labels=labels).loss.backward()
    return _status_mib("VmHWM") - before


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- the reference stack, in its own interpreter ------------------------------------------------------------
# transformers 4.x and this package's transformers 5.x cannot share an environment, so the reference
# (transformers 4.46 + NATTEN 0.17) runs in another Python given by --reference-python. The snippet bridges
# the import gaps of NATTEN 0.17 on a current CPU-only torch without replacing any kernel.
_REFERENCE_SNIPPET = r"""
import json, os, sys, time, typing
import torch
if not hasattr(torch.cuda, "_device_t"):
    torch.cuda._device_t = typing.Union[torch.device, str, int, None]
if not torch.cuda.is_available():
    torch.cuda.get_device_capability = lambda *a, **k: (0, 0)
import natten, natten.functional as nf
if not hasattr(nf, "natten2dqkrpb"):  # 0.17 renamed the ops transformers 4.x imports
    nf.natten2dqkrpb = lambda q, k, rpb, ks, dil: nf.na2d_qk(q, k, ks, dil, rpb=rpb)
    nf.natten2dav = lambda a, v, ks, dil: nf.na2d_av(a, v, ks, dil)
import transformers
from transformers import DinatConfig, DinatForImageClassification
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
clock = time.process_time if args["clock"] == "cpu" else time.perf_counter
torch.manual_seed(0)
model = DinatForImageClassification(DinatConfig(**args["config"]))
def measure(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = clock(); fn(); times.append(clock() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "best_s": times[0], "runs": repeat}
def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
if args["mode"] == "memory":
    model.train()
    pixels = torch.randn(args["batch"], 3, args["size"], args["size"])
    labels = torch.randint(0, 1000, (args["batch"],))
    before = status_mib("VmRSS")
    model(pixels, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    open("/proc/self/clear_refs", "w").write("5")
    model(pixels, labels=labels).loss.backward()
    print(json.dumps({"peak_memory_mib": status_mib("VmHWM") - before}))
    sys.exit(0)
pixels = torch.randn(args["batch"], 3, args["size"], args["size"])
labels = torch.randint(0, 1000, (args["batch"],))
rows = []
model.eval()
with torch.inference_mode():
    rows.append({"mode": "inference fp32", **measure(lambda: model(pixels), args["repeat"])})
model.train()
def step():
    model.zero_grad(set_to_none=True)
    model(pixels, labels=labels).loss.backward()
rows.append({"mode": "training step fp32", **measure(step, max(1, args["repeat"] // 2 + 1))})
print(json.dumps({"versions": {"transformers": transformers.__version__, "natten": natten.__version__},
                  "rows": rows}))
"""


def bench_reference(python: str, preset: str, batch: int, repeat: int, clock: str,
                    memory_batch: int = 0) -> list[dict]:
    """DiNAT `preset` on the reference stack in interpreter `python`: inference and training step, and the
    training-step peak memory at `memory_batch` (0: skip)."""
    config = {k: v for k, v in PRESETS[preset].items()} | {"num_labels": 1000}
    common = {"config": config, "size": 224, "threads": torch.get_num_threads(), "clock": clock}

    def call(extra):
        result = subprocess.run([python, "-c", _REFERENCE_SNIPPET, json.dumps({**common, **extra})],
                                capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or "").strip().splitlines()[-1:] or ["failed"]
            raise ValueError(f"the reference stack in {python} failed: {tail[0]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    output = call({"mode": "time", "batch": batch, "repeat": repeat})
    label = "reference (transformers {transformers} + NATTEN {natten})".format(**output["versions"])
    rows = [{"part": "model", "model": f"dinat-{preset}", "size": 224, "batch": batch, "stack": label, **row,
             "images_per_s": batch / row["median_s"]} for row in output["rows"]]
    if memory_batch:
        peak = call({"mode": "memory", "batch": memory_batch, "repeat": 1})["peak_memory_mib"]
        rows.append({"part": "memory", "model": f"dinat-{preset}", "size": 224, "batch": memory_batch,
                     "mode": "training step fp32", "stack": label, "peak_memory_mib": peak})
    return rows


# -- resolution scaling -----------------------------------------------------------------------------------
def bench_scaling(repeat: int, resolutions=RESOLUTIONS) -> list[dict]:
    model = _model("mini").eval()
    results = []
    with torch.inference_mode():
        for size in resolutions:
            pixels = torch.randn(1, 3, size, size)
            timing = measure(lambda: model(pixels), repeat)
            results.append({"part": "scaling", "model": "dinat-mini", "size": size, "batch": 1, **timing,
                            "ms_per_image": 1e3 * timing["median_s"],
                            "us_per_megapixel": 1e6 * timing["median_s"] / (size * size / 1e6) / 1e3})
    return results


def plot_scaling(rows: list[dict], path: Path) -> None:
    """A small line chart of time per image against resolution (PIL only)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 440, 80, 30, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    sizes = [r["size"] for r in rows]
    times = [r["ms_per_image"] for r in rows]
    pixels = [s * s for s in sizes]
    x_max, y_max = max(pixels) * 1.05, max(times) * 1.1

    def point(px, ms):
        return (left + (width - left - right) * px / x_max, height - bottom - (height - top - bottom) * ms / y_max)

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black", width=2)
    for s, px in zip(sizes, pixels):
        x, _ = point(px, 0)
        draw.line([(x, height - bottom), (x, height - bottom + 5)], fill="black")
        draw.text((x - 12, height - bottom + 8), str(s), fill="black")
    for i in range(6):
        ms = y_max * i / 5
        _, y = point(0, ms)
        draw.line([(left - 5, y), (left, y)], fill="black")
        draw.text((8, y - 6), f"{ms:.0f} ms", fill="black")
    # the linear fit through the origin and the largest size: where perfectly linear scaling would lie
    slope = times[-1] / pixels[-1]
    draw.line([point(0, 0), point(x_max, slope * x_max)], fill=(170, 170, 170), width=1)
    draw.line([point(p, t) for p, t in zip(pixels, times)], fill=(31, 119, 180), width=3)
    for p, t in zip(pixels, times):
        x, y = point(p, t)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(31, 119, 180))
        draw.text((x - 20, y - 20), f"{t:.0f}", fill=(31, 119, 180))
    draw.text((left, 12), "DiNAT-mini inference, batch 1, float32: time per image (ms) against resolution",
              fill="black")
    draw.text((left + 40, height - 22), "image side in pixels (axis spaced by pixel count); grey line: time "
              "proportional to pixel count", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# -- tables -------------------------------------------------------------------------------------------------
def _ms(row, key="median_s"):
    return f"{1e3 * row[key]:.1f}" if key in row else "n/a"


def format_tables(results: dict) -> str:
    lines = []
    info = results["machine"]
    lines.append(f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
                 f"{info['natten']}, {info['date']}, {info.get('clock', 'wall')} clock")
    op_rows = [r for r in results["rows"] if r["part"] == "op"]
    if op_rows:
        lines += ["", "| stage | shape | dilation | dtype | backend | pass | median ms | best ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in op_rows:
            backend = r["backend"] + ("" if r["rpb"] in (True, None) else " (no RPB)")
            note = f"skipped: {r['skipped']}" if "skipped" in r else None
            lines.append(f"| {r['stage']} | {'x'.join(map(str, r['shape']))} | {r['dilation'] or '-'} | {r['dtype']} | "
                         f"{backend} | {r['pass']} | {note or _ms(r)} | {'' if note else _ms(r, 'best_s')} |")
    model_rows = [r for r in results["rows"] if r["part"] == "model"]
    if model_rows:
        lines += ["", "| model | size | batch | mode | images/s | median ms | best ms | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in model_rows:
            peak = f"{r['peak_memory_mib']:.0f}" if "peak_memory_mib" in r else ("failed" if "peak_memory_error" in r else "")
            model = r["model"] + (f" on the {r['stack']}" if "stack" in r else "")
            lines.append(f"| {model} | {r['size']} | {r['batch']} | {r['mode']} | {r['images_per_s']:.2f} | "
                         f"{_ms(r)} | {_ms(r, 'best_s')} | {peak} |")
    for r in results["rows"]:
        if r["part"] == "memory":
            peak = f"{r['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in r else f"failed: {r['peak_memory_error']}"
            model = r["model"] + (f" on the {r['stack']}" if "stack" in r else "")
            lines += ["", f"Training-step peak memory, {model} {r['size']}, batch {r['batch']}: {peak}"]
    scaling = [r for r in results["rows"] if r["part"] == "scaling"]
    if scaling:
        base = scaling[0]["median_s"] / scaling[0]["size"] ** 2
        lines += ["", f"| size | ms / image | time per pixel vs {scaling[0]['size']} |", "|---|---|---|"]
        for r in scaling:
            lines.append(f"| {r['size']} | {r['ms_per_image']:.1f} | {r['median_s'] / r['size'] ** 2 / base:.2f}x |")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------------
def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--parts", default="ops,models,scaling",
                        help="comma-separated: ops, models, scaling (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default), or cpu: this process's CPU time, steadier on a shared machine with "
                             "--threads 1 (with more threads it adds up every thread's time)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the op-level shapes")
    parser.add_argument("--models", default="mini,tiny", help="presets for the model part")
    parser.add_argument("--batches", default="1,8", help="batch sizes for the model part")
    parser.add_argument("--sizes", default=",".join(map(str, RESOLUTIONS)), help="resolutions for the scaling part")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="op-level dtypes")
    parser.add_argument("--flex-cpu", action="store_true", help="also time eager flex attention on CPU (slow)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-batch", type=int, default=32,
                        help="also measure the training-step peak memory of DiNAT-mini at this batch (0: skip)")
    parser.add_argument("--reference-python", default=None,
                        help="a Python whose environment has the reference stack (transformers 4.46 + NATTEN 0.17): "
                             "DiNAT-mini is measured there too, side by side")
    parser.add_argument("--output", type=Path, default=Path("bench-results/bench.json"), help="JSON file to write")
    parser.add_argument("--plot", type=Path, default=None, help="write the scaling chart to this PNG")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `dinat bench`."""
    parser = subparsers.add_parser("bench", help="benchmark neighborhood attention and DiNAT on this machine",
                                   description=__doc__.split("\n\n")[0])
    return _configure(parser)


def _parse_list(text: str, kind, name: str, allowed=None) -> list:
    try:
        values = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--{name}: could not read {text!r} as a comma-separated list") from None
    if not values or (allowed is not None and any(v not in allowed for v in values)):
        raise ValueError(f"--{name} must be a comma-separated list of {sorted(allowed) if allowed else kind.__name__}, "
                         f"got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    parts = _parse_list(args.parts, str, "parts", {"ops", "models", "scaling"})
    presets = _parse_list(args.models, str, "models", set(PRESETS))
    batches = _parse_list(args.batches, int, "batches")
    sizes = _parse_list(args.sizes, int, "sizes")
    dtypes = [getattr(torch, name) for name in _parse_list(args.dtypes, str, "dtypes", {"float32", "bfloat16", "float16"})]
    if args.repeat < 1 or args.batch < 1 or any(b < 1 for b in batches) or any(s < 32 for s in sizes):
        raise ValueError("--repeat, --batch and --batches must be >= 1 and --sizes >= 32")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    global _clock
    _clock = CLOCKS[args.clock]
    results = {"machine": {**machine(), "clock": args.clock}, "reference_images_per_s": REFERENCE_IMAGES_PER_S,
               "rows": []}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    print(format_tables(results), flush=True)
    steps = {"ops": lambda: bench_ops(args.batch, args.repeat, dtypes, args.flex_cpu),
             "models": lambda: bench_models(presets, batches, args.repeat, memory=not args.no_memory)
             + ([] if args.no_memory or not args.memory_batch else [memory_row("mini", args.memory_batch)]),
             "scaling": lambda: bench_scaling(max(1, args.repeat // 2), sizes)}
    if args.reference_python:
        steps["models"] = (lambda models=steps["models"]: models() + bench_reference(
            args.reference_python, "mini", 8, min(args.repeat, 2), args.clock,
            0 if args.no_memory else args.memory_batch))
    for part in ("ops", "models", "scaling"):
        if part in parts:
            rows = steps[part]()
            results["rows"] += rows
            print(format_tables({"machine": results["machine"], "rows": rows}).split("\n", 1)[1], flush=True)
            args.output.write_text(json.dumps(results, indent=1))  # partial results survive an interruption
    if "scaling" in parts and args.plot is not None:
        plot_scaling([r for r in results["rows"] if r["part"] == "scaling"], args.plot)
    print(f"\nwrote {args.output}" + (f" and {args.plot}" if args.plot and "scaling" in parts else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="python -m dinat.bench", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as err:
        print(f"dinat bench: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
