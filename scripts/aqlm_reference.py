"""Run the AQLM authors' AQEngine (a checkout of github.com/Vahe1994/AQLM) on saved (W, H) pairs.

    python scripts/aqlm_reference.py --repo DIR --layers layers.pt --json out.json

layers.pt is torch.save({layer: (W [O, I], H [I, I])}) with H in lqtk's convention, H = 2/n · Σ xxᵀ. Each layer is
quantized on the CPU with 2 threads and the settings of their README's quantization command (main.py defaults for
what it leaves out), and one record {layer, seconds, proxy_error} per layer is written, proxy_error being
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of their result and seconds the wall time of AQEngine.quantize (k-means init included).
Used by scripts/bench_aqlm.py --reference-repo; nothing of their code is copied into lqtk."""

import argparse
import contextlib
import json
import random
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch


def engine_args(args: argparse.Namespace) -> Namespace:
    """The namespace AQEngine.quantize reads, as their main.py would build it for the README command."""
    return Namespace(
        devices=[torch.device("cpu")],
        num_codebooks=args.num_codebooks,  # README table: 2x8
        nbits_per_codebook=args.nbits,
        in_group_size=args.in_group_size,  # g8 (main.py default 8)
        out_group_size=1,  # main.py default
        scale_nbits=0,  # main.py default: one scale per output row
        codebook_value_nbits=16,  # main.py default: fp16 codebooks, not quantized
        codebook_value_num_groups=1,  # main.py default
        init_max_iter=100,  # main.py default
        init_max_points_per_centroid=None,  # main.py default; the README command leaves it unset (all points)
        lr=1e-4,  # main.py default (README command leaves it unset)
        steps_per_epoch=100,  # main.py default
        beam_size=1,  # main.py default
        relative_mse_tolerance=0.01,  # README command (main.py default None would never stop early)
        max_epochs=args.max_epochs,  # main.py default 1000: in practice the tolerance ends it
        print_frequency=10,  # main.py default
    )


def quantize(aq_engine_cls, W: torch.Tensor, H: torch.Tensor, settings: Namespace, seed: int) -> torch.Tensor:
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.float().clone()
    engine = aq_engine_cls(layer)
    # Their add_batch keeps XTX = (1/n) Σ xxᵀ as a running mean in float64 (no factor 2), so lqtk's H = 2/n · Σ xxᵀ
    # is exactly 2 · XTX for the same inputs: H / 2 reproduces what their pipeline would hold. The scale matters
    # beyond the ratio: Adam's eps and the printed loss see the gradient's absolute size.
    engine.XTX = (H.double() / 2).contiguous()
    engine.nsamples = 1  # only read by add_batch, which is not used
    # main.py seeds python, numpy and torch (datautils.set_seed) before quantizing; k-means init draws from torch's RNG
    random.seed(seed)
    torch.manual_seed(seed)
    return engine.quantize(args=settings, verbose=True)().detach()


def proxy_error(W: torch.Tensor, H: torch.Tensor, W_hat: torch.Tensor) -> float:
    W, H, delta = W.double(), H.double(), (W - W_hat).double()
    return ((delta @ H * delta).sum() / (W @ H * W).sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="A checkout of Vahe1994/AQLM (the folder with aq_engine.py).")
    parser.add_argument("--layers", required=True, help="torch.save({layer: (W, H)}), H = 2/n · Σ xxᵀ.")
    parser.add_argument("--json", required=True, help="Write the per-layer records here.")
    parser.add_argument("--num-codebooks", type=int, default=2)
    parser.add_argument("--nbits", type=int, default=8, help="Bits per codebook (smaller only for smoke tests).")
    parser.add_argument("--in-group-size", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=1000, help="Beam-search rounds at most (main.py default).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default="/dev/null", help="Where their progress prints go (thousands of lines).")
    args = parser.parse_args()
    torch.set_num_threads(2)

    repo = Path(args.repo).resolve()
    sys.path.insert(0, str(repo))  # their modules import each other as `aq_engine` and `src.*` from the repo root
    from aq_engine import AQEngine

    settings = engine_args(args)
    layers = torch.load(args.layers)
    records = []
    with open(args.log, "a") as log:
        # Their TorchScript functions are specialised on the first calls: a small warm-up keeps that out of the
        # first layer's time. rows · 64 / g groups = one codebook's worth of points for the k-means init.
        warm = torch.randn(max(1, 2**args.nbits * args.in_group_size // 64), 64)
        warm_settings = Namespace(**{**vars(settings), "max_epochs": 1, "steps_per_epoch": 5})
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            quantize(AQEngine, warm, torch.eye(64), warm_settings, args.seed)
        for name, (W, H) in layers.items():
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                start = time.perf_counter()
                W_hat = quantize(AQEngine, W, H, settings, args.seed)
                seconds = time.perf_counter() - start
            records.append({"layer": name, "seconds": seconds, "proxy_error": proxy_error(W, H, W_hat)})
            print(f"{name:17s} AQEngine {seconds:6.1f} s, error {records[-1]['proxy_error']:.3e}", flush=True)
    Path(args.json).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
