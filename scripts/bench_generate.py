"""Batch-1 greedy decoding of the reference model, quantized against fp32, side by side in one run.

    .venv/bin/python scripts/bench_generate.py --models runs/table/gptq-w4g128/model [...] [--new-tokens 64]
                                              [--json FILE] [--update-readme]

Each quantized export (an lqtk `model/` folder) decodes with the kernels (lqtk.kernels: one GEMV from the codes per
Linear and token) and without them (LQTK_KERNELS=off: the weight decoded once, then fp32 GEMVs), the fp32 model as
it is. The prompt is the first 32 tokens of the evaluation text; `generate` runs greedy with the KV cache for a fixed
number of new tokens. Times are the median of three runs, the models interleaved, after a warm-up. The greedy tokens
of the kernel and dense paths of one export are checked to be the same."""

import argparse
import json
import os
import statistics
import time

import torch
from readme_section import update_readme_section

from lqtk.data import TextDataModule
from lqtk.models import load_causal_lm


def decode(model, prompt: torch.Tensor, new_tokens: int, kernels: str) -> tuple[float, torch.Tensor]:
    os.environ["LQTK_KERNELS"] = kernels
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
    return time.perf_counter() - start, out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="lqtk export folders of the reference model")
    parser.add_argument("--fp", default="smollm2-135m", help="the fp model they were made from")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", help="Write one record per model and path to this file.")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()

    prompt = TextDataModule(tokenizer=args.fp, seq_len=32).evaluation_windows()[:1]
    runs = [("fp32", load_causal_lm(args.fp).eval(), "off")]
    for path in args.models:
        model = load_causal_lm(path).eval()
        runs += [(f"{path} (kernels)", model, "auto"), (f"{path} (decoded, LQTK_KERNELS=off)", model, "off")]
    times = {label: [] for label, _, _ in runs}
    tokens = {}
    for repeat in range(4):  # the first is the warm-up
        for label, model, kernels in runs:
            elapsed, tokens[label] = decode(model, prompt, args.new_tokens, kernels)
            if repeat:
                times[label].append(elapsed)
    for path in args.models:
        same = torch.equal(tokens[f"{path} (kernels)"], tokens[f"{path} (decoded, LQTK_KERNELS=off)"])
        print(f"{path}: kernel and dense paths generate the same tokens: {same}")
    fp_time = statistics.median(times["fp32"])
    records = [{"model": label, "new_tokens": args.new_tokens, "time_s": statistics.median(times[label]),
                "tokens_per_s": args.new_tokens / statistics.median(times[label]),
                "speedup": fp_time / statistics.median(times[label])} for label, _, _ in runs]
    lines = [f"`python scripts/bench_generate.py` on this machine ({torch.get_num_threads()} threads): batch-1 greedy "
             f"decoding of {args.new_tokens} tokens after a 32-token prompt.", "",
             "| model | tokens/s | speed-up over fp32 |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |" for r in records]
    text = "\n".join(lines)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    if args.update_readme:
        update_readme_section("generate-bench", text)


if __name__ == "__main__":
    main()
