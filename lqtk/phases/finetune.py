"""`BlockFinetune`: fine-tune a quantized model block by block towards its fp model (AQLM §3.3).

It walks the decoder blocks of the quantized model (an lqtk export) beside the fp model, one epoch per block: block
k's inputs are the quantized model's own stream (the outputs of the tuned blocks before it), its targets the fp
block's outputs on those same inputs; `tune_block` trains the floating tensors of its quantized layers (codebooks,
scales) and its norms with Adam, integer codes frozen, stopping early on held-out calibration windows. One
checkpoint per block holds the tuned blocks' tensors and the next inputs; `ckpt_path=last` resumes after the last
finished block with the same result.
"""

import dataclasses
import time

import torch

from lqtk.anatomy import decoder_blocks
from lqtk.errors import LqtkError
from lqtk.models import load_causal_lm
from lqtk.nn import quantized_layers
from lqtk.phases.block_tuning import BlockTuning, trainable_parameters
from lqtk.phases.walk import BlockWalk


def load_student_and_teacher(model: str, fp_model: str):
    """The quantized model (an lqtk export) and the fp model it was quantized from, refused if they are not that."""
    quantized, fp = load_causal_lm(model), load_causal_lm(fp_model)
    if not quantized_layers(quantized):
        raise LqtkError(f"{model} is not a quantized model (no quantized layer): point model at the export of a "
                        "calibration phase (its run folder's model/) and the fp model at the model it came from")
    if quantized_layers(fp):
        raise LqtkError(f"the fp model {fp_model} is a quantized model: point it at the fp model that {model} was "
                        "quantized from")
    same_depth = len(decoder_blocks(quantized)) == len(decoder_blocks(fp))
    if not same_depth or quantized.config.hidden_size != fp.config.hidden_size:
        raise LqtkError(f"{model} and the fp model {fp_model} have different architectures: point the fp model at "
                        "the model the export was quantized from")
    return quantized, fp


class BlockFinetune(BlockWalk):
    """Block-by-block fine-tuning of a quantized model's continuous parameters.

    Args:
        model: The quantized model: an lqtk export folder (the previous phase's `model/`).
        fp_model: The fp model it was quantized from (local HF folder or reference model name).
        tuning: Adam, steps and early stopping of each block.
    """

    progress_label = "fine-tune"

    def __init__(self, model: str, fp_model: str, tuning: BlockTuning | None = None):
        super().__init__()
        self.model_path, self.fp_model_path = model, fp_model
        self.tuning = tuning or BlockTuning()
        self.tuning_results: dict[str, dict] = {}

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise LqtkError("BlockFinetune runs on one process: run it with trainer.devices 1 and trainer.num_nodes 1 "
                            "(KLDistillation is the phase that trains on several)")
        model, fp_model = load_student_and_teacher(self.model_path, self.fp_model_path)
        model.requires_grad_(False)  # tune_block unfreezes what it trains
        fp_model.requires_grad_(False)
        blocks, fp_blocks = decoder_blocks(model), decoder_blocks(fp_model)
        if not any(trainable_parameters(block, tune_norms=False) for block in blocks):
            raise LqtkError(f"{self.model_path} has no trainable tensors in its quantized layers: nothing to tune")
        # kept out of the module tree, as in LayerwiseCalibration: blocks move to the device one at a time
        self.__dict__.update(model=model, blocks=blocks, fp_model=fp_model, fp_blocks=fp_blocks)

    def training_step(self, batch, batch_idx) -> None:
        """The work is per block (epoch end); the steps only walk the calibration batches for the progress bar."""

    def on_train_epoch_end(self) -> None:
        start = time.perf_counter()
        fp_block = self.fp_blocks[self.current_epoch].to(self.device)
        self.report("computing the fp block's outputs (targets)")
        targets = self.block_outputs(fp_block)
        fp_block.to("cpu")
        self.block.to(self.device)
        self.report("fine-tuning")
        self.tune_current_block(targets, self.tuning)
        self.report("computing the tuned block's outputs")
        self.inputs = self.block_outputs(self.block)
        self.block.to("cpu")
        self.quantize_time_s += time.perf_counter() - start

    # --- checkpoints --------------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"model": str(self.model_path), "fp_model": str(self.fp_model_path),
                "tuning": dataclasses.asdict(self.tuning), "data": dict(self.trainer.datamodule.hparams)}

    def walk_state(self) -> dict:
        tuned = {f"{i}.{key}": value for i, block in enumerate(self.blocks[: self.current_epoch + 1])
                 for key, value in block.state_dict().items() if value.is_floating_point()}
        return {"tuned": tuned, **self.phase_metrics()}

    def restore_walk_state(self, state: dict) -> None:
        for key, value in state["tuned"].items():
            index, name = key.split(".", 1)
            parameter = self.blocks[int(index)].get_parameter(name)
            parameter.data = value.clone()
        self.tuning_results = state["block_tuning"]

    def phase_metrics(self) -> dict:
        return {"block_tuning": self.tuning_results}

    def fp_reference(self) -> tuple[torch.nn.Module, str]:
        return self.fp_model, self.fp_model_path
