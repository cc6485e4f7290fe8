"""Integer compute of W4A8 layers against fp32 dense matmuls, and prefill with and without token pruning, side by side.

    .venv/bin/python scripts/bench_actquant.py [--json FILE] [--update-readme]

GEMMs at prefill sizes (512 and 2048 tokens) for the reference model's shapes and a 4096 x 4096 layer: a W4A8 layer
(4-bit codes, TRIP exponents ≤ 2) computed in integers (lqtk.quant.int_matmul: per-token uint8 codes of the input,
int32 accumulation in oneDNN's u8×s8 kernels, then the scales), per output channel and per group of 128, each time
including the run-time quantization of the input; the baseline is F.linear with the fp32 weight. Then prefill of the
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
from lqtk.models import load_causal_lm
from lqtk.quant.activations import quantize_tokens
from lqtk.quant.int_matmul import grouped_linear, int_linear, pack_weight
from lqtk.streaming import final_hidden_states
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
        weight = torch.randint(-60, 61, (out_features, in_features))  # (q − z)·2^α of 4-bit codes
        channel_scale = torch.rand(out_features) * 1e-2
        group_scales = torch.rand(out_features, -(-in_features // GROUP)) * 1e-2  # a shorter last group of 576
        dense = (weight * group_scales[:, torch.arange(in_features) // GROUP]).float()
        groups = weight.split(GROUP, dim=1)
        group_sums = torch.stack([g.sum(1) for g in groups], 1).float()
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features)
            packed = pack_weight(weight, tokens)
            packed_groups = [pack_weight(g, tokens) for g in groups]
            weight_sum = weight.sum(1).float()

            def per_channel():
                codes, scale, zero = quantize_tokens(x, 8)
                return int_linear(codes.to(torch.uint8), scale, zero, packed, channel_scale, weight_sum)

            def per_group():
                codes, scale, zero = quantize_tokens(x, 8)
                return grouped_linear(codes.to(torch.uint8), scale, zero, packed_groups, group_scales, group_sums,
                                      GROUP)

            baseline = median_time(lambda: F.linear(x, dense))
            for kernel, fn in [("w4a8 int8 per-channel", per_channel), (f"w4a8 int8 g{GROUP}", per_group)]:
                elapsed = median_time(fn)
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
