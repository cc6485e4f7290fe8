"""Integer compute of W4A8 layers against fp32 dense matmuls, and prefill with and without token pruning, side by side.

    .venv/bin/python scripts/bench_actquant.py [--json FILE] [--update-readme]

GEMMs at prefill sizes (512 and 2048 tokens) for the reference model's shapes and a 4096 x 4096 layer: a W4A8 layer
computed in integers (lqtk.kernels.int_gemm: per-token uint8 codes of the input, exact int32 sums, then the scales, in
one call), per output channel and per group of 128, each time including the run-time quantization of the input, for
plain 4-bit weights (|q − z| ≤ 15) and weights widened by TRIP factors (|(q − z)·2^α| ≤ 60, which need the kernel's
slower int16 chain); the baseline is F.linear with the fp32 weight. Then prefill of the
reference model (fp32, 8 windows of 512 tokens of the evaluation text, the block-by-block forward of the
evaluation) without pruning and with 25% and 50% of the tokens pruned from block 10 on. Times are the median of
several runs after a warm-up; --json writes one record per GEMM (kernel, shape, tokens, time_s, baseline_time_s,
speedup)."""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from readme_section import update_readme_section

from lqtk.data import TextDataModule
from lqtk.forward import final_hidden_states
from lqtk.kernels import int_gemm
from lqtk.models import load_causal_lm
from lqtk.token_pruning import PruningRun, TokenPruning

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]  # (out, in): q/o, gate/up, down, a 7B-wide layer
TOKENS = [512, 2048]
GROUP = 128


def median_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_records() -> list[dict]:
    torch.manual_seed(0)
    records = []
    for out_features, in_features in SHAPES:
        for max_abs, weights in [(15, "4-bit codes"), (60, "TRIP α ≤ 2")]:
            weight = torch.randint(-max_abs, max_abs + 1, (out_features, in_features))  # (q − z)·2^α
            for group_size in [None, GROUP]:
                scales = torch.rand(out_features, 1 if group_size is None else -(-in_features // GROUP)) * 1e-2
                columns = torch.arange(in_features) // (group_size or in_features)  # a shorter last group of 576
                dense = (weight * scales[:, columns]).float()
                packed = int_gemm.pack_w4(weight, group_size)
                for tokens in TOKENS:
                    x = torch.randn(tokens, in_features)
                    baseline = median_time(lambda: F.linear(x, dense))
                    elapsed = median_time(lambda: int_gemm.w4a8_linear(x, packed, scales))
                    kernel = f"w4a8 {'per-channel' if group_size is None else f'g{group_size}'}, {weights}"
                    records.append({"kernel": kernel, "shape": [out_features, in_features], "tokens": tokens,
                                    "time_s": elapsed, "baseline_time_s": baseline, "speedup": baseline / elapsed})
                    print(json.dumps(records[-1]), flush=True)
    return records


@torch.no_grad()
def prefill_records() -> list[dict]:
    model = load_causal_lm("smollm2-135m")
    windows = TextDataModule(tokenizer="smollm2-135m", seq_len=512).evaluation_windows()[:8]
    rows = []
    for label, pruning in [("no pruning", None), ("prune 25% from block 10", TokenPruning(10, 0.75)),
                           ("prune 50% from block 10", TokenPruning(10, 0.5))]:
        elapsed = median_time(lambda: final_hidden_states(model, windows, 8, pruning and PruningRun(pruning)), 3)
        rows.append({"prefill": label, "tokens": windows.numel(), "time_s": elapsed,
                     "tokens_per_s": windows.numel() / elapsed})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(gemms: list[dict], prefill: list[dict]) -> str:
    lines = [f"`python scripts/bench_actquant.py` on this machine ({torch.get_num_threads()} threads); the integer "
             "times include quantizing the input per token.", "",
             "| kernel | out × in | tokens | integer (ms) | fp32 dense (ms) | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['shape'][0]} × {r['shape'][1]} | {r['tokens']} | {r['time_s'] * 1e3:.2f} | "
              f"{r['baseline_time_s'] * 1e3:.2f} | {r['speedup']:.2f}x |" for r in gemms]
    base = prefill[0]["time_s"]
    lines += ["", "| SmolLM2-135M prefill (fp32, 8 × 512 tokens) | time (s) | tokens/s | speed-up |",
              "|---|---|---|---|"]
    lines += [f"| {r['prefill']} | {r['time_s']:.2f} | {r['tokens_per_s']:.0f} | {base / r['time_s']:.2f}x |"
              for r in prefill]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="Write the GEMM records to this file.")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    gemms, prefill = gemm_records(), prefill_records()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(gemms, f, indent=2)
    text = table(gemms, prefill)
    print(text)
    if args.update_readme:
        update_readme_section("actquant-bench", text)


if __name__ == "__main__":
    main()
