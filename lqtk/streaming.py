"""Models larger than memory: decoder blocks materialized one at a time from their safetensors.

A streamed model is the model's skeleton built on the meta device (buffers such as rotary frequencies are real)
with its tensors outside the decoder blocks (embeddings, final norm, head) loaded, and a `WeightFiles` attached
that says where every tensor lives. A block is materialized from those files only while it is worked on or run,
then released back to the meta device. A forward over many windows (evaluation, the export check) runs every
window through block k before block k+1 is loaded (`final_hidden_states`), and the export is written block by
block into shards (`save_sharded`), so peak memory grows with one block and the activations, not with the model.
Fully loaded models go through the same functions: their blocks are only moved to the device and back.
"""

import ctypes
import ctypes.util
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import psutil
import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lqtk.errors import LqtkError
from lqtk.models import block_output, decoder_blocks
from lqtk.nn import QuantizedLinear, quantized_linear_from_config
from lqtk.quant.base import check_finite
from lqtk.token_pruning import PruningRun

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_BYTES = 128 * 2**20  # shard size limit of the export: at most this much of the export is held for writing
# glibc serves allocations below its mmap threshold from the heap and keeps freed heap memory for reuse; it raises
# that threshold up to 32 MiB as large tensors are freed, so a block's weights and activations end up in a heap that
# only grows. A fixed threshold gives larger tensors their own mappings, unmapped when freed; malloc_trim hands back
# what the heap has free. Not lower: every new mapping is page-faulted in afresh, and at 1 MiB the temporaries of
# each calibration batch were, which made the reference model's calibration 1.45x slower (16 MiB: 10% more peak RSS).
MMAP_THRESHOLD = 16 * 2**20
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
_MALLOC_TRIM_AVAILABLE = hasattr(_LIBC, "malloc_trim")
_MALLOPT_AVAILABLE = hasattr(_LIBC, "mallopt")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


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
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
            missing = sorted({str(file) for file in self.files.values() if not file.is_file()})
            if missing:
                raise LqtkError(f"{index} lists shards that do not exist ({missing[:3]}): the folder is "
                                "incomplete; re-create it")
        elif (self.folder / WEIGHTS_NAME).is_file():
            self.add(self.folder / WEIGHTS_NAME)
        else:
            raise LqtkError(f"{self.folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}: the model folder is "
                            "incomplete; re-create it or point to another one")

    def add(self, file: Path) -> None:
        with safe_open(file, "pt") as f:
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
                with safe_open(self.files[stored], "pt") as f:
                    parts.append(f.get_tensor(stored) if row is None else f.get_slice(stored)[row:row + 1][0])
            tensors[name] = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        return tensors

    def meta(self, name: str) -> torch.Tensor:
        """An empty tensor of `name`'s shape and dtype, from the file header."""
        with safe_open(self.files[name], "pt") as f:
            info = f.get_slice(name)
            return torch.empty(info.get_shape(), dtype=_DTYPES[info.get_dtype()], device="meta")

    def check_finite(self) -> None:
        """Refuse NaN/Inf weights before any work, reading one tensor at a time."""
        for name, file in self.files.items():
            if name in self.views:  # made of stored tensors, which are checked themselves
                continue
            with safe_open(file, "pt") as f:  # checked in the mapping: no copy
                tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    check_finite(tensor, f"{self.folder}: tensor {name}")


def meta_quantized_linear(files: WeightFiles, name: str, config: dict, source: Path | None = None) -> QuantizedLinear:
    """The QuantizedLinear `name` (its `layer_config()`), its tensors on the meta device until its block loads; with
    `source`, only the tensors of that file (a block file: the fp model's `name.weight` is not one of them)."""
    tensors = {key[len(name) + 1 :]: files.meta(key) for key, file in files.files.items()
               if key.startswith(name + ".") and source in (None, file)}
    bias = tensors.pop("bias", None)
    return quantized_linear_from_config(config, tensors, bias)


def weight_files(model: nn.Module) -> WeightFiles | None:
    return getattr(model, "lqtk_weight_files", None)


def empty_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model's skeleton: parameters on the meta device (no memory), buffers computed on the CPU."""
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def open_streamed(model: PreTrainedModel, files: WeightFiles, lazy: bool, strict: bool) -> PreTrainedModel:
    """Attach `files` to the skeleton `model` and load its tensors outside the blocks (all of them unless `lazy`).
    `strict`: every tensor of the files must belong to the model (an export; fp folders may hold extra ones)."""
    model.lqtk_weight_files = files
    map_large_allocations()
    expected = set(model.state_dict())
    tied = {target: source for target, source in tied_names(model).items() if target in expected and source in expected}
    for target, source in tied.items():  # a tied pair is stored once, under either name
        if source not in files.files and target in files.files:
            files.files[source] = files.files[target]
    missing = sorted(name for name in expected - files.files.keys() if name not in tied)
    unexpected = sorted(files.files.keys() - expected) if strict else []
    if missing or unexpected:
        raise LqtkError(f"the weights in {files.folder} do not match its config (missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}): the folder is corrupt; re-create it")
    load_outside_blocks(model)
    return model.eval() if lazy else materialize_all(model).eval()


def tied_names(model: nn.Module) -> dict[str, str]:
    """{tied name: the name it is tied to} (lm_head.weight: model.embed_tokens.weight)."""
    return getattr(model, "all_tied_weights_keys", None) or {}


def load_outside_blocks(model: nn.Module) -> None:
    """Load what is on the meta device outside the blocks (embeddings, final norm, head), tied tensors tied."""
    blocks_prefix, tied = _blocks_prefix(model), tied_names(model)
    names = [name for name, t in model.state_dict(keep_vars=True).items()
             if t.is_meta and name not in tied and not name.startswith(blocks_prefix)]
    if names:
        _load(model, weight_files(model), names, "")
        model.tie_weights()


def release_outside_blocks(model: nn.Module) -> None:
    """Put the tensors outside the blocks back on the meta device, while only blocks run (the walk)."""
    blocks_prefix = _blocks_prefix(model)
    model.load_state_dict({name: t.to("meta") for name, t in model.state_dict().items()
                           if not name.startswith(blocks_prefix)}, assign=True, strict=False)
    return_freed_memory()


def _blocks_prefix(model: nn.Module) -> str:
    blocks = decoder_blocks(model)  # the walk stops there: it comes before the blocks' own modules
    return next(name for name, module in model.named_modules() if module is blocks) + "."


def block_prefix(model: nn.Module, index: int) -> str:
    """Module path of block `index` with a trailing dot (`model.layers.3.`)."""
    return f"{_blocks_prefix(model)}{index}."


def _load(module: nn.Module, files: WeightFiles, names: list[str], prefix: str) -> None:
    """Assign `names` (relative to `module`) from the files, in the dtype the module's tensors have (the fp dtype
    asked for; a quantized layer's own storage dtypes)."""
    current = module.state_dict(keep_vars=True)
    loaded = files.read([prefix + name for name in names])
    module.load_state_dict({name: loaded[prefix + name].to(current[name].dtype) for name in names}, assign=True,
                           strict=False)


def materialize(model: nn.Module, index: int) -> bool:
    """Load the tensors of block `index` that are on the meta device; whether there were any."""
    block = decoder_blocks(model)[index]
    names = [name for name, tensor in block.state_dict(keep_vars=True).items() if tensor.is_meta]
    if names:
        _load(block, weight_files(model), names, block_prefix(model, index))
    return bool(names)


def materialize_all(model: nn.Module) -> nn.Module:
    """Load every block: the model is then an ordinary, fully loaded one."""
    for index in range(len(decoder_blocks(model))):
        materialize(model, index)
    return model


def release(block: nn.Module) -> None:
    """Put the block's tensors back on the meta device (its files still hold them)."""
    block.load_state_dict({name: t.to("meta") for name, t in block.state_dict().items()}, assign=True)
    for module in block.modules():
        if hasattr(module, "drop_decoded"):
            module.drop_decoded()
    return_freed_memory()


def return_freed_memory() -> None:
    if _MALLOC_TRIM_AVAILABLE:
        _LIBC.malloc_trim(0)


def map_large_allocations() -> None:
    """Fix glibc's mmap threshold (see _LIBC): large freed tensors leave the process."""
    if _MALLOPT_AVAILABLE:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def to_device(module: nn.Module, device) -> nn.Module:
    """`module.to(device)` for what is materialized; meta tensors stay where they are."""
    return module._apply(lambda t: t if t.is_meta else t.to(device))


@contextmanager
def block_on(model: nn.Module, index: int, device=None):
    """Block `index`, materialized (and on `device` if given) inside the context; released afterwards if it was
    streamed, else moved back to the CPU (which also drops the decoded weights of its quantized layers)."""
    block = decoder_blocks(model)[index]
    streamed = materialize(model, index)
    if device is not None:
        block.to(device)
    try:
        yield block
    finally:
        if streamed:
            release(block)
        elif device is not None:
            block.to("cpu")
            return_freed_memory()


def save_file_atomically(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file` into a temporary name renamed to `file` once written: a run killed while writing
    leaves no file that looks complete."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
    tmp.rename(file)


def save_block(model: nn.Module, index: int, file: Path) -> None:
    """Write block `index`'s tensors (full names) to `file` (atomically), add it to the model's files and release
    the block: a finished block then costs no memory until it runs again."""
    block = decoder_blocks(model)[index]
    prefix = block_prefix(model, index)
    save_file_atomically({prefix + name: t for name, t in block.state_dict().items()}, file, {"format": "pt"})
    weight_files(model).add(file)
    release(block)


def tensor_groups(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """The model's tensors by full name: first those outside the blocks (one name per tied tensor: the first, as
    save_pretrained keeps it), then one block at a time, materialized only while its group is being consumed."""
    blocks_prefix, seen = _blocks_prefix(model), set()
    outside = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not name.startswith(blocks_prefix) and id(tensor) not in seen:
            seen.add(id(tensor))
            outside[name] = tensor.detach()
    yield outside
    for index in range(len(decoder_blocks(model))):
        with block_on(model, index) as block:
            prefix = block_prefix(model, index)
            yield {prefix + name: tensor for name, tensor in block.state_dict().items()}


def save_sharded(model: nn.Module, out: Path, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write the model's tensors as transformers does (`save_tensor_groups`). At most one shard and one block exist
    at once beyond what the model already holds."""
    save_tensor_groups(tensor_groups(model), out, max_shard_bytes)


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


# --- forward passes, block by block -----------------------------------------------------------------------------
@contextmanager
def _stand_ins(blocks: nn.ModuleList, forward):
    """Every block's forward replaced by `forward(index, hidden_states, kwargs)`: the decoder's own code then
    computes what the blocks receive (embeddings, position embeddings, masks, per block) and what follows them (the
    final norm) without running a block. The instance attribute shadows the class's forward."""
    def stand_in(index, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return forward(index, hidden, kwargs)

    for index, block in enumerate(blocks):
        block.forward = partial(stand_in, index)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@torch.no_grad()
def final_hidden_states(model: nn.Module, windows: torch.Tensor, batch_size: int,
                        pruning: PruningRun | None = None) -> list[torch.Tensor]:
    """The final hidden states (after the final norm) of `model` on `windows` (n, T), one (B, T, D) tensor per
    batch of `batch_size` windows, computed block by block: all batches pass block k before block k+1 is
    materialized. The same per-batch operations as the whole model's forward, so the same bits. With `pruning`
    (lqtk.token_pruning), the blocks from its start_layer on run on each batch's kept tokens (B, K, D), whose
    positions it then holds."""
    device = model.get_input_embeddings().weight.device
    blocks, decoder = decoder_blocks(model), model.get_decoder()
    batches = [batch.to(device) for batch in windows.split(batch_size)]
    hidden, block_kwargs = [], []
    for batch in batches:
        kwargs = []

        def record(index, x, block_args):
            if index == 0:
                hidden.append(x)
            kwargs.append(block_args)
            return x

        with _stand_ins(blocks, record):
            decoder(batch, use_cache=False)
        block_kwargs.append(kwargs)
    for index in range(len(blocks)):
        with block_on(model, index, device) as block:
            if pruning is None:
                hidden = [block_output(block(x, **kwargs[index])) for x, kwargs in zip(hidden, block_kwargs)]
            else:
                hidden = pruning.run_block(block, index, len(blocks), hidden, [kw[index] for kw in block_kwargs])
    outputs = []
    for batch, x in zip(batches, hidden):
        with _stand_ins(blocks, lambda index, h, _, x=x: x if index == len(blocks) - 1 else h):
            outputs.append(decoder(batch, use_cache=False).last_hidden_state)
    return outputs


# --- memory -----------------------------------------------------------------------------------------------------
def activation_buffer(shape: tuple[int, ...], file: Path | None) -> torch.Tensor:
    """An empty fp32 tensor for (N, T, D) block inputs or outputs: in memory, or memory-mapped on a new `file` (its
    pages go to disk when memory is short). The file is replaced, not overwritten: a tensor still mapping the old
    one keeps its data."""
    if file is None:
        return torch.empty(shape)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.unlink(missing_ok=True)
    return torch.from_file(str(file), shared=True, size=math.prod(shape), dtype=torch.float32).view(shape)


def available_memory() -> int:
    """Bytes the process can still allocate without swapping (MemAvailable)."""
    return psutil.virtual_memory().available


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
