"""Speed of lqtk's CPU kernels (lqtk/kernels/cpu.py) against the dense fp32 F.linear, at decode batch sizes.

    python scripts/bench_kernels.py [--json FILE] [--kernels NAME ...] [--threads N] [--hot] [--min-time S]
                                    [--repeats N]

For each format, (O, I) shape and batch size, the kernel and F.linear with an fp32 weight of the same shape are timed
side by side: after a warm-up, `--repeats` blocked measurements of each, taken in turn (so that other processes on
the cores slow both alike), and the median of each. The weights are random codes and scales of the format's layout:
quality does not matter for speed. Each call reads its weight from memory, as in a model's decode step where every
layer's weight is read once per token: calls cycle through enough copies of the weight to exceed the last-level cache
(--hot: one copy, which a 4-bit weight of a few MB may keep in cache). GB/s: bytes of the quantized weight (codes,
scales, codebooks) per second. --json writes one record per row: kernel, shape, batch, device, time_s,
baseline_time_s, speedup.
"""

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
from readme_section import update_readme_section
from torch.utils.benchmark import Timer

from lqtk.kernels import cpu

SHAPES = [(4096, 4096), (11008, 4096), (576, 576), (1536, 576)]  # (O, I)
BATCHES = [1, 16]
COLD_BYTES = 96 << 20  # weight copies cycled through per timing: well above a 32 MB last-level cache


def random_words(rows: int, values: int, bits: int) -> torch.Tensor:
    """Random int32 words holding `values` codes of `bits` bits per row, the layout of `pack_bits`."""
    return torch.randint(-2**31, 2**31, (rows, math.ceil(values * bits / 32)), dtype=torch.int32)


def aqlm(num_codebooks: int):
    def make(out_features: int, in_features: int):
        tensors = {"codes": random_words(out_features, in_features // 8 * num_codebooks, 8),
                   "codebooks": torch.randn(num_codebooks, 256, 8).half(), "scales": torch.rand(out_features, 1).half()}
        return tensors, {"num_codebooks": num_codebooks, "nbits_per_codebook": 8, "in_group_size": 8,
                         "shape": [out_features, in_features]}
    return "aqlm", make


def affine(bits: int, group_size: int):
    def make(out_features: int, in_features: int):
        groups = math.ceil(in_features / group_size)
        tensors = {"qweight": random_words(out_features, in_features, bits),
                   "scales": torch.rand(out_features, groups).half(), "zeros": random_words(out_features, groups, bits)}
        return tensors, {"bits": bits, "group_size": group_size, "symmetric": False,
                         "shape": [out_features, in_features]}
    return "affine", make


def lut(bits: int):
    def make(out_features: int, in_features: int):
        tensors = {"qweight": random_words(out_features, in_features, bits),
                   "levels": torch.randn(out_features, 2**bits).sort(1).values.half()}
        return tensors, {"bits": bits, "shape": [out_features, in_features]}
    return "lut", make


KERNELS = {"aqlm 2x8 g8": aqlm(2), "aqlm 1x8 g8": aqlm(1), "affine int4 g128": affine(4, 128),
           "affine int2 g64": affine(2, 64), "lut 3-bit": lut(3)}


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copies_of(make, size_of, hot: bool) -> list:
    """One weight from make(), or (not hot) enough that together they are COLD_BYTES (`size_of` one: its bytes)."""
    first = make()
    return [first] + [make() for _ in range(0 if hot else math.ceil(COLD_BYTES / size_of(first)) - 1)]


def timer(call, copies: list) -> Timer:
    """A timer of call(copy), the copies taken in turn, warmed up (first-call allocations, thread pool start)."""
    turn = iter(range(1 << 62))
    step = lambda: call(copies[next(turn) % len(copies)])  # noqa: E731
    step(), step()
    return Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())  # Timer's default: 1


def side_by_side(kernel: Timer, baseline: Timer, min_time: float, repeats: int) -> tuple[float, float]:
    """Median seconds per call of each, over `repeats` blocked measurements taken in turn."""
    times = [(kernel.blocked_autorange(min_run_time=min_time).median,
              baseline.blocked_autorange(min_run_time=min_time).median) for _ in range(repeats)]
    return statistics.median(t for t, _ in times), statistics.median(b for _, b in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="Write the records here.")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS), help="Which to time.")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core).")
    parser.add_argument("--hot", action="store_true", help="Time one copy of each weight (cache-resident if small).")
    parser.add_argument("--min-time", type=float, default=0.2, help="Seconds per blocked measurement.")
    parser.add_argument("--repeats", type=int, default=5, help="Blocked measurements of each (the median is kept).")
    parser.add_argument("--update-readme", action="store_true", help="Write the table into its docs page.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit(f"the CPU kernels are not available: {cpu.build_error()}")
    torch.manual_seed(0)
    records = []
    print(f"{torch.get_num_threads()} threads, {'hot' if args.hot else 'cold'} weights")
    print(f"{'kernel':18} {'shape':>11} {'batch':>5} {'time ms':>9} {'dense ms':>9} {'speedup':>7} {'GB/s':>6}")
    for out_features, in_features in SHAPES:
        dense = copies_of(lambda: torch.randn(out_features, in_features), lambda w: w.nbytes, args.hot)
        for name in args.kernels:
            format_name, make = KERNELS[name]
            quantized = copies_of(lambda: make(out_features, in_features), lambda q: nbytes(q[0]), args.hot)
            for batch in BATCHES:
                x = torch.randn(batch, in_features)
                time_s, baseline_s = side_by_side(timer(lambda q: cpu.linear(format_name, x, *q), quantized),
                                                  timer(lambda w: F.linear(x, w), dense), args.min_time, args.repeats)
                shape = f"{out_features}x{in_features}"
                print(f"{name:18} {shape:>11} {batch:>5} {time_s * 1e3:9.3f} {baseline_s * 1e3:9.3f} "
                      f"{baseline_s / time_s:6.2f}x {nbytes(quantized[0][0]) / time_s / 1e9:6.1f}", flush=True)
                records.append({"kernel": name, "shape": shape, "batch": batch, "device": "cpu", "time_s": time_s,
                                "baseline_time_s": baseline_s, "speedup": baseline_s / time_s})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.update_readme:
        lines = [f"`python scripts/bench_kernels.py` on this machine's CPU ({torch.get_num_threads()} threads, "
                 f"{'hot' if args.hot else 'cold'} weights).", "",
                 "| kernel | out × in | batch | kernel (ms) | fp32 dense (ms) | speed-up |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['shape'].replace('x', ' × ')} | {r['batch']} | {r['time_s'] * 1e3:.3f} | "
                  f"{r['baseline_time_s'] * 1e3:.3f} | {r['speedup']:.2f}x |" for r in records]
        update_readme_section("kernels-bench", "\n".join(lines))


if __name__ == "__main__":
    main()
