"""`dinat bench`: DiNAT beside the backbones users pick instead, measured side by side on this machine.

DiNAT (a preset or a config file) and transformers' ConvNeXt-T and Swin-T (their config defaults), random
weights, one process, the same batch, resolution, threads and dtype. Parts (`--parts`):

  models    inference float32, inference bfloat16 autocast and a float32 training step (forward,
            cross-entropy, backward, SGD step): images/s, DiNAT / peer and the 1.4x target
  gemm      a 2048x2048 matmul in float32 and bfloat16 (this machine's GEMM rate) and each model's FLOPs
            (torch.utils.flop_counter): the fraction of the GEMM rate each model reaches
  compile   torch.compile against eager, inference and training step, in the same rounds (--compile-rounds)
  latency   batch-1 inference, float32 and bfloat16 autocast
  backbone  backbone inference (the four stages' feature maps) at detection sizes (--backbone-size)

Timing uses torch.utils.benchmark: a Timer per measurement with --threads, `blocked_autorange` (its
block-size estimate is the warm-up). Every part runs in rounds; each round measures every model once,
in a rotating order, so that noise on a shared machine hits all of them alike. Reported: the median over
all rounds' blocks and its interquartile range. Developer tooling (op level, resolution scaling, memory,
the reference stack, charts) lives in the repository's benchmarks/ folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from .configuration_dinat import PRESETS, DinatConfig
from .ops import bfloat16

PARTS = ("gemm", "models", "compile", "latency", "backbone")
TARGET_SPEEDUP = 1.4  # DiNAT images/s over each peer's, per mode of the models part
# the compile part's rounds: a training step is one call of about a second, and compiled and eager differ by a
# few percent
COMPILE_ROUNDS = 8
GEMM_SIZE = 2048
STAGES = ["stage1", "stage2", "stage3", "stage4"]
MODES = ("inference fp32", "inference bf16 autocast", "training step fp32")


# -- the models ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contender:
    """A model family to measure: a display name and how to build its classifier and its backbone."""

    name: str
    classifier: Callable[[], torch.nn.Module]
    backbone: Callable[[], torch.nn.Module]
    # the GEMM its bf16-autocast matmuls run: DiNAT's run in float32 on CPUs without bf16 instructions
    bf16_gemm_dtype: str = "bfloat16"


def dinat_contender(model: str) -> Contender:
    """DiNAT from a preset name ("mini") or a DinatConfig JSON file / folder (your own variant)."""
    from .modeling_dinat import DinatBackbone, DinatForImageClassification

    if model in PRESETS:
        def config(**kw):
            return DinatConfig.from_preset(model, **kw)
        name = f"DiNAT-{model}"
    elif Path(model).exists():
        def config(**kw):
            return DinatConfig.from_pretrained(model, **kw)
        name = f"DiNAT ({Path(model).name})"
    else:
        raise ValueError(f"--model must be a DiNAT preset ({', '.join(PRESETS)}) or a config file, got {model!r}")
    return Contender(name, lambda: DinatForImageClassification(config(num_labels=1000)),
                     lambda: DinatBackbone(config(out_features=STAGES)),
                     "float32" if bfloat16.runs_as_float32(torch.bfloat16) else "bfloat16")


def _convnext() -> Contender:
    from transformers import ConvNextBackbone, ConvNextConfig, ConvNextForImageClassification

    def backbone():
        config = ConvNextConfig(out_features=STAGES)
        config.hidden_sizes = list(config.hidden_sizes)  # transformers 5.24's backbone adds it to a list
        return ConvNextBackbone(config)

    return Contender("ConvNeXt-T", lambda: ConvNextForImageClassification(ConvNextConfig(num_labels=1000)), backbone)


def _swin() -> Contender:
    from transformers import SwinBackbone, SwinConfig, SwinForImageClassification

    return Contender("Swin-T", lambda: SwinForImageClassification(SwinConfig(num_labels=1000)),
                     lambda: SwinBackbone(SwinConfig(out_features=STAGES)))


# transformers' defaults of these configs are the -tiny variants (the paper's 4.5 GMAC peers)
PEERS: dict[str, Callable[[], Contender]] = {"convnext-tiny": _convnext, "swin-tiny": _swin}


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build()


# -- timing -----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One thing to time: `fn` runs once per call and processes `batch` images."""

    part: str
    mode: str
    model: str
    batch: int
    size: int
    fn: Callable[[], object]
    flops: float | None = None  # per call (FlopCounterMode), for the fraction of the GEMM rate
    gemm_dtype: str = "float32"  # the GEMM rate it is compared with
    extra: dict = field(default_factory=dict)

    def key(self) -> tuple[str, str, str]:
        return self.part, self.mode, self.model


def run_rounds(cases: list[Case], rounds: int, threads: int, min_run_time: float,
               progress: Callable[[str], None] = lambda _: None) -> dict[tuple, benchmark.Measurement]:
    """Time every case once per round, rotating the order each round; merge each case's rounds."""
    collected: dict[tuple, list[benchmark.Measurement]] = {case.key(): [] for case in cases}
    for r in range(rounds):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            timer = benchmark.Timer(stmt="fn()", globals={"fn": case.fn}, num_threads=threads,
                                    label=case.part, sub_label=case.mode, description=case.model)
            collected[case.key()].append(timer.blocked_autorange(min_run_time=min_run_time))
        progress(f"  {cases[0].part}: round {r + 1}/{rounds} done")
    return {key: benchmark.Measurement.merge(ms)[0] for key, ms in collected.items()}


def _na2d_flops(q_shape, k_shape, v_shape, rpb_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    """Neighborhood attention's nominal FLOPs: q.k and attention.v over each query's K*K window."""
    batch, heads, height, width, dim = q_shape
    return 2 * 2 * batch * heads * height * width * kernel_size[0] * kernel_size[1] * dim


def _linear_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """oneDNN's linear with a fused epilogue: the matmul's FLOPs."""
    return 2 * prod(x_shape) * w_shape[0]


def _flop_formulas() -> dict:
    """FLOP formulas for ops torch's counter does not know: this package's fused NA op (counted at its
    nominal cost, whatever tiles the kernel computes) and oneDNN's fused linear."""
    formulas = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        formulas[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flops
    try:
        formulas[torch.ops.dinat.na2d] = _na2d_flops
    except (AttributeError, RuntimeError):  # not registered (yet): its matmuls are counted as they run
        pass
    return formulas


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of `fn` as torch's FLOP counter sees them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter:
        fn()
    return float(counter.get_total_flops())


def forward_flops(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one image's forward pass. Counted with autograd on (the paths a training step takes), in
    eval mode; a training step is counted as 3x this (the backward pass costs twice the forward: torch's
    counter overcounts depthwise-convolution backward, so it is not used for that)."""
    was_training = model.training
    model.eval()
    try:
        return count_flops(lambda: model(_images(1, size)[0]))
    finally:
        model.train(was_training)


def _inference(model: torch.nn.Module, pixels: torch.Tensor, bf16: bool = False) -> Callable[[], object]:
    def call():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(pixels)
    return call


def _train_step(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def call():
        optimizer.zero_grad(set_to_none=True)
        model(pixels, labels=labels).loss.backward()
        optimizer.step()
    return call


def _images(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


# -- parts ------------------------------------------------------------------------------------------------
def gemm_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE, generator=g).to(dtype) for _ in range(2))
        name = str(dtype).replace("torch.", "")
        cases.append(Case("gemm", f"{GEMM_SIZE}x{GEMM_SIZE} matmul", name, 1, GEMM_SIZE,
                          lambda a=a, b=b: torch.mm(a, b), flops=2.0 * GEMM_SIZE ** 3, gemm_dtype=name))
    return cases


def model_cases(contenders: list[Contender], batch: int, size: int, modes=MODES, part="models") -> list[Case]:
    pixels, labels = _images(batch, size)
    cases = []
    for contender in contenders:
        eval_model = _seeded(contender.classifier).eval()
        flops = forward_flops(eval_model, size) * batch
        train_model = None
        for mode in modes:
            if mode == "training step fp32":
                train_model = train_model or _seeded(contender.classifier).train()
                cases.append(Case(part, mode, contender.name, batch, size, _train_step(train_model, pixels, labels),
                                  3 * flops, "float32"))
            else:
                bf16 = "bf16" in mode
                cases.append(Case(part, mode, contender.name, batch, size, _inference(eval_model, pixels, bf16),
                                  flops, contender.bf16_gemm_dtype if bf16 else "float32"))
    return cases


# compiled variants one compiled case may need: its model in each grad mode, and a training step's first call
# (transformers' loss sets config.problem_type) and the later ones
VARIANTS_PER_COMPILED_CASE = 4


@contextlib.contextmanager
def compile_room(cases: int) -> Iterator[None]:
    """Room in dynamo's recompile limit for `cases` compiled models, and an error where it is hit anyway.

    transformers' models (DiNAT's included) run their forward through one decorator function, and all their
    compiled variants count against that function's limit (8). Past it dynamo runs the model eagerly without
    an error, which would be timed as compiled: four models compiled in one process reach it."""
    import torch._dynamo

    limit = max(torch._dynamo.config.recompile_limit, VARIANTS_PER_COMPILED_CASE * cases)
    with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
        yield


def compile_cases(contenders: list[Contender], batch: int, size: int, modes: list[str], backend: str | Callable,
                  progress: Callable[[str], None], options: dict | None = None) -> list[Case]:
    """Eager and compiled versions of each contender and mode; the compiled ones are compiled (and run
    twice) here, so that timing sees no compilation. Compile and time them inside `compile_room`.
    `options` go to torch.compile (inductor's options)."""
    pixels, labels = _images(batch, size)
    cases = []
    for contender in contenders:
        for mode in modes:
            for compiled in (False, True):
                model = _seeded(contender.classifier)
                runner = torch.compile(model, backend=backend, options=options) if compiled else model
                if mode == "training step fp32":
                    model.train()
                    fn = _train_step(runner, pixels, labels)
                else:
                    model.eval()
                    fn = _inference(runner, pixels, "bf16" in mode)
                extra = {}
                if compiled:
                    start = time.perf_counter()
                    fn()
                    extra["compile_s"] = time.perf_counter() - start
                    fn()
                    progress(f"  compiled {contender.name} {mode} in {extra['compile_s']:.0f} s")
                label = f"{contender.name} {'compiled' if compiled else 'eager'}"
                cases.append(Case("compile", mode, label, batch, size, fn, extra=extra | {
                    "contender": contender.name, "compiled": compiled,
                    "compile_backend": getattr(backend, "__name__", backend), "compile_options": options or {}}))
    return cases


def backbone_cases(contenders: list[Contender], size: int) -> list[Case]:
    pixels, _ = _images(1, size)
    cases = []
    for contender in contenders:
        model = _seeded(contender.backbone).eval()
        cases.append(Case("backbone", "backbone inference fp32", contender.name, 1, size, _inference(model, pixels),
                          forward_flops(model, size)))
    return cases


# -- results ----------------------------------------------------------------------------------------------
def machine(threads: int) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            # the allocator decides how often large ops fault fresh pages in (docs/performance.md): say how it was set
            "allocator": {name: value for name, value in sorted(os.environ.items())
                          if name.startswith("MALLOC_") or name == "LD_PRELOAD"}}


def to_row(case: Case, m: benchmark.Measurement, gemm_rates: dict[str, float]) -> dict:
    row = {"part": case.part, "mode": case.mode, "model": case.model, "batch": case.batch, "size": case.size,
           "median_s": m.median, "iqr_s": m.iqr, "blocks": len(m.times),
           "calls": len(m.times) * m.number_per_run, "images_per_s": case.batch / m.median, **case.extra}
    if case.flops:
        row["gflop_per_image"] = case.flops / case.batch / 1e9
        row["gflop_per_s"] = case.flops / m.median / 1e9
        if case.part != "gemm" and case.gemm_dtype in gemm_rates:
            row["gemm_dtype"] = case.gemm_dtype
            row["gemm_fraction"] = row["gflop_per_s"] / gemm_rates[case.gemm_dtype]
    return row


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def summarize(rows: list[dict], dinat: str, peers: list[str]) -> list[dict]:
    """The targets: DiNAT / peer images/s >= TARGET_SPEEDUP per mode, compiled >= eager."""
    targets = []
    for mode in MODES:
        mine = _find(rows, part="models", mode=mode, model=dinat)
        for peer in peers:
            theirs = _find(rows, part="models", mode=mode, model=peer)
            if mine and theirs:
                ratio = mine["images_per_s"] / theirs["images_per_s"]
                targets.append({"target": f"{dinat} / {peer}, {mode}", "value": ratio, "goal": TARGET_SPEEDUP,
                                "met": ratio >= TARGET_SPEEDUP})
    for r in rows:
        if r["part"] == "compile" and r.get("compiled"):
            eager = _find(rows, part="compile", mode=r["mode"], contender=r["contender"], compiled=False)
            if eager:
                ratio = r["images_per_s"] / eager["images_per_s"]
                targets.append({"target": f"{r['contender']} compiled / eager, {r['mode']}", "value": ratio,
                                "goal": 1.0, "met": ratio >= 1.0})
    return targets


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def format_markdown(results: dict) -> str:
    """The results as markdown tables (what docs/performance.md shows)."""
    rows, s = results["rows"], results["settings"]
    info = results["machine"]
    dinat, peers = s["dinat"], s["peers"]
    load = " -> ".join(map(str, info.get("load_average", [])))
    out = [f"{info['cpu']}, {info['cores']} cores, {s['threads']} threads, torch {info['torch']}, transformers "
           f"{info['transformers']}, {info['date']}, load average {load}; {s['rounds']} interleaved rounds, "
           "median (IQR in the JSON)."]
    if info.get("allocator"):
        out[0] += " Allocator settings: " + ", ".join(f"{k}={v}" for k, v in info["allocator"].items()) + "."
    if results.get("targets"):
        out += ["", "### Targets", "", "| target | measured | goal | |", "|---|---|---|---|"]
        for t in results["targets"]:
            out.append(f"| {t['target']} | {t['value']:.2f}x | >= {t['goal']}x | {_met(t['met'])} |")
    gemm = {r["model"]: r for r in rows if r["part"] == "gemm"}
    if gemm:
        out += ["", "### Side by side", "", f"GEMM {GEMM_SIZE}x{GEMM_SIZE}: " + ", ".join(
            f"{dtype} {r['gflop_per_s']:.0f} GFLOP/s" for dtype, r in gemm.items())]
    if any(r["part"] == "models" for r in rows):
        names = [dinat] + peers
        out += ["", f"Images/s, batch {s['batch']}, {s['size']}x{s['size']}, {s['threads']} threads:", "",
                "| mode | " + " | ".join(names) + " | " + " | ".join(f"{dinat} / {p}" for p in peers)
                + f" | {TARGET_SPEEDUP}x target |",
                "|---" * (2 + 2 * len(peers)) + "|---|"]
        for mode in MODES:
            found = {n: _find(rows, part="models", mode=mode, model=n) for n in names}
            if not found[dinat]:
                continue
            speeds = [f"{found[n]['images_per_s']:.1f}" if found[n] else "-" for n in names]
            ratios = [found[dinat]["images_per_s"] / found[p]["images_per_s"] for p in peers if found[p]]
            out.append(f"| {mode} | " + " | ".join(speeds) + " | " + " | ".join(f"{x:.2f}x" for x in ratios)
                       + f" | {_met(all(x >= TARGET_SPEEDUP for x in ratios)) if ratios else '-'} |")
        with_flops = [r for r in rows if r["part"] in ("models", "backbone") and "gemm_fraction" in r]
        if with_flops:
            out += ["", "### Fraction of the GEMM rate", "",
                    "| model | mode | GFLOP / image | GFLOP/s | of the GEMM rate |", "|---|---|---|---|---|"]
            for r in with_flops:
                mode = r["mode"] + (f" {r['size']}x{r['size']}" if r["part"] == "backbone" else "")
                out.append(f"| {r['model']} | {mode} | {r['gflop_per_image']:.2f} | {r['gflop_per_s']:.0f} | "
                           f"{100 * r['gemm_fraction']:.0f}% ({r['gemm_dtype']}) |")
            if any("bf16" in r["mode"] and r["gemm_dtype"] == "float32" for r in with_flops):
                out += ["", "This CPU has no bfloat16 instructions: DiNAT's bf16 linears and convolutions run as "
                            "float32 kernels on bf16-rounded operands, so its bf16 row is set against the float32 rate."]
    compiled = [r for r in rows if r["part"] == "compile" and r.get("compiled")]
    if compiled:
        options = compiled[0].get("compile_options")
        how = f"backend {compiled[0]['compile_backend']}" + (f", options {json.dumps(options)}" if options else "")
        rounds = s.get("compile_rounds", s["rounds"])
        out += ["", "### torch.compile", "",
                f"torch.compile ({how}), batch {s['batch']}, {rounds} interleaved rounds, images/s:", "",
                "| model | mode | eager | compiled | compiled / eager | target >= 1 | compile time |",
                "|---|---|---|---|---|---|---|"]
        for r in compiled:
            eager = _find(rows, part="compile", mode=r["mode"], contender=r["contender"], compiled=False)
            ratio = r["images_per_s"] / eager["images_per_s"]
            out.append(f"| {r['contender']} | {r['mode']} | {eager['images_per_s']:.1f} | {r['images_per_s']:.1f} | "
                       f"{ratio:.2f}x | {_met(ratio >= 1.0)} | {r['compile_s']:.0f} s |")
    for part, title in (("latency", f"### Batch-1 latency\n\nBatch 1, {s['size']}x{s['size']} (ms):"),
                        ("backbone", f"### Backbone at detection sizes\n\nBackbone inference, batch 1, {s['backbone_size']}x{s['backbone_size']}, "
                                     "float32, all four stages' feature maps (ms):")):
        part_rows = [r for r in rows if r["part"] == part]
        if not part_rows:
            continue
        modes = list(dict.fromkeys(r["mode"] for r in part_rows))
        names = list(dict.fromkeys(r["model"] for r in part_rows))
        out += ["", title, "", "| mode | " + " | ".join(names) + " | " + " | ".join(
            f"{dinat} speed / {p}" for p in names[1:]) + " |", "|---" * (2 * len(names)) + "|"]
        for mode in modes:
            found = [_find(part_rows, mode=mode, model=n) for n in names]
            cells = [f"{1e3 * r['median_s']:.1f}" if r else "-" for r in found]
            ratios = [f"{found[i]['median_s'] / found[0]['median_s']:.2f}x" if found[i] and found[0] else "-"
                      for i in range(1, len(names))]
            out.append(f"| {mode} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(out)


# -- running --------------------------------------------------------------------------------------------
def run_benchmark(model: str = "mini", peers: list[str] = list(PEERS), parts: list[str] = list(PARTS),
                  batch: int = 8, size: int = 224, backbone_size: int = 1024, threads: int | None = None,
                  rounds: int = 3, min_run_time: float = 1.0, compile_modes: list[str] = ("inference fp32",
                  "training step fp32"), compile_peers: bool = False, compile_backend: str = "inductor",
                  compile_options: dict | None = None, compile_rounds: int = COMPILE_ROUNDS,
                  progress: Callable[[str], None] = lambda _: None,
                  checkpoint: Callable[[dict], None] = lambda _: None) -> dict:
    """Measure; returns {"machine", "settings", "rows", "targets", "compare"} (see the module docstring).
    `checkpoint` gets the results so far after each part (a long run interrupted keeps what it measured)."""
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    try:
        load_before = os.getloadavg()[0]
        mine = dinat_contender(model)
        others = [PEERS[p]() for p in peers]
        contenders = [mine] + others
        settings = {"dinat": mine.name, "peers": [c.name for c in others], "parts": list(parts), "batch": batch,
                    "size": size, "backbone_size": backbone_size, "threads": threads, "rounds": rounds,
                    "compile_rounds": compile_rounds, "min_run_time_s": min_run_time,
                    "timer": "torch.utils.benchmark.Timer.blocked_autorange",
                    "training_step": "forward, cross-entropy, backward, SGD step (float32)"}
        measured: list[tuple[Case, benchmark.Measurement]] = []

        def results_so_far() -> dict:
            gemm_rates = {c.model: c.flops / m.median / 1e9 for c, m in measured if c.part == "gemm"}
            rows = [to_row(c, m, gemm_rates) for c, m in measured]
            compare = benchmark.Compare([m for c, m in measured if c.part != "gemm"])
            # the 1-minute load average before and after: on a shared machine, how quiet the run was
            info = machine(threads) | {"load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            return {"machine": info, "settings": settings, "rows": rows,
                    "targets": summarize(rows, mine.name, settings["peers"]), "compare": str(compare)}

        def timed(cases, part_rounds=rounds):
            if cases:
                results = run_rounds(cases, part_rounds, threads, min_run_time, progress)
                measured.extend((c, results[c.key()]) for c in cases)
                checkpoint(results_so_far())

        # the GEMM rate is measured in the same rounds as the models, so that it sees the same noise
        want_gemm = "gemm" in parts
        if "models" in parts or want_gemm:
            progress("models: building and counting FLOPs")
            cases = model_cases(contenders, batch, size) if "models" in parts else []
            timed((gemm_cases() if want_gemm else []) + cases)
        if "compile" in parts:
            progress("compile: compiling (the first call; minutes with inductor on a cold cache)")
            compiled = contenders if compile_peers else [mine]
            with compile_room(len(compiled) * len(compile_modes)):
                timed(compile_cases(compiled, batch, size, list(compile_modes), compile_backend, progress,
                                    compile_options), compile_rounds)
        if "latency" in parts:
            timed(model_cases(contenders, 1, size, ("inference fp32", "inference bf16 autocast"), part="latency"))
        if "backbone" in parts:
            progress(f"backbone: {backbone_size}x{backbone_size}")
            timed(backbone_cases(contenders, backbone_size))

        return results_so_far()
    finally:
        torch.set_num_threads(previous_threads)  # the caller's process keeps its own setting
