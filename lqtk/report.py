"""A sweep's comparison (`lqtk sweep` → DIR/sweep.json): a markdown table of every run and a Pareto plot of
bits/weight against perplexity, one marker per method, the fp perplexity as a line, the Pareto front drawn."""

from pathlib import Path

from lqtk.zero_shot import PRIMARY_METRIC

COLUMNS = ["method", "recipe", "bits/weight", "size (MB)", "perplexity", "× fp"]
TIMES = ["quantize time (s)", "peak memory (GB)"]


def method(metrics: dict) -> str:
    """The method's name, with `mixed` for a mixed-precision allocation (one marker per name in the plot)."""
    return f"mixed {metrics['method']}" if metrics.get("budget_bits") is not None else metrics["method"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (bits, perplexity) that no other point beats on both (fewer or equal bits and lower
    or equal perplexity, one of them strictly), in order of bits; of identical points, the first only."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def table(results: list[dict], fp: dict | None = None) -> str:
    """A row per run (by bits/weight), the fp model's first when given: {model, bits_per_weight, size_mb,
    perplexity, zero_shot}. Zero-shot columns: each task's primary metric (lqtk.zero_shot.PRIMARY_METRIC), in %."""
    tasks = sorted({task for r in results for task in r.get("zero_shot", {})} | set((fp or {}).get("zero_shot", {})))
    zero_shot = [f"{task} ({PRIMARY_METRIC[task]}, %)" for task in tasks]
    rows = ["| " + " | ".join(COLUMNS + zero_shot + TIMES) + " |", "|" + "---|" * len(COLUMNS + zero_shot + TIMES)]

    def accuracy(scores: dict) -> list[str]:
        return [f"{100 * scores[task][PRIMARY_METRIC[task]]:.1f}" if task in scores else "" for task in tasks]

    if fp is not None:
        rows.append(f"| fp | {Path(fp['model']).name} | {fp['bits_per_weight']} | {fp['size_mb']:.0f} | "
                    f"{fp['perplexity']:.3f} | 1.000 | " + " | ".join(accuracy(fp.get("zero_shot", {})) + ["", ""]) +
                    " |")
    for result in sorted(results, key=lambda r: (r["metrics"]["bits_per_weight"], r["metrics"]["perplexity"])):
        m = result["metrics"]
        cells = [method(m), result["name"], f"{m['bits_per_weight']:.3f}", f"{result.get('size_mb', 0):.0f}",
                 f"{m['perplexity']:.3f}", f"{m['perplexity'] / m['fp_perplexity']:.3f}",
                 *accuracy(result.get("zero_shot", {})), f"{m['quantize_time_s']:.0f}",
                 f"{m['peak_rss_bytes'] / 1e9:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def mixed_comparison(results: list[dict]) -> list[str]:
    """For each mixed-precision run: how its perplexity compares with every uniform run at the same or more bits."""
    lines = []
    for mixed in (r for r in results if r["metrics"].get("budget_bits") is not None):
        bits, ppl = mixed["metrics"]["bits_per_weight"], mixed["metrics"]["perplexity"]
        uniform = [r for r in results if r["metrics"].get("budget_bits") is None
                   and r["metrics"]["bits_per_weight"] >= bits]
        beaten = [r["name"] for r in uniform if r["metrics"]["perplexity"] > ppl]
        better = [f"{r['name']} ({r['metrics']['bits_per_weight']:.3f} bits, {r['metrics']['perplexity']:.3f})"
                  for r in uniform if r["metrics"]["perplexity"] <= ppl]
        lines.append(f"- {mixed['name']} ({bits:.3f} bits/weight, perplexity {ppl:.3f}) is lower than "
                     f"{len(beaten)} of the {len(uniform)} uniform runs at {bits:.3f} bits/weight or more"
                     + (f"; not lower than {', '.join(better)}" if better else ""))
    return lines


def pareto_plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    points = [(r["metrics"]["bits_per_weight"], r["metrics"]["perplexity"]) for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({method(r["metrics"]) for r in results}):
        mine = [p for p, r in zip(points, results) if method(r["metrics"]) == name]
        ax.scatter(*zip(*mine), label=name)
    front = [points[i] for i in pareto_front(points)]
    ax.plot(*zip(*front), color="black", linewidth=1, label="Pareto front")
    ax.axhline(results[0]["metrics"]["fp_perplexity"], color="gray", linestyle="--", label="fp")
    ax.set(xlabel="bits / weight", ylabel="perplexity", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], output_dir: Path, fp: dict | None = None) -> tuple[Path, Path]:
    """report.md and pareto.png in `output_dir` from a sweep's results (the entries of its sweep.json) and the fp
    model's figures (`table`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    png = output_dir / "pareto.png"
    pareto_plot(results, png)
    md = output_dir / "report.md"
    comparison = mixed_comparison(results)
    parts = [table(results, fp), *(["\n".join(comparison)] if comparison else []),
             f"![bits/weight against perplexity]({png.name})"]
    md.write_text("\n\n".join(parts) + "\n")
    return md, png
