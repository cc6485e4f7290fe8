"""A sweep's comparison (`lqtk sweep` → DIR/sweep.json): a markdown table of every run and a Pareto plot of
bits/weight against perplexity, one marker per method, the fp perplexity as a line, the Pareto front drawn."""

from pathlib import Path

COLUMNS = ["method", "recipe", "bits/weight", "perplexity", "× fp", "quantize time (s)", "peak memory (GB)"]


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


def table(results: list[dict]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for result in sorted(results, key=lambda r: (r["metrics"]["bits_per_weight"], r["metrics"]["perplexity"])):
        m = result["metrics"]
        rows.append(f"| {m['method']} | {result['name']} | {m['bits_per_weight']:.3f} | "
                    f"{m['perplexity']:.3f} | {m['perplexity'] / m['fp_perplexity']:.3f} | "
                    f"{m['quantize_time_s']:.0f} | {m['peak_rss_bytes'] / 1e9:.2f} |")
    return "\n".join(rows)


def pareto_plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    points = [(r["metrics"]["bits_per_weight"], r["metrics"]["perplexity"]) for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["metrics"]["method"] for r in results}):
        mine = [p for p, r in zip(points, results) if r["metrics"]["method"] == method]
        ax.scatter(*zip(*mine), label=method)
    front = [points[i] for i in pareto_front(points)]
    ax.plot(*zip(*front), color="black", linewidth=1, label="Pareto front")
    ax.axhline(results[0]["metrics"]["fp_perplexity"], color="gray", linestyle="--", label="fp")
    ax.set(xlabel="bits / weight", ylabel="perplexity", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], output_dir: Path) -> tuple[Path, Path]:
    """report.md and pareto.png in `output_dir` from a sweep's results (the entries of its sweep.json)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    png = output_dir / "pareto.png"
    pareto_plot(results, png)
    md = output_dir / "report.md"
    md.write_text(f"{table(results)}\n\n![bits/weight against perplexity]({png.name})\n")
    return md, png
