"""Models larger than memory: decoder blocks materialized one at a time from their safetensors.

A streamed model is the model's skeleton built on the meta device (buffers such as rotary frequencies are real)
with its tensors outside the decoder blocks (embeddings, final norm, head) loaded, and a `WeightFiles` attached
that says where every tensor lives. A block is materialized from those files only while it is worked on or run,
then released back to the meta device. A forward over many windows (evaluation, the export check) runs every
window through block k before block k+1 is loaded (`lqtk.forward.final_hidden_states`), and the export is written
block by block into shards (`save_sharded`), so peak memory grows with one block and the activations, not with the
model.
Fully loaded models go through the same functions: their blocks are only moved to the device and back.
"""

import ctypes
import ctypes.util
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lqtk.anatomy import block_prefix, blocks_prefix, decoder_blocks, tied_names
from lqtk.errors import LqtkError
from lqtk.nn import QuantizedLinear, quantized_linear_from_config
from lqtk.weights import SHARD_BYTES, WeightFiles, save_file_atomically, save_tensor_groups

log = logging.getLogger(__name__)

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


def load_outside_blocks(model: nn.Module) -> None:
    """Load what is on the meta device outside the blocks (embeddings, final norm, head), tied tensors tied."""
    blocks, tied = blocks_prefix(model), tied_names(model)
    names = [name for name, t in model.state_dict(keep_vars=True).items()
             if t.is_meta and name not in tied and not name.startswith(blocks)]
    if names:
        _load(model, weight_files(model), names, "")
        model.tie_weights()


def release_outside_blocks(model: nn.Module) -> None:
    """Put the tensors outside the blocks back on the meta device, while only blocks run (the walk)."""
    blocks = blocks_prefix(model)
    model.load_state_dict({name: t.to("meta") for name, t in model.state_dict().items()
                           if not name.startswith(blocks)}, assign=True, strict=False)
    return_freed_memory()


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
    blocks, seen = blocks_prefix(model), set()
    outside = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not name.startswith(blocks) and id(tensor) not in seen:
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
