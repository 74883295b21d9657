"""Where each model's time goes, by kind of op, and what a speed-up target over a peer leaves for attention.

    python benchmarks/breakdown.py --threads 2

For each model (DiNAT and the peers of `dinat bench`) and mode (float32 inference, float32 training step):
the unprofiled time per call (torch.utils.benchmark, rounds that rotate through the models), and the
profiler's self time per op sorted into linear layers, attention, convolutions, normalization and the rest,
scaled to that unprofiled time. Then, per peer, the budget a --target speed-up leaves DiNAT (the peer's time
divided by the target) against DiNAT's time outside attention: where that time alone is over budget, no
attention kernel can reach the target; the matmuls, convolutions and norms would have to get faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

from dinat import bench

CATEGORIES = ("linear", "attention", "convolution", "normalization", "other")
# aten/oneDNN op names (profiler self time) -> category; first match wins. Where autograd records, a custom
# op's forward kernel runs inside its generated autograd Function and the profiler shows that Function
# (`GeneratedBackwardFor_dinat_na2d_cpp_packed_default`) instead of the op, hence "na2d" rather than "dinat::na2d"
_PATTERNS = (
    ("attention", ("na2d", "aten::bmm", "aten::_softmax", "_scaled_dot_product", "aten::_softmax_backward")),
    ("linear", ("_linear_pointwise", "aten::addmm", "aten::mm", "_mkl_linear")),
    ("convolution", ("convolution",)),
    ("normalization", ("layer_norm",)),
)


def category(op_name: str) -> str:
    for name, patterns in _PATTERNS:
        if any(p in op_name for p in patterns):
            return name
    return "other"


def profiled_shares(fn, iterations: int) -> dict[str, float]:
    """Each category's fraction of the profiler's self CPU time over `iterations` calls of `fn`."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            fn()
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        totals[category(event.key)] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {name: value / whole for name, value in totals.items()}


def measure(contenders: list[bench.Contender], batch: int, size: int, threads: int, rounds: int,
            min_run_time: float, iterations: int) -> list[dict]:
    modes = ("inference fp32", "training step fp32")
    cases = bench.model_cases(contenders, batch, size, modes=modes)
    times = {case.key(): [] for case in cases}
    for r in range(rounds):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            timer = benchmark.Timer(stmt="fn()", globals={"fn": case.fn}, num_threads=threads)
            times[case.key()].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    rows = []
    torch.set_num_threads(threads)
    for case in cases:
        seconds = statistics.median(times[case.key()])
        shares = profiled_shares(case.fn, iterations)
        rows.append(dict(model=case.model, mode=case.mode, ms=seconds * 1e3,
                         **{name: share * seconds * 1e3 for name, share in shares.items()}))
    return rows


def budgets(rows: list[dict], dinat: str, target: float) -> list[dict]:
    out = []
    for row in rows:
        if row["model"] == dinat:
            continue
        mine = next(r for r in rows if r["model"] == dinat and r["mode"] == row["mode"])
        budget = row["ms"] / target
        outside = mine["ms"] - mine["attention"]
        out.append(dict(mode=row["mode"], peer=row["model"], peer_ms=row["ms"], budget_ms=budget,
                        dinat_ms=mine["ms"], outside_attention_ms=outside, attention_ms=mine["attention"],
                        left_for_attention_ms=budget - outside))
    return out


def format_tables(rows: list[dict], budget_rows: list[dict], target: float) -> str:
    lines = ["| model | mode | ms / call | " + " | ".join(CATEGORIES) + " |",
             "|---|---|---|" + "---|" * len(CATEGORIES)]
    for r in rows:
        cells = " | ".join(f"{r[c]:.1f} ({100 * r[c] / r['ms']:.0f}%)" for c in CATEGORIES)
        lines.append(f"| {r['model']} | {r['mode']} | {r['ms']:.1f} | {cells} |")
    lines += ["", f"Budget for {target:g}x (ms per call):", "",
              "| mode | peer | peer | budget | DiNAT | DiNAT outside attention | DiNAT attention | left for attention |",
              "|---|---|---|---|---|---|---|---|"]
    for b in budget_rows:
        ms = (b[k] for k in ("peer_ms", "budget_ms", "dinat_ms", "outside_attention_ms", "attention_ms",
                             "left_for_attention_ms"))
        lines.append(f"| {b['mode']} | {b['peer']} | " + " | ".join(f"{v:.1f}" for v in ms) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini", help="DiNAT preset or DinatConfig file/folder")
    parser.add_argument("--peers", default=",".join(bench.PEERS), help="comma-separated peers ('' for none)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--iterations", type=int, default=3, help="profiled calls per case")
    parser.add_argument("--target", type=float, default=1.4, help="speed-up over each peer")
    args = parser.parse_args(argv)
    contenders = [bench.dinat_contender(args.model)] + [bench.PEERS[p]() for p in args.peers.split(",") if p]
    rows = measure(contenders, args.batch, args.size, args.threads, args.rounds, args.min_run_time, args.iterations)
    print(f"batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, torch {torch.__version__}")
    print(format_tables(rows, budgets(rows, contenders[0].name, args.target), args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
