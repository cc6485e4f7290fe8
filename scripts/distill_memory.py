"""Memory per process of KL distillation on the reference model: FSDP2 on 1 and 2 processes, AdamW against
bitsandbytes' 8-bit AdamW.

    python scripts/distill_memory.py [--student DIR] [--update-readme]

Runs configs/smollm2-135m/aqlm-2x8-g8-distill.yaml for one optimizer step of 2 windows (no evaluation) in each
setting, side by side in one run, and prints what each process reported in metrics.json (`memory_per_process`): its
bytes of parameters (its shards of the sharded ones), of trainable parameters, of optimizer state, and its peak
memory (CPU: peak RSS; GPU: peak allocated). bitsandbytes' optimizers cannot update FSDP2's sharded tensors, so the
8-bit rows run on one process without sharding (strategy auto) beside AdamW in the same setting."""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from readme_section import update_readme_section

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "smollm2-135m" / "aqlm-2x8-g8-distill.yaml"
SETTINGS = {  # name: (processes, strategy, optimizer)
    "FSDP2, 1 process, AdamW": (1, None, "adamw"),
    "FSDP2, 2 processes, AdamW": (2, None, "adamw"),
    "1 process, no sharding, AdamW": (1, "auto", "adamw"),
    "1 process, no sharding, AdamW8bit": (1, "auto", "adamw8bit"),
}


def run(student: Path, processes: int, strategy: str | None, optimizer: str, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "lqtk.cli", "fit", "--config", str(RECIPE), "--model.init_args.model", str(student),
           "--trainer.default_root_dir", str(out), "--trainer.devices", str(processes), "--trainer.max_steps", "1",
           "--trainer.limit_val_batches", "0", "--data.num_calibration_windows", "2", "--data.global_batch_size", "2",
           "--data.batch_size", "1", "--export.evaluate", "false",
           "--export.hf_aqlm", "false", "--model.init_args.optimizer", optimizer]
    cmd += ["--trainer.strategy", strategy] if strategy else []
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())["memory_per_process"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, default=REPO / "runs" / "table" / "aqlm-2x8-g8-ft" / "model")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    mib = 2**20
    lines = [f"Student {args.student.relative_to(REPO) if args.student.is_relative_to(REPO) else args.student}, "
             "one step of 2 windows of 512 tokens; MiB per process.", "",
             "| setting | process | parameters | trainable | optimizer state | peak memory |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, setting) in enumerate(SETTINGS.items()):
            for rank, m in enumerate(run(args.student, *setting, Path(tmp) / str(index))):
                lines.append(f"| {name} | {rank} | {m['parameters_bytes'] / mib:.1f} | "
                             f"{m['trainable_parameters_bytes'] / mib:.2f} | {m['optimizer_state_bytes'] / mib:.2f} | "
                             f"{m['peak_memory_bytes'] / mib:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.update_readme:
        update_readme_section("distill-memory", text)


if __name__ == "__main__":
    main()
