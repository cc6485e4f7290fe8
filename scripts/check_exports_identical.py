"""Do the reference recipes give the same export bit for bit at two revisions of lqtk? Runs each entry below with the
code of `--before` (a git worktree of that revision, its own recipes) and with this checkout, then compares every
tensor (name, dtype, shape, bits) and every config.json of every export folder (model/, model-*/).

    python scripts/check_exports_identical.py --before d9e811c [--root runs/identical] [--only gptq-w4g128 ...]

The runs are shortened (8 calibration windows, no evaluation; AQLM with one round) so that the whole check takes
about an hour on 2 CPU cores; the mixed-precision chain re-quantizes from the GPTQ run's Hessians with one candidate
per format (QuIP+LeanQuant 2-bit, GPTQ 3 and 4-bit, AQLM), then calibrates sequentially. Finished runs are kept:
re-running the command only compares them again.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
R = "configs/smollm2-135m"
SHORT = ["--data.num_calibration_windows", "8", "--export.evaluate", "false"]
SHORT_AQLM = {"max_rounds": 1, "kmeans_iters": 3, "adam_steps": 2}
QUANTIZER = "--model.init_args.quantizer.init_args."
CANDIDATES = [
    {"class_path": "lqtk.quant.QuIP", "init_args": {"inner": {"class_path": "lqtk.quant.LeanQuant", "init_args": {
        "bits": 2, "grid": "nonuniform", "group_size": None, "exponent": 2.0, "act_order": True}}}},
    {"class_path": "lqtk.quant.GPTQ", "init_args": {"bits": 3, "group_size": 128, "observer": "mse", "mse_grid": 20}},
    {"class_path": "lqtk.quant.GPTQ", "init_args": {"bits": 4, "group_size": 128, "observer": "mse", "mse_grid": 20}},
    {"class_path": "lqtk.quant.AQLM", "init_args": SHORT_AQLM},
]
# recipe -> (its extra arguments, the entry whose export it starts from or None)
ENTRIES = {
    "gptq-w4g128": ([], None),
    "quip-w3": ([], None),
    "leanquant-nu-w3": ([], None),
    "gptq-w4a8": ([], None),
    "aqlm-2x8-g8": ([arg for key, value in SHORT_AQLM.items() for arg in (QUANTIZER + key, str(value))], None),
    "mixed-3.0": (["--model.init_args.candidates", json.dumps(CANDIDATES), "--model.init_args.sensitivity_windows",
                   "4"], "gptq-w4g128"),
    "mixed-3.0-seq": ([], "mixed-3.0"),
}


def run(side: str, code: Path, root: Path, entry: str) -> None:
    """Run `entry` with the lqtk of `code` into root/side/entry (skipped when finished)."""
    extra, start = ENTRIES[entry]
    out = root / side / entry
    if (out / "metrics.json").exists():
        return
    command = [sys.executable, "-m", "lqtk.cli", "fit", "--config", str(code / R / f"{entry}.yaml"),
               "--trainer.default_root_dir", str(out), "--overwrite", "true", *SHORT, *extra]
    if start is not None:
        command += ["--model.init_args.model", str(root / side / start / "model")]
    if (out / "checkpoints" / "last.ckpt").exists():
        command += ["--ckpt_path", "last"]
    print(f"[{side}] {entry}", flush=True)
    # cwd first on sys.path: `-m lqtk.cli` imports the lqtk of `code`
    subprocess.run(command, cwd=code, check=True, env=os.environ | {"PYTHONPATH": str(code)})


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def compare(before: Path, after: Path) -> tuple[int, list[str]]:
    """(tensors compared, differences) over the export folders of two runs."""
    folders = sorted(p.name for p in before.iterdir() if p.is_dir() and (p.name == "model" or
                                                                          p.name.startswith("model-")))
    names = sorted(p.name for p in after.iterdir() if p.is_dir() and (p.name == "model" or p.name.startswith("model-")))
    differences = [] if folders == names else [f"export folders {folders} != {names}"]
    count = 0
    for folder in folders:
        if not (after / folder).is_dir():
            continue
        a, b = tensors(before / folder), tensors(after / folder)
        if a.keys() != b.keys():
            differences.append(f"{folder}: tensor names differ ({sorted(a.keys() ^ b.keys())[:3]})")
        for name in a.keys() & b.keys():
            count += 1
            if a[name].dtype != b[name].dtype or a[name].shape != b[name].shape or not torch.equal(a[name], b[name]):
                differences.append(f"{folder}/{name}")
        configs = [json.loads((side / folder / "config.json").read_text()) for side in (before, after)]
        if configs[0] != configs[1]:
            differences.append(f"{folder}/config.json")
    return count, differences


def run_before(revision: str, root: Path, entries: list[str]) -> None:
    """The runs of `entries` with the code and recipes of git `revision`."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), revision], cwd=ROOT, check=True)
        try:
            for entry in entries:
                run("before", base, root, entry)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare with (e.g. a commit on main)")
    parser.add_argument("--root", default="runs/identical", help="folder of the runs (before/ and after/)")
    parser.add_argument("--only", nargs="+", choices=list(ENTRIES), help="these entries (and what they start from)")
    parser.add_argument("--sides", nargs="+", choices=["before", "after"], default=["before", "after"],
                        help="which runs to make (e.g. the runs before a change first, while it is being made)")
    opts = parser.parse_args()
    root = Path(opts.root).resolve()
    entries = opts.only or list(ENTRIES)
    while missing := [ENTRIES[e][1] for e in entries if ENTRIES[e][1] and ENTRIES[e][1] not in entries]:
        entries = missing + entries  # what they start from, first
    if "before" in opts.sides:
        run_before(opts.before, root, entries)
    if "after" not in opts.sides:
        return
    for entry in entries:
        run("after", ROOT, root, entry)
    print("\n| entry | tensors compared | differences |\n|---|---|---|")
    failed = False
    for entry in entries:
        count, differences = compare(root / "before" / entry, root / "after" / entry)
        failed |= bool(differences)
        print(f"| {entry} | {count} | {len(differences)} {differences[:3] if differences else ''} |")
    print(f"\nrevision {opts.before} vs this checkout: {'DIFFERENT' if failed else 'bit-identical'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
