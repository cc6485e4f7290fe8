"""A model's forward pass block by block: the decoder's own code computes what each block receives (embeddings,
position embeddings, masks, per block) with every block standing aside, so the blocks can then run one at a time
over many batches (calibration walks, streamed evaluation) and compute the same bits as the whole model's forward."""

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from lqtk.anatomy import block_output, decoder_blocks
from lqtk.streaming import block_on
from lqtk.token_pruning import PruningRun


class StopForward(Exception):
    """Raised by a stand-in once what a pass needs has been seen: the rest of the forward is not needed."""


@contextmanager
def stand_ins(blocks: nn.ModuleList, forward):
    """Every block's forward replaced by `forward(index, hidden_states, kwargs)`: the decoder's own code then
    computes what the blocks receive and what follows them (the final norm) without running a block. The instance
    attribute shadows the class's forward."""
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


def block_inputs(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Block 0's hidden states for the token windows `batch` (B, T), and the keyword arguments each block receives:
    position embeddings and masks differ between blocks where sliding-window and full attention alternate
    (Gemma-3), so block k is run with its own. Blocks share the objects they were passed, not copies. Only the
    decoder's embedding runs (a streamed model's blocks are not loaded)."""
    blocks, hidden, kwargs = decoder_blocks(model), [], []

    def record(index, x, block_kwargs):
        if index == 0:
            hidden.append(x)
        kwargs.append(block_kwargs)
        if index == len(blocks) - 1:
            raise StopForward  # the final norm is not needed
        return x

    with stand_ins(blocks, record):
        try:
            model.get_decoder()(batch, use_cache=False)
        except StopForward:
            pass
    return hidden[0], kwargs


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
    hidden, block_kwargs = map(list, zip(*(block_inputs(model, batch) for batch in batches)))
    for index in range(len(blocks)):
        with block_on(model, index, device) as block:
            if pruning is None:
                hidden = [block_output(block(x, **kwargs[index])) for x, kwargs in zip(hidden, block_kwargs)]
            else:
                hidden = pruning.run_block(block, index, len(blocks), hidden, [kw[index] for kw in block_kwargs])
    outputs = []
    for batch, x in zip(batches, hidden):
        with stand_ins(blocks, lambda index, h, _, x=x: x if index == len(blocks) - 1 else h):
            outputs.append(decoder(batch, use_cache=False).last_hidden_state)
    return outputs
