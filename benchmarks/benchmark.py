"""The project's benchmark: everything `dinat bench` measures, plus the developer parts, in one run.

    python benchmarks/benchmark.py --threads 2 --output docs/performance.json --plot docs

Parts (`--parts`, default all but reference):
  gemm, models, compile, latency, backbone   as `dinat bench` (src/dinat/bench.py): DiNAT against ConvNeXt-T
                                              and Swin-T, side by side, interleaved rounds
  ops       the na2d op per available backend, float32 and bfloat16, forward and forward+backward, at the
            four stage shapes of DiNAT-mini at 224; beside each stage, its linear layers (the yardstick)
  scaling   inference time per megapixel, batch 1, at --scaling-sizes (224 .. 1024), DiNAT and the peers
  memory    the training step's peak memory (fresh process per model, Linux) at --memory-batch
  reference DiNAT on the reference stack (transformers 4.46 + NATTEN 0.17) in --reference-python's
            environment (benchmarks/reference_stack.py), after the models part

All timings: torch.utils.benchmark.Timer.blocked_autorange with --threads, in rounds that rotate through
the cases, the median over all rounds. `--plot DIR` draws the charts (benchmarks/plot.py, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dinat import bench, ops
from dinat.commands import bench as bench_command
from dinat.ops import dispatch

HERE = Path(__file__).resolve().parent
PARTS = bench.PARTS + ("ops", "scaling", "memory", "reference")
DEFAULT_PARTS = tuple(p for p in PARTS if p != "reference")
SCALING_SIZES = (224, 384, 512, 768, 1024)
HEAD_DIM, KERNEL = 32, 7


# -- op level -------------------------------------------------------------------------------------------
def mini_stages() -> list[tuple[str, int, int, tuple[int, ...]]]:
    """(stage, side, heads, dilations) of DiNAT-mini's four stages at 224."""
    config = bench.DinatConfig.from_preset("mini")
    return [(f"stage{i + 1}", 224 // (config.patch_size * 2 ** i), heads, tuple(sorted(set(dilations))))
            for i, (heads, dilations) in enumerate(zip(config.num_heads, config.dilations))]


def op_cases(batch: int, dtypes: list[torch.dtype]) -> list[bench.Case]:
    cases = []
    for stage, side, heads, dilations in mini_stages():
        for dilation in dilations:
            for dtype in dtypes:
                for backend in dispatch.BACKENDS:
                    cases += _na_cases(stage, batch, side, heads, dilation, dtype, backend)
        cases.append(_linear_case(stage, batch, side, heads))
    return cases


def _na_cases(stage, batch, side, heads, dilation, dtype, backend) -> list[bench.Case]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, side, side, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=g).to(dtype)
    # DiNAT's layers have RPB; a backend that only runs without it (NATTEN >= 0.20) is timed without
    with_rpb = [r for r in (rpb, None) if dispatch.why_not(backend, q, r is not None, needs_grad=False) is None]
    if not with_rpb or (backend == "flex" and q.device.type == "cpu"):
        return []  # eager flex on CPU materializes all (H*W)^2 scores: not a speed path
    rpb = with_rpb[0]
    label = backend + ("" if rpb is not None else " (no RPB)")
    mode = f"{stage} {side}x{side} x{heads} heads d{dilation} {str(dtype).replace('torch.', '')}"

    def forward():
        with torch.no_grad():
            return ops.na2d(q, k, v, KERNEL, dilation, rpb=rpb, backend=backend)

    cases = [bench.Case("ops", f"{mode} forward", label, batch, side, forward,
                        extra={"stage": stage, "dilation": dilation, "dtype": str(dtype), "pass": "forward"})]
    leaves = [t.detach().requires_grad_() for t in (q, k, v) + ((rpb,) if rpb is not None else ())]
    if dispatch.why_not(backend, leaves[0], rpb is not None, needs_grad=True) is None:
        grad = torch.randn_like(q)

        def forward_backward():
            out = ops.na2d(*leaves[:3], KERNEL, dilation, rpb=leaves[3] if rpb is not None else None,
                           backend=backend)
            torch.autograd.grad(out, leaves, grad)

        cases.append(bench.Case("ops", f"{mode} forward+backward", label, batch, side, forward_backward,
                                extra={"stage": stage, "dilation": dilation, "dtype": str(dtype),
                                       "pass": "forward+backward"}))
    return cases


def _linear_case(stage, batch, side, heads) -> bench.Case:
    """The layer's linear layers (fused q/k/v, projection, MLP 3x) at float32, forward: NA's yardstick."""
    dim = heads * HEAD_DIM
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, side, side, dim, generator=g)
    w_qkv, w_proj = torch.randn(3 * dim, dim, generator=g), torch.randn(dim, dim, generator=g)
    w_fc1, w_fc2 = torch.randn(3 * dim, dim, generator=g), torch.randn(dim, 3 * dim, generator=g)

    def linears():
        with torch.no_grad():
            F.linear(x, w_qkv), F.linear(x, w_proj), F.linear(F.linear(x, w_fc1), w_fc2)

    return bench.Case("ops", f"{stage} {side}x{side} linear layers float32 forward", "qkv+proj+mlp", batch, side,
                      linears, extra={"stage": stage, "dtype": "torch.float32", "pass": "forward"})


# -- resolution scaling and memory ----------------------------------------------------------------------
def scaling_cases(contenders: list[bench.Contender], sizes: list[int]) -> list[bench.Case]:
    cases = []
    for contender in contenders:
        model = bench._seeded(contender.classifier).eval()
        for size in sizes:
            pixels, _ = bench._images(1, size)
            cases.append(bench.Case("scaling", f"{size}x{size}", contender.name, 1, size,
                                    bench._inference(model, pixels)))
    return cases


def peak_memory_mib(model: str, peer: str | None, batch: int, size: int, threads: int) -> float:
    """The training step's peak resident-set growth, measured in a fresh process (see _child_peak)."""
    command = [sys.executable, __file__, "--memory-child", json.dumps([model, peer, batch, size, threads])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError((result.stderr or "failed").strip().splitlines()[-1])
    return float(result.stdout.strip().splitlines()[-1])


def _child_peak(model: str, peer: str | None, batch: int, size: int, threads: int) -> float:
    torch.set_num_threads(threads)
    contender = bench.PEERS[peer]() if peer else bench.dinat_contender(model)
    step = bench._train_step(bench._seeded(contender.classifier).train(), *bench._images(batch, size))
    before = _status_mib("VmRSS")
    step()  # warm-up: one-time allocations (optimizer buffers, gradients)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark to the current resident set
    step()
    return _status_mib("VmHWM") - before


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def memory_rows(model: str, peers: list[str], batch: int, size: int, threads: int) -> list[dict]:
    rows = []
    for peer in [None] + peers:
        name = bench.PEERS[peer]().name if peer else bench.dinat_contender(model).name
        row = {"part": "memory", "mode": "training step fp32", "model": name, "batch": batch, "size": size}
        try:
            row["peak_memory_mib"] = peak_memory_mib(model, peer, batch, size, threads)
        except (RuntimeError, OSError) as err:
            row["error"] = str(err)
        rows.append(row)
    return rows


# -- the reference stack --------------------------------------------------------------------------------
def check_reference(python: str) -> str:
    """The reference stack's versions in `python`, or a ValueError saying why it cannot run there."""
    try:
        result = subprocess.run([python, str(HERE / "reference_stack.py"), "--check"], capture_output=True,
                                text=True)
    except OSError as err:
        raise ValueError(f"--reference-python {python}: {err.strerror}") from None
    if result.returncode != 0:
        tail = (result.stderr or "failed").strip().splitlines()[-1:]
        raise ValueError(f"--reference-python {python}: {tail[0] if tail else 'failed'}")
    return json.loads(result.stdout.strip().splitlines()[-1])["stack"]


def reference_rows(python: str, model: str, batch: int, size: int, threads: int, rounds: int,
                   min_run_time: float, memory_batch: int) -> list[dict]:
    if model not in bench.PRESETS:
        raise ValueError("--reference-python needs a preset --model")
    config = json.dumps(bench.PRESETS[model])
    command = [python, str(HERE / "reference_stack.py"), "--config", config, "--batch", str(batch), "--size",
               str(size), "--threads", str(threads), "--rounds", str(rounds), "--min-run-time", str(min_run_time),
               "--memory-batch", str(memory_batch)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or "failed").strip().splitlines()[-1:]
        raise ValueError(f"the reference stack in {python} failed: {tail[0] if tail else 'no output'}")
    output = json.loads(result.stdout.strip().splitlines()[-1])
    name = f"DiNAT-{model} on the reference stack ({output['stack']})"
    rows = [{"part": "reference", "model": name, **row} for row in output["rows"]]
    if "peak_memory" in output:
        peak = output["peak_memory"]
        rows.append({"part": "memory", "mode": "training step fp32", "model": name, "size": size,
                     "batch": peak["batch"], "peak_memory_mib": peak["peak_memory_mib"]})
    return rows


# -- tables ---------------------------------------------------------------------------------------------
def format_developer_tables(results: dict) -> str:
    rows, s = results["rows"], results["settings"]
    out = []
    op_rows = [r for r in rows if r["part"] == "ops"]
    if op_rows:
        def column(r):
            if r["model"] == "qkv+proj+mlp":
                return "linear layers fp32 fwd"
            dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(r["dtype"], r["dtype"])
            return f"{r['model']} {dtype} {'fwd' if r['pass'] == 'forward' else 'fwd+bwd'}"

        columns = list(dict.fromkeys(column(r) for r in op_rows if r["model"] != "qkv+proj+mlp"))
        columns.append("linear layers fp32 fwd")
        lines = {}
        for r in op_rows:
            side_heads = r["mode"].split(" ")[1:4]  # "56x56", "x2", "heads"
            key = (r["stage"], " ".join(side_heads), r.get("dilation"))
            lines.setdefault(key, {})[column(r)] = f"{1e3 * r['median_s']:.2f}"
        # the linear layers belong to the stage: show them on its first row
        stage_linear = {k[0]: v.pop("linear layers fp32 fwd") for k, v in list(lines.items())
                        if "linear layers fp32 fwd" in v and k[2] is None}
        lines = {k: v for k, v in lines.items() if k[2] is not None}
        out += ["", "### Op level", "", f"na2d per backend, batch {s['op_batch']}, head_dim {HEAD_DIM}, K = {KERNEL}, "
                "with RPB; ms (median); the stage's linear layers (q/k/v, projection, MLP) for scale:", "",
                "| stage | dilation | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
        shown = set()
        for (stage, shape, dilation), cells in lines.items():
            cells = dict(cells)
            if stage not in shown:
                cells["linear layers fp32 fwd"] = stage_linear.get(stage, "")
                shown.add(stage)
            out.append(f"| {stage} ({shape}) | {dilation} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    scaling = [r for r in rows if r["part"] == "scaling"]
    if scaling:
        sizes = list(dict.fromkeys(r["size"] for r in scaling))
        names = list(dict.fromkeys(r["model"] for r in scaling))
        base = {n: bench._find(scaling, model=n, size=sizes[0]) for n in names}
        out += ["", "### Resolution scaling", "", f"Inference, batch 1, float32: ms per image (time per pixel relative to {sizes[0]}):", "",
                "| size | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for size in sizes:
            cells = []
            for n in names:
                r = bench._find(scaling, model=n, size=size)
                rel = (r["median_s"] / size ** 2) / (base[n]["median_s"] / sizes[0] ** 2)
                cells.append(f"{1e3 * r['median_s']:.0f} ({rel:.2f}x)")
            out.append(f"| {size} | " + " | ".join(cells) + " |")
    memory = [r for r in rows if r["part"] == "memory"]
    if memory:
        out += ["", "### Training-step peak memory", "", "Training step (float32) peak memory, growth of the resident set in a fresh process:", "",
                "| model | batch | size | peak MiB |", "|---|---|---|---|"]
        out += [f"| {r['model']} | {r['batch']} | {r['size']} | "
                f"{r['peak_memory_mib']:.0f} |" if "peak_memory_mib" in r else
                f"| {r['model']} | {r['batch']} | {r['size']} | failed: {r['error']} |" for r in memory]
    reference = [r for r in rows if r["part"] == "reference"]
    if reference:
        out += ["", "### The reference stack", "", "The reference stack (its own process, after the models part):", "",
                "| model | mode | images/s | this package's images/s (models part) | speed-up |",
                "|---|---|---|---|---|"]
        for r in reference:
            mine = bench._find(rows, part="models", mode=r["mode"], model=s["dinat"])
            out.append(f"| {r['model']} | {r['mode']} | {r['images_per_s']:.2f} | "
                       + (f"{mine['images_per_s']:.1f} | {mine['images_per_s'] / r['images_per_s']:.0f}x |"
                          if mine else "- | - |"))
    return "\n".join(out)


# -- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = bench_command.configure(argparse.ArgumentParser(prog="python benchmarks/benchmark.py", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.set_defaults(parts=",".join(DEFAULT_PARTS), output=Path("bench-results/benchmark.json"))
    parser.add_argument("--op-batch", type=int, default=8, help="batch of the op-level shapes")
    parser.add_argument("--op-dtypes", default="float32,bfloat16", help="op-level dtypes")
    parser.add_argument("--scaling-sizes", default=",".join(map(str, SCALING_SIZES)))
    parser.add_argument("--memory-batch", type=int, default=8, help="batch of the peak-memory part")
    parser.add_argument("--reference-python", default=None,
                        help="a Python with the reference stack (make reference-venv: .venv-reference/bin/python)")
    parser.add_argument("--reference-rounds", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--plot", type=Path, default=None, help="write the charts (PNG) into this folder")
    parser.add_argument("--report", type=Path, default=None,
                        help="measure nothing: print the tables (and --markdown, --plot) of this results JSON")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_child:
        print(_child_peak(*json.loads(args.memory_child)))
        return 0
    if args.report:
        report(json.loads(args.report.read_text()), args.markdown, args.plot, print)
        return 0
    try:
        parts = bench_command.parse_list(args.parts, "parts", PARTS)
        if args.reference_python and "reference" not in parts:
            parts.append("reference")
        if "reference" in parts and not args.reference_python:
            raise ValueError("the reference part needs --reference-python")
        if args.reference_python:
            check_reference(args.reference_python)
        args.parts = ",".join(p for p in parts if p in bench.PARTS) or "models"
        kwargs = bench_command.options(args)
        kwargs["parts"] = [p for p in parts if p in bench.PARTS]
        dtypes = [getattr(torch, d) for d in bench_command.parse_list(args.op_dtypes, "op-dtypes", ["float32", "bfloat16"])]
        sizes = bench_command.parse_list(args.scaling_sizes, "scaling-sizes", kind=int)
        if args.plot is not None:
            import plot  # noqa: F401  (fail before measuring when matplotlib is missing)
    except (ValueError, ImportError) as err:
        print(f"benchmark.py: error: {err}", file=sys.stderr)
        return 1

    start = time.perf_counter()

    def progress(text):
        print(f"[{time.perf_counter() - start:4.0f} s] {text}", file=sys.stderr, flush=True)

    results = bench.run_benchmark(**kwargs, progress=progress,
                                  checkpoint=lambda partial: bench_command.write(partial, args.output))
    results["settings"].update(parts=parts, op_batch=args.op_batch, scaling_sizes=sizes,
                               memory_batch=args.memory_batch)
    threads, rounds = results["settings"]["threads"], args.rounds
    if "reference" in parts:
        progress("reference: the reference stack in its own process")
        results["rows"] += reference_rows(args.reference_python, args.model, args.batch, args.size, threads,
                                          args.reference_rounds, args.min_run_time, args.memory_batch)
    extra = []
    if "ops" in parts:
        extra += op_cases(args.op_batch, dtypes)
    if "scaling" in parts:
        contenders = [bench.dinat_contender(args.model)] + [bench.PEERS[p]() for p in kwargs["peers"]]
        extra += scaling_cases(contenders, sizes)
    for part in ("ops", "scaling"):
        cases = [c for c in extra if c.part == part]
        if cases:
            progress(f"{part}: {len(cases)} cases")
            measured = bench.run_rounds(cases, rounds, threads, min(args.min_run_time, 0.5), progress)
            results["rows"] += [bench.to_row(c, measured[c.key()], {}) for c in cases]
            bench_command.write(results, args.output)
    if "memory" in parts:
        progress("memory: one fresh process per model")
        results["rows"] += memory_rows(args.model, kwargs["peers"], args.memory_batch, args.size, threads)

    bench_command.write(results, args.output)
    print(results["compare"] + "\n")
    report(results, args.markdown, args.plot, progress)
    progress(f"wrote {args.output}")
    return 0


def report(results: dict, markdown: Path | None, plot_dir: Path | None, progress) -> None:
    """Print the tables; write them to `markdown` and the charts into `plot_dir` where given."""
    tables = bench.format_markdown(results) + "\n" + format_developer_tables(results)
    print(tables)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(tables + "\n")
    if plot_dir is not None:
        import plot

        for path in plot.plot_all(results, plot_dir):
            progress(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
