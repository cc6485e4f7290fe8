"""Speed and error of lqtk's AQLM on three layers of the reference model, against the authors' AQEngine.

    python scripts/bench_aqlm.py [--json FILE] [--reference-repo DIR] [--aqlm-args beam_size=8 ...] [--update-readme]

Block 0's q_proj, gate_proj and down_proj of SmolLM2-135M-Instruct are quantized (2x8, groups of 8, the recipe
aqlm-2x8-g8's settings) with H from 32 calibration windows of 512 tokens of the fp model. Printed per layer: seconds
and the relative proxy error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), beside the figures of the authors' AQEngine measured on the
same kind of machine (their README settings for 2x8 g8: Adam lr 1e-4, 100 steps per round, beam 1, relative tolerance
0.01, 2 threads). With --reference-repo (a checkout of Vahe1994/AQLM) their AQEngine runs on the same H in the same
run (scripts/aqlm_reference.py) and the ratios are taken against it instead. --json writes one record per layer:
layer, seconds, proxy_error (and the reference's, when run); --update-readme puts the table in the docs page."""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from readme_section import update_readme_section

from lqtk.anatomy import decoder_blocks
from lqtk.data import TextDataModule
from lqtk.models import load_causal_lm
from lqtk.quant import AQLM, HessianAccumulator

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"]
ANCHOR = {"self_attn.q_proj": (27, 1.06e-3), "mlp.gate_proj": (46, 3.50e-2), "mlp.down_proj": (87, 1.52e-2)}


class _Stop(Exception):
    pass


@torch.no_grad()
def block0_hessians(windows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (W, H)} for the LAYERS of block 0, H accumulated over `windows` run through the fp model."""
    model = load_causal_lm("smollm2-135m")
    block = decoder_blocks(model)[0]
    state = {name: HessianAccumulator(block.get_submodule(name).in_features) for name in LAYERS}

    def hook(name):
        def accumulate(module, args):
            state[name].add(args[0])
            if name == LAYERS[-1]:
                raise _Stop  # down_proj is the block's last Linear: nothing after it is needed

        return accumulate

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in LAYERS]
    for batch in windows.split(8):
        try:
            model(batch, use_cache=False)
        except _Stop:
            pass
    for handle in handles:
        handle.remove()
    return {name: (block.get_submodule(name).weight.detach().clone(), state[name].hessian()) for name in LAYERS}


def recipe_quantizer(overrides: list[str]) -> AQLM:
    recipe = yaml.safe_load((REPO / "configs" / "smollm2-135m" / "aqlm-2x8-g8.yaml").read_text())
    settings = recipe["model"]["init_args"]["quantizer"]["init_args"]
    settings.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in overrides)})
    return AQLM(**settings)


def proxy_error(W: torch.Tensor, H: torch.Tensor, W_hat: torch.Tensor) -> float:
    delta = W - W_hat
    return ((delta @ H * delta).sum() / (W @ H * W).sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="Write the per-layer records here.")
    parser.add_argument("--reference-repo", help="A checkout of Vahe1994/AQLM: run its AQEngine side by side.")
    parser.add_argument("--aqlm-args", nargs="*", default=[], help="Overrides of the recipe's AQLM settings, k=v.")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    windows = TextDataModule(tokenizer="smollm2-135m", num_calibration_windows=32, seq_len=512).calibration_windows()
    layers = block0_hessians(windows)
    quantizer = recipe_quantizer(args.aqlm_args)
    print(f"lqtk {quantizer}", flush=True)

    reference = {}
    if args.reference_repo:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(layers, Path(tmp) / "layers.pt")
            cmd = [sys.executable, str(REPO / "scripts" / "aqlm_reference.py"), "--repo", args.reference_repo,
                   "--layers", str(Path(tmp) / "layers.pt"), "--json", str(Path(tmp) / "reference.json")]
            subprocess.run(cmd, check=True)
            reference = {r["layer"]: r for r in json.loads((Path(tmp) / "reference.json").read_text())}

    records, lines = [], ["| layer | lqtk (s) | lqtk error | {0} (s) | {0} error | time × | error × |",
                          "|---|---|---|---|---|---|---|"]
    for name, (W, H) in layers.items():
        start = time.perf_counter()
        quantized = quantizer.quantize(W, H)
        seconds = time.perf_counter() - start
        record = {"layer": name, "seconds": seconds, "proxy_error": proxy_error(W, H, quantized.dequantize()),
                  "rounds": len(quantized.history["objective"]) - 1}
        base_seconds, base_error = ANCHOR[name]
        against = "AQEngine"
        if name in reference:
            record |= {"reference_seconds": reference[name]["seconds"],
                       "reference_proxy_error": reference[name]["proxy_error"]}
            base_seconds, base_error = reference[name]["seconds"], reference[name]["proxy_error"]
        records.append(record)
        lines[0] = lines[0].format(against)
        lines.append(f"| {name} | {seconds:.1f} | {record['proxy_error']:.3e} | {base_seconds:.1f} | {base_error:.3e} "
                     f"| {seconds / base_seconds:.2f} | {record['proxy_error'] / base_error:.2f} |")
        print(f"{name:17s} lqtk {seconds:6.1f} s, error {record['proxy_error']:.3e} ({record['rounds']} rounds) | "
              f"{against} {base_seconds:6.1f} s, error {base_error:.3e} | time × {seconds / base_seconds:.2f}, "
              f"error × {record['proxy_error'] / base_error:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    if args.update_readme:
        source = ("the authors' AQEngine (run side by side on the same H)" if reference
                  else "the authors' AQEngine (figures measured on the same kind of machine)")
        update_readme_section("aqlm-bench", f"lqtk {quantizer} against {source}; 2 CPU threads.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
