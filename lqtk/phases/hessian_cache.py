"""The Hessians a calibration run keeps on disk (`LayerwiseCalibration(save_hessians=true)`), so that its layers can
be quantized again later with other settings or methods without running the model (`lqtk.phases.Requantize`).

    <run folder>/hessians/<the group's first Linear, full name>.safetensors
        hessian   (I, I) fp32: the H the group was quantized with (H = 2/n Σ xxᵀ of its calibration inputs, or the
                  identity for a fallback group), one file per group of Linears that read the same input (q/k/v)
        inputs    (n, I): the sample of those inputs, for methods that take one (activation quantization)
        metadata  "linears": JSON list of the group's Linears (full names)

With `sequential`, a group's inputs came through the layers quantized before it in that run: a layer quantized
again from its file sees what those layers were then, not what they are re-quantized to.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lqtk.weights import save_file_atomically


def save_group(folder: Path, linears: list[str], hessian: torch.Tensor, inputs: torch.Tensor | None) -> None:
    tensors = {"hessian": hessian.float().cpu()}
    if inputs is not None:
        tensors["inputs"] = inputs.float().cpu()
    save_file_atomically(tensors, folder / f"{linears[0]}.safetensors", {"linears": json.dumps(linears)})


def group_files(folder: Path) -> dict[str, Path]:
    """Each cached Linear (full name) → its group's file."""
    files = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            files.update(dict.fromkeys(json.loads(f.metadata()["linears"]), file))
    return files


def load_group(file: Path) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """(the group's Linears, its H, its input sample or None)."""
    with safe_open(file, "pt") as f:
        inputs = f.get_tensor("inputs") if "inputs" in f.keys() else None
        return json.loads(f.metadata()["linears"]), f.get_tensor("hessian"), inputs
