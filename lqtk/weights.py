"""A model folder's safetensors: reading tensors by name from one file or from shards, writing shards as
transformers does, and atomic saves (a killed run leaves no file that looks complete)."""

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lqtk.errors import LqtkError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_BYTES = 128 * 2**20  # shard size limit of the export: at most this much of the export is held for writing
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@contextmanager
def open_weights(file: Path):
    """`safe_open(file)`, a file that is not a readable safetensors file (truncated, garbage) refused by name."""
    try:
        f = safe_open(file, "pt")
    except (SafetensorError, OSError) as err:
        raise LqtkError(f"{file} is not a readable safetensors file ({err}): the model folder is truncated or corrupt "
                        "(an interrupted copy or download?); re-create it or point to another one") from err
    with f:
        yield f


def check_finite(weight: torch.Tensor, name: str) -> None:
    if not torch.isfinite(weight).all():
        raise LqtkError(f"{name} has NaN/Inf weights: the model is corrupt or was saved after a diverged run")


class WeightFiles:
    """Where each tensor of a model lives: the folder's `model.safetensors`, or the shards its
    `model.safetensors.index.json` lists, then files added later (a finished block's) in their place. Every read
    opens the files it needs and closes them, so no mapped page of the weights stays in the process."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        self.views: dict[str, list[tuple[str, int | None]]] = {}  # name -> the stored tensors (or rows) it joins
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise LqtkError(f"{index} is not a shard index (no weight_map: {err!r}): the model folder is corrupt; "
                                "re-create it or point to another one") from err
            self.files = {name: self.folder / file for name, file in weight_map.items()}
            missing = sorted({str(file) for file in self.files.values() if not file.is_file()})
            if missing:
                raise LqtkError(f"{index} lists shards that do not exist ({missing[:3]}): the folder is "
                                "incomplete; re-create it")
            for shard in sorted(set(self.files.values())):  # every shard's header read now, not when its block runs
                with open_weights(shard) as f:
                    absent = sorted({name for name, file in self.files.items() if file == shard} - set(f.keys()))
                    if absent:
                        raise LqtkError(f"{index} places {absent[0]} in {shard.name}, which does not hold it: the "
                                        "folder is corrupt; re-create it")
        elif (self.folder / WEIGHTS_NAME).is_file():
            self.add(self.folder / WEIGHTS_NAME)
        else:
            raise LqtkError(f"{self.folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}: the model folder is "
                            "incomplete; re-create it or point to another one")

    def add(self, file: Path) -> None:
        with open_weights(file) as f:
            self.files.update(dict.fromkeys(f.keys(), Path(file)))

    def add_views(self, views: dict[str, list[tuple[str, int | None]]]) -> None:
        """Tensors stored otherwise: {name: [(stored name, row or None), ...]}, the parts joined along dim 0 (MoE
        experts read as one Linear each from fused 3D weights, or from separate gate and up projections)."""
        missing = sorted({stored for parts in views.values() for stored, _ in parts} - self.files.keys())
        if missing:
            raise LqtkError(f"{self.folder} stores its MoE experts in a layout lqtk cannot read block by block (no "
                            f"{missing[0]}): convert the checkpoint to transformers' fused or gate/up/down layout")
        self.views.update(views)
        self.files.update({name: self.files[parts[0][0]] for name, parts in views.items()})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors, copied out of the file mapping one at a time: a tensor that views the mapping keeps the
        whole file's touched pages resident for as long as any of its tensors lives (a block's norms would keep
        its quantized Linears' fp weights in memory)."""
        tensors = {}
        for name in names:
            parts = []
            for stored, row in self.views.get(name, [(name, None)]):
                with open_weights(self.files[stored]) as f:
                    parts.append(f.get_tensor(stored) if row is None else f.get_slice(stored)[row:row + 1][0])
            tensors[name] = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        return tensors

    def meta(self, name: str) -> torch.Tensor:
        """An empty tensor of `name`'s shape and dtype, from the file header."""
        with open_weights(self.files[name]) as f:
            info = f.get_slice(name)
            return torch.empty(info.get_shape(), dtype=_DTYPES[info.get_dtype()], device="meta")

    def check_finite(self) -> None:
        """Refuse NaN/Inf weights before any work, reading one tensor at a time."""
        for name, file in self.files.items():
            if name in self.views:  # made of stored tensors, which are checked themselves
                continue
            with open_weights(file) as f:  # checked in the mapping: no copy
                tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    check_finite(tensor, f"{self.folder}: tensor {name}")


def save_file_atomically(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file` into a temporary name renamed to `file` once written: a run killed while writing
    leaves no file that looks complete."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    tmp.rename(file)


def save_tensor_groups(groups, out: Path, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write the tensors of `groups` (an iterable of {name: tensor}, consumed one at a time) as transformers does:
    one `model.safetensors` if they fit in one shard, else `model-0000k-of-0000n.safetensors` and
    `model.safetensors.index.json`."""
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush():
        save_file({name: t.detach().cpu().contiguous() for name, t in shard.items()},
                  str(out / f".shard-{len(shards)}"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for group in groups:
        for name, tensor in group.items():
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard[name] = tensor
            shard_bytes += size
            total_bytes += size
    flush()
    if len(shards) == 1:
        (out / ".shard-0").rename(out / WEIGHTS_NAME)
        return
    weight_map = {}
    for number, names in enumerate(shards):
        file = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f".shard-{number}").rename(out / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
