"""Runs of several recipes: chains (each phase on the previous phase's export) and sweeps (several chains on one
model, their metrics gathered into a report). Every phase runs as `lqtk fit --config` in its own process, in its own
run folder; a finished phase (its `metrics.json` written) is skipped and an interrupted one resumes from its last
checkpoint, so running the same chain or sweep again continues it.

    run_chain(configs, run_dirs, shared)                                -> the last phase's run folder
    run_sweep(chains, root, report_dir, shared, tasks, task_items)     -> ROOT/sweep.json (+ report.md, pareto.png)
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from lqtk.errors import LqtkError
from lqtk.models import resolve_model
from lqtk.report import write_report

LQTK = [sys.executable, "-m", "lqtk.cli"]


def run_chain(configs: list[Path], run_dirs: list[Path | None], shared: list[str]) -> Path:
    """Run the phases `configs` (recipe files, in order) in `run_dirs` (None: the recipe's trainer.default_root_dir),
    each phase after the first on the previous one's export, with the arguments `shared` given to every phase;
    finished phases are skipped and an interrupted one resumes. Returns the last phase's run folder."""
    for config in configs:  # all checked before the first phase starts
        if not config.is_file():
            raise LqtkError(f"recipe {config} does not exist: pass the YAML files of the chain's phases, in order")
    run_dirs = [Path(run_dir or recipe_root_dir(config)) for config, run_dir in zip(configs, run_dirs)]
    previous_export = None
    for config, run_dir in zip(configs, run_dirs):
        phase = ["fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir), *shared]
        if previous_export is not None:
            phase += ["--model.init_args.model", str(previous_export)]
        # what the run is made from, kept beside it: a finished run is reused only for the same recipe and arguments
        made_from = comparable({"recipe": yaml.safe_load(config.read_text()), "arguments": shared,
                                "model": None if previous_export is None else str(previous_export)})
        previous_export = run_dir / "model"
        if (run_dir / "metrics.json").exists():
            kept = run_dir / "made_from.json"
            if kept.exists() and comparable(json.loads(kept.read_text())) != made_from:
                raise LqtkError(f"{run_dir} is finished but was made from another recipe or other arguments than "
                                f"{config} and this command give: remove it (rm -r {run_dir}) to run it again, or "
                                "restore the recipe it was made from")
            print(f"lqtk chain: {config.stem} is finished ({run_dir}); skipped", flush=True)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "made_from.json").write_text(json.dumps(made_from, indent=2) + "\n")
        if (run_dir / "checkpoints" / "last.ckpt").exists():
            phase += ["--ckpt_path", "last"]
        if previous_export.exists():  # killed after the export was written but before its metrics
            phase += ["--overwrite", "true"]
        print(f"lqtk chain: {config.stem} → {run_dir}", flush=True)
        if subprocess.run([*LQTK, *phase]).returncode != 0:
            raise LqtkError(f"phase {config.stem} failed (see above); fix it and run the same command again: finished "
                            "phases are skipped and this one resumes from its last checkpoint")
    return run_dirs[-1]


def comparable(made_from: dict) -> dict:
    """`made_from` as JSON would give it back, with its existing paths resolved: the same files spelled otherwise
    (relative or absolute, from another folder) are the same run."""
    def resolved(value):
        return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value
    return json.loads(json.dumps({**made_from, "model": resolved(made_from["model"]),
                                  "arguments": [resolved(argument) for argument in made_from["arguments"]]}))


def recipe_root_dir(config: Path) -> str:
    """The run folder a recipe names (trainer.default_root_dir)."""
    root = (yaml.safe_load(config.read_text()) or {}).get("trainer", {}).get("default_root_dir")
    if root is None:
        raise LqtkError(f"{config} sets no trainer.default_root_dir: set one, or give the chain --root DIR")
    return root


def run_sweep(chains: list[list[Path]], root: Path, report_dir: Path | None, shared: list[str], tasks: list[str],
              task_items: int) -> Path:
    """Run each chain of recipes in `chains`, phase k of a chain in `root/<the first k recipes' stems joined by +>`
    (chains that start alike share those runs), with the arguments `shared` given to every phase; then gather every
    chain's final metrics, its export's size and (with `tasks`) its zero-shot scores, and the fp model's, into
    `root/sweep.json`, with a table and a Pareto plot in `report_dir` (None: `root`). Returns sweep.json's path."""
    missing = [str(config) for configs in chains for config in configs if not config.is_file()]
    if missing:  # all checked before the first run starts
        raise LqtkError(f"recipes not found: {', '.join(missing)}; pass YAML files (A.yaml+B.yaml for a chain)")
    results = []
    for configs in chains:
        stems = [config.stem for config in configs]
        name = "+".join(stems)  # phase k runs in ROOT/<stems up to k>: entries with a common start share its runs
        last = run_chain(configs, [root / "+".join(stems[: k + 1]) for k in range(len(stems))], shared)
        results.append({"name": name, "recipes": [str(config) for config in configs], "run_dir": str(last),
                        "metrics": json.loads((last / "metrics.json").read_text()),
                        "size_mb": folder_mb(last / "model"),
                        **({"zero_shot": scored(last / "model", last / "zero_shot.json", tasks, task_items)}
                           if tasks else {})})
    first = json.loads((root / chains[0][0].stem / "metrics.json").read_text())  # calibrated from the fp model
    fp_dir = resolve_model(first["model"])
    fp = {"model": str(fp_dir), "bits_per_weight": fp_bits(fp_dir), "size_mb": folder_mb(fp_dir),
          "perplexity": first["fp_perplexity"],
          **({"zero_shot": scored(fp_dir, root / "fp" / "zero_shot.json", tasks, task_items)} if tasks else {})}
    (root / "sweep.json").write_text(json.dumps({"fp": fp, "runs": results}, indent=2) + "\n")
    report, plot = write_report(results, Path(report_dir or root), fp)
    print(f"lqtk sweep: {len(results)} runs in {root / 'sweep.json'}; report {report}, plot {plot}", flush=True)
    return root / "sweep.json"


def scored(model: Path, output: Path, tasks: list[str], task_items: int) -> dict:
    """The zero-shot scores of `model` on `tasks` kept in `output`, measured by `lqtk evaluate` if not there yet (or
    for other tasks or items)."""
    if output.exists():
        kept = json.loads(output.read_text())
        if set(kept["zero_shot"]) == set(tasks) and kept["task_items"] == task_items:
            return kept["zero_shot"]
    print(f"lqtk sweep: zero-shot tasks of {model}", flush=True)
    command = [*LQTK, "evaluate", "--model", str(model), "--no-perplexity", "--tasks", *tasks,
               "--task-items", str(task_items), "--output", str(output)]
    if subprocess.run(command).returncode != 0:
        raise LqtkError(f"the zero-shot evaluation of {model} failed (see above); run the same command again")
    return json.loads(output.read_text())["zero_shot"]


def folder_mb(folder: Path) -> float:
    """Size of a model folder's weights (its safetensors files) in MB."""
    return sum(file.stat().st_size for file in Path(folder).glob("*.safetensors")) / 1e6


def fp_bits(folder: Path) -> int:
    """Bits per weight of an fp model folder, from the dtype its config records."""
    config = json.loads((Path(folder) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, dtype).itemsize * 8
