"""DiNAT on the reference stack (transformers 4.46 + NATTEN 0.17 CPU kernels), for benchmarks/benchmark.py.

Runs in its own environment: transformers 4.x cannot share one with this package's transformers 5.x.
Build it with `make reference-venv` (or by hand: torch, transformers==4.46.3, then
`pip install --no-build-isolation natten==0.17.5`, which compiles NATTEN's kernels against that torch),
then

    .venv-reference/bin/python benchmarks/reference_stack.py --threads 2 --batch 8

prints one JSON object: the versions, and per mode (inference fp32, training step fp32) the median time
per batch from torch.utils.benchmark, plus the training step's peak memory with --memory-batch. The config
defaults to transformers' DinatConfig() (DiNAT-mini); --config takes other fields as JSON.

Two import gaps of NATTEN 0.17 on a current CPU-only torch are bridged below; no kernel is replaced.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import typing

import torch


def bridge_natten_imports() -> None:
    if not hasattr(torch.cuda, "_device_t"):  # removed from torch.cuda, still named in NATTEN 0.17's hints
        torch.cuda._device_t = typing.Union[torch.device, str, int, None]
    if not torch.cuda.is_available():  # NATTEN 0.17 asks for the capability at import time
        torch.cuda.get_device_capability = lambda *a, **k: (0, 0)
    import natten.functional as nf

    if not hasattr(nf, "natten2dqkrpb"):  # renamed in NATTEN 0.17; transformers 4.x imports the old names
        nf.natten2dqkrpb = lambda q, k, rpb, kernel_size, dilation: nf.na2d_qk(q, k, kernel_size, dilation, rpb=rpb)
        nf.natten2dav = lambda attn, v, kernel_size, dilation: nf.na2d_av(attn, v, kernel_size, dilation)


def build(config: dict):
    from transformers import DinatConfig, DinatForImageClassification

    torch.manual_seed(0)
    return DinatForImageClassification(DinatConfig(**{"num_labels": 1000, **config}))


def measure(config: dict, batch: int, size: int, threads: int, rounds: int, min_run_time: float) -> list[dict]:
    from torch.utils import benchmark

    model = build(config)
    pixels, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def inference():
        model.eval()
        with torch.inference_mode():
            model(pixels)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(pixels, labels=labels).loss.backward()
        optimizer.step()

    rows = []
    for mode, fn in (("inference fp32", inference), ("training step fp32", train_step)):
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label="reference",
                                sub_label=mode, description="DiNAT")
        m = benchmark.Measurement.merge([timer.blocked_autorange(min_run_time=min_run_time)
                                         for _ in range(rounds)])[0]
        rows.append({"mode": mode, "batch": batch, "size": size, "median_s": m.median, "iqr_s": m.iqr,
                     "blocks": len(m.times), "images_per_s": batch / m.median})
    return rows


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def peak_memory_mib(config: dict, batch: int, size: int) -> float:
    """Growth of the peak resident set over a training step, after a warm-up step (Linux)."""
    model = build(config).train()
    pixels, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    before = _status_mib("VmRSS")
    model(pixels, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak mark ("5": VmHWM := VmRSS)
        f.write("5")
    model(pixels, labels=labels).loss.backward()
    return _status_mib("VmHWM") - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="{}", help="DinatConfig fields as JSON (default: DiNAT-mini)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--memory-batch", type=int, default=0, help="also the training peak memory at this batch")
    parser.add_argument("--check", action="store_true", help="only check the stack and print its versions")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    torch.set_num_threads(args.threads)
    try:
        bridge_natten_imports()
        import natten
        import transformers
    except ImportError as err:
        print(f"reference_stack.py: this Python lacks the reference stack ({err}); "
              "build one with `make reference-venv`",
              file=sys.stderr)
        return 1
    if not transformers.__version__.startswith("4."):
        print(f"reference_stack.py: needs transformers 4.x (its DiNAT uses NATTEN 0.17), found "
              f"{transformers.__version__}", file=sys.stderr)
        return 1
    stack = f"transformers {transformers.__version__} + NATTEN {natten.__version__}"
    if args.check:
        print(json.dumps({"stack": stack, "torch": torch.__version__}))
        return 0
    if args.memory_only:
        print(json.dumps({"peak_memory_mib": peak_memory_mib(config, args.memory_batch, args.size)}))
        return 0
    result = {"stack": stack,
              "torch": torch.__version__, "threads": args.threads,
              "rows": measure(config, args.batch, args.size, args.threads, args.rounds, args.min_run_time)}
    if args.memory_batch:
        # a fresh process, so that the timing runs' allocations do not hide the step's own peak
        out = subprocess.run([sys.executable, __file__, "--memory-only", "--config", args.config, "--memory-batch",
                              str(args.memory_batch), "--size", str(args.size)], capture_output=True, text=True,
                             check=True)
        result["peak_memory"] = {"batch": args.memory_batch, **json.loads(out.stdout.strip().splitlines()[-1])}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
