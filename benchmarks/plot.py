"""Charts from a benchmark JSON (benchmarks/benchmark.py or `dinat bench`), with matplotlib.

    python benchmarks/plot.py docs/performance.json --out-dir docs

writes performance_models.png (images/s per mode, DiNAT beside its peers, eager and compiled) and
performance_scaling.png (time per megapixel against resolution) for the parts the JSON has.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _colors(names: list[str]) -> dict[str, str]:
    """One color per model across charts (DiNAT first, its compiled run next to it)."""
    return {name: f"C{i}" for i, name in enumerate(names)}


def _subtitle(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    return f"{m['cpu']}, {s['threads']} threads, torch {m['torch']}, {m['date']}"


def plot_models(results: dict, path: Path) -> Path | None:
    """Grouped bars: images/s of each model per mode (models part), and DiNAT compiled (compile part)."""
    rows = [r for r in results["rows"] if r["part"] == "models"]
    if not rows:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    names = list(dict.fromkeys(r["model"] for r in rows))
    compiled = {r["mode"]: r for r in results["rows"] if r["part"] == "compile" and r.get("compiled")
                and r["contender"] == results["settings"]["dinat"]}
    series = [(n, [next((r["images_per_s"] for r in rows if r["model"] == n and r["mode"] == mode), 0)
                   for mode in modes]) for n in names]
    if compiled:
        series.insert(1, (f"{results['settings']['dinat']} compiled",
                          [compiled[m]["images_per_s"] if m in compiled else 0 for m in modes]))
    colors = _colors([results["settings"]["dinat"], f"{results['settings']['dinat']} compiled"]
                     + results["settings"]["peers"])
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(modes))]
        bars = ax.bar(xs, values, width, label=name, color=colors.get(name))
        ax.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in values], fontsize=8, padding=2)
    s = results["settings"]
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("images / s (higher is better)")
    ax.set_title(f"Batch {s['batch']}, {s['size']}x{s['size']}, random weights\n{_subtitle(results)}", fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(results: dict, path: Path) -> Path | None:
    """Milliseconds per megapixel against image side, one line per model (flat = linear in the pixels)."""
    rows = [r for r in results["rows"] if r["part"] == "scaling"]
    if not rows:
        return None
    colors = _colors([results["settings"]["dinat"], f"{results['settings']['dinat']} compiled"]
                     + results["settings"]["peers"])
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["size"])
        ax.plot([r["size"] for r in mine], [1e3 * r["median_s"] / (r["size"] ** 2 / 1e6) for r in mine],
                marker="o", label=name, color=colors.get(name))
    ax.set_xlabel("image side (pixels)")
    ax.set_ylabel("ms per megapixel (lower is better)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Inference, batch 1, float32\n{_subtitle(results)}", fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: dict, out_dir: Path, prefix: str = "performance") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_models(results, out_dir / f"{prefix}_models.png"),
               plot_scaling(results, out_dir / f"{prefix}_scaling.png")]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a benchmark JSON")
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--prefix", default="performance", help="file name prefix of the charts")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as err:
        print(f"plot.py: error: cannot read {args.results}: {err}", file=sys.stderr)
        return 1
    for path in plot_all(results, args.out_dir, args.prefix):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
