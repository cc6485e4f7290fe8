"""`LayerwiseCalibration`: quantize a causal LM block by block on cached block inputs (the GPTQ pipeline).

One epoch per decoder block. Before the first block, the calibration windows are run through the model up to
block 0 and its inputs are cached. Within block k, the block's Linears are taken in sequential passes of groups
(Linears that read the same input: q/k/v, then o, then gate/up, then down; the groups of all MoE experts share a
pass, see calibration_passes.py): for each pass the calibration inputs run through the block while hooks
accumulate each group's input Hessian, then the pass's groups are quantized and swapped for QuantizedLinears, so
later passes calibrate on the outputs of the quantized ones. A group whose Linears saw too few calibration tokens
(an expert the router rarely picks) is quantized as GPTQModel does, round-to-nearest on the method's grid. A last
pass through the fully quantized block gives block k+1's inputs. Sub-modules whose Linears are all quantized are
not recomputed by later passes (`lqtk.phases.replay`). The training steps are the calibration batches of the
first pass; the progress bar names the pass under way and extrapolates the time left for the whole walk.

With `block_tuning`, each quantized block is then fine-tuned to reproduce the fp block's outputs on the same inputs
(AQLM's recipe) before its outputs feed the next block.

The model is streamed (lqtk.streaming): its skeleton is built on the meta device, block k's fp weights are read from
the model's safetensors at the start of its epoch, and once quantized the block is written to
`<run folder>/blocks/<block>.safetensors` and released, so memory holds one block and the activations, not the
model. The evaluation and the export read the finished blocks back one at a time.

Checkpoints (one per block) hold only what the walk produced: the finished blocks' layer configs (their tensors are
in the block files), the next block's inputs and the run's identity; `ckpt_path=last` resumes after the last
finished block.

Several processes (`trainer.devices`, `trainer.num_nodes`: lqtk.phases.processes) share the walk: each runs the
block on its contiguous share of the calibration batches and accumulates its part of every Hessian; the owner of a
group (the pass's groups dealt out in turn) merges the parts (`HessianAccumulator.merge`, the same H bit for bit as
one process's), quantizes the group, and sends the result to every process, so all of them go on with the same
quantized block. Process 0 writes the block files, the checkpoints and the export.
"""

import dataclasses
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import torch

from lqtk.anatomy import check_linear_layers, decoder_blocks, linear_layers
from lqtk.errors import LqtkError
from lqtk.formats import QuantizedWeight
from lqtk.forward import StopForward
from lqtk.models import load_causal_lm
from lqtk.moe import ROUTER_LINEARS
from lqtk.nn import QuantizedLinear, quantized_layers, set_submodule
from lqtk.phases.block_tuning import BlockTuning
from lqtk.phases.calibration_passes import calibration_passes
from lqtk.phases.hessian_cache import save_group
from lqtk.phases.processes import BlockWalkStrategy, broadcast_from, gather_to, world
from lqtk.phases.replay import SubmoduleReplay, record_tails
from lqtk.phases.walk import BlockWalk, beside_checkpoints, block_file
from lqtk.quant.allocation import output_error
from lqtk.quant.base import HessianAccumulator, WeightQuantizer
from lqtk.streaming import (
    available_memory,
    load_outside_blocks,
    materialize,
    meta_quantized_linear,
    module_bytes,
    release,
    release_outside_blocks,
    save_block,
    weight_files,
)
from lqtk.token_pruning import TokenPruning

log = logging.getLogger(__name__)
GIB = 2**30


class LayerwiseCalibration(BlockWalk):
    """Block-by-block post-training quantization of every Linear inside the decoder blocks.

    Args:
        model: Local HF causal-LM folder, or a reference model name (`smollm2-135m`, `tiny-llama`, `tiny-gemma3`).
        quantizer: The method and its settings (`class_path: lqtk.quant.GPTQ`, `init_args: {bits: 4, ...}`).
        sequential: Calibrate each group of Linears on the outputs of the already quantized groups of the same
            block (true-sequential); if false, all Linears of a block calibrate on the fp block's activations.
        skip: Names (suffixes) of Linears inside the blocks to keep in full precision; default: the MoE routers
            that are Linears (`mlp.gate`, `block_sparse_moe.gate`, `shared_expert_gate`); `[]` quantizes them too.
        block_tuning: If set, fine-tune each quantized block towards the fp block's outputs before moving on.
        fallback_below: A group of Linears whose calibration inputs number fewer than this fraction of the
            calibration tokens (an MoE expert the router rarely or never picked) is quantized with the identity as
            its Hessian: round-to-nearest on the method's grid (GPTQModel's fallback, same default of 0.5%).
        replay: Compute each op of a block once across its calibration passes (`lqtk.phases.replay`): the same
            result with about 2.4x fewer forward FLOPs, for up to N·T·(2·hidden + intermediate) more activations
            held on the CPU while a block is calibrated; false recomputes them.
        compute_dtype: Dtype of the block forwards' matmuls (autocast); Hessians, cached activations and the
            quantization stay fp32. `bfloat16` is about 2x faster on GPUs and CPUs with bf16 units (AVX-512 BF16,
            AMX), and about 8x slower on CPUs without them (AVX2).
        activations_on_disk: Keep the (N, T, D) block inputs and outputs in memory-mapped files in the run folder
            (`activations/`) rather than in memory; also chosen when they do not fit in the memory left.
        layer_quantizers: Regular expressions (searched in the Linears' full names) → the quantizer of the Linears they
            match, in place of `quantizer` (the first match wins; GPTQModel's `dynamic`), e.g. `{"mlp.down_proj":
            <a 4-bit GPTQ>}`. Linears that read the same input and take different quantizers share its Hessian.
        save_hessians: Keep each group's Hessian (and input sample) in the run folder's `hessians/`
            (lqtk.phases.hessian_cache), for re-quantizing its layers later without running the model
            (`lqtk.phases.Requantize`: other bits, groups or methods, or a mixed-precision allocation).
        token_pruning: Prune tokens during prefill (lqtk.token_pruning), a property of the quantized model at run
            time: the export records it, and its evaluation (by the export and `lqtk evaluate`) scores each window at
            the kept positions only. Calibration itself sees every token.
    """

    def __init__(self, model: str, quantizer: WeightQuantizer, sequential: bool = True, skip: list[str] | None = None,
                 block_tuning: BlockTuning | None = None, fallback_below: float = 0.005, replay: bool = True,
                 compute_dtype: Literal["float32", "bfloat16"] = "float32", activations_on_disk: bool = False,
                 save_hessians: bool = False, layer_quantizers: dict[str, WeightQuantizer] | None = None,
                 token_pruning: TokenPruning | None = None):
        super().__init__()
        self.model_path, self.quantizer, self.sequential = model, quantizer, sequential
        self.skip = tuple(ROUTER_LINEARS if skip is None else skip)
        self.block_tuning, self.fallback_below, self.replay = block_tuning, fallback_below, replay
        self.compute_dtype = getattr(torch, compute_dtype)
        self.activations_on_disk, self.save_hessians = activations_on_disk, save_hessians
        self.layer_quantizers, self.token_pruning = dict(layer_quantizers or {}), token_pruning
        if save_hessians and not self.needs_hessian:
            raise LqtkError(f"save_hessians is set but {type(quantizer).__name__} takes no Hessian, so none is "
                            "collected: set save_hessians false, or calibrate with a method that takes one (GPTQ)")
        self.finished_blocks: list[int] = []  # blocks written to their block files
        self.fallbacks: list[str] = []  # the Linears quantized with the identity Hessian
        self.layer_errors: dict[str, float] = {}  # relative output error of each quantized Linear
        self.layer_history: dict[str, dict] = {}  # what iterative methods report per layer (objective per round)
        self.tuning_results: dict[str, dict] = {}  # per block: held-out error before and after fine-tuning

    # --- set-up -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            if not isinstance(self.trainer.strategy, BlockWalkStrategy):
                raise LqtkError(f"LayerwiseCalibration on {self.trainer.world_size} processes needs trainer.strategy "
                                f"block_walk, not {type(self.trainer.strategy).__name__}: pass --trainer.strategy "
                                "block_walk (or leave it auto)")
            if self.block_tuning is not None:
                raise LqtkError("block_tuning fine-tunes each block on one process: run this recipe with "
                                "trainer.devices 1 and trainer.num_nodes 1")
        # Kept out of the module tree: Lightning must neither move the whole model to the device (blocks go one at
        # a time) nor checkpoint the fp weights. Streamed: only the tensors outside the blocks are loaded here.
        model = load_causal_lm(self.model_path, lazy=True).requires_grad_(False)  # block_tuning unfreezes its own
        if quantized_layers(model):
            raise LqtkError(f"{self.model_path} is already quantized (an lqtk export): calibrate the fp model it was "
                            "made from; to change its layers' types, re-quantize its run's cached Hessians with "
                            "lqtk.phases.Requantize")
        check_linear_layers(model)
        self.__dict__.update(model=model, blocks=decoder_blocks(model))
        for i, block in enumerate(self.blocks):
            for name, linear in self._linears(block).items():
                try:
                    self.quantizer_for(self.block_prefix(i) + name).check_fits(tuple(linear.weight.shape))
                except LqtkError as err:
                    raise LqtkError(f"{self.block_prefix(i)}{name}: {err}") from err
        self._check_memory()
        # per block, found when the walk reaches it (`_plan_block`)
        self.passes: list[list | None] = [None] * len(self.blocks)
        self.tails: list[dict | None] = [None] * len(self.blocks)

    @property
    def needs_hessian(self) -> bool:
        return any(q.needs_hessian for q in [self.quantizer, *self.layer_quantizers.values()])

    @property
    def input_sample_rows(self) -> int:
        return max(q.input_sample_rows for q in [self.quantizer, *self.layer_quantizers.values()])

    def quantizer_for(self, name: str) -> WeightQuantizer:
        """The quantizer of the Linear `name` (full name): the first `layer_quantizers` match, else `quantizer`."""
        return next((q for pattern, q in self.layer_quantizers.items() if re.search(pattern, name)), self.quantizer)

    def _linears(self, block) -> dict:
        return {name: m for name, m in linear_layers(block).items() if not name.endswith(self.skip)}

    def _check_memory(self) -> None:
        """Refuse, before any work, a model one of whose blocks does not fit in the memory left with a batch's
        activations; put the block inputs and outputs on disk if they do not fit beside it, and drop the replay's
        extra activations if they do not fit either."""
        data, config = self.trainer.datamodule, self.model.config
        values = data.num_calibration_windows * data.seq_len  # calibration positions
        activations = 2 * values * config.hidden_size * 4  # a block's inputs and outputs, fp32
        batch = activations * data.batch_size // data.num_calibration_windows
        block = max(module_bytes(block) for block in self.blocks)  # fp32; meta tensors have sizes only
        needed, left = 2 * block + batch, available_memory()  # the fp block and its decoded quantized layers
        if needed > left:
            raise LqtkError(f"one block of {self.model_path} ({block / GIB:.2f} GiB in fp32, twice that while it is "
                            f"quantized) and a batch's activations ({batch / GIB:.2f} GiB) need {needed / GIB:.2f} "
                            f"GiB, but only {left / GIB:.2f} GiB of memory is left: free memory, or use a smaller "
                            "data.batch_size or data.seq_len")
        if not self.activations_on_disk and needed + activations > left:
            log.warning("block inputs and outputs on disk: their %.2f GiB do not fit in the %.2f GiB of memory left",
                        activations / GIB, left / GIB)
            self.activations_on_disk = True
        if self.activations_on_disk:
            self.activations_dir = Path(self.trainer.default_root_dir) / "activations"
        else:
            needed += activations
        intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
        replayed = values * (2 * config.hidden_size + intermediate) * 4
        if self.replay and needed + replayed > left:
            log.warning("replay off: its %.2f GiB of activations do not fit in the %.2f GiB of memory left",
                        replayed / GIB, left / GIB)
            self.replay = False

    @property
    def hessians_dir(self) -> Path:
        """`hessians/` beside the checkpoints (lqtk.phases.hessian_cache)."""
        return beside_checkpoints(self, "hessians")

    def block_file(self, index: int) -> Path:
        """Where finished block `index` is kept: `blocks/` beside the checkpoints."""
        return block_file(self, "blocks", index)

    # --- the walk -----------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()  # the block inputs are captured: until the export only blocks run
        release_outside_blocks(self.model)
        self.first_batch = self.process_batches().start  # index of this process's batch 0 among all batches

    def exported_model(self) -> torch.nn.Module:
        load_outside_blocks(self.model)
        self.model.lqtk_token_pruning = self.token_pruning
        return self.model

    def on_train_epoch_start(self) -> None:
        self.epoch_start = time.perf_counter()
        materialize(self.model, self.current_epoch)
        self.block.to(self.device)
        self.hessians: dict[str, HessianAccumulator] = {}  # of the groups being calibrated, by first Linear
        self.groups_dealt = 0  # groups of this block given an owner so far
        if self.block_tuning is not None:
            self.report("computing the fp block's outputs (fine-tuning targets)")
            self.targets = self.block_outputs(self.block)
        self.passes[self.current_epoch], self.tails[self.current_epoch] = self._plan_block()
        tails = self.tails[self.current_epoch] if self.replay else {}
        self.replayed = SubmoduleReplay(self.block, tails, lambda: self.batch_index, self.device)
        self.pending = {}  # the Linears of each child of the block still to quantize
        for groups in self.passes[self.current_epoch]:
            for name in (name for group in groups for name in group):
                self.pending.setdefault(name.split(".")[0], set()).add(name)

    @torch.no_grad()
    def _plan_block(self) -> tuple[list[list[list[str]]], dict]:
        """The current block's passes (`calibration_passes`) and the replay's plan (`record_tails`), from one run of
        the first window of its first calibration batch (process 0's passes: the order of an MoE block's experts
        depends on the tokens). One window shows the block's structure as well as a batch, several times faster."""
        tails: dict = {}
        hooks = record_tails(self.block, tails)
        _, hidden, kwargs = self.batch(0)
        hidden, kwargs = first_window(hidden, kwargs)
        try:
            with self.autocast():
                passes = calibration_passes(self._linears(self.block), lambda: self.block(hidden, **kwargs),
                                            self.sequential)
        finally:
            for hook in hooks:
                hook.remove()
        return broadcast_from(0, passes), tails

    @torch.no_grad()
    def training_step(self, batch, batch_idx) -> None:
        """The steps are the calibration batches; `batch_idx` picks their cached block inputs. The steps
        calibrate the block's first pass; the later passes and the outputs follow at epoch end."""
        self._calibrate(batch_idx, self.passes[self.current_epoch][0])

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        passes = self.passes[self.current_epoch]
        self._quantize_pass(passes[0])
        for groups in passes[1:]:
            for index in range(len(self.block_kwargs)):
                self._calibrate(index, groups)
            self._quantize_pass(groups)
        if self.block_tuning is not None:
            self.replayed.close()  # tuning changes the quantized layers
            self.report("fine-tuning the quantized block")
            self.tune_current_block(self.targets, self.block_tuning)
            del self.targets
        self.report("computing the quantized block's outputs")
        self.replayed.record = False
        self.inputs = self.block_outputs(self.block)
        self.replayed.close()
        self.block.to("cpu")
        if self.global_rank == 0:
            save_block(self.model, self.current_epoch, self.block_file(self.current_epoch))
        else:  # process 0 keeps the finished blocks
            release(self.block)
        self.finished_blocks.append(self.current_epoch)
        self.quantize_time_s += time.perf_counter() - self.epoch_start

    def _calibrate(self, batch_index: int, groups: list[list[str]]) -> None:
        """Run one batch through the block, adding it to the Hessian of every group of the pass (a group's Linears
        share their input: a hook on its first Linear does it). A single group stops the forward there; with several
        (MoE experts), any of them may still come, so the block runs to its end."""
        if not self.needs_hessian:
            return
        self.report(f"calibrating {', '.join(groups[0])}" + (f" and {len(groups) - 1} more" if groups[1:] else ""))
        _, hidden, kwargs = self.batch(batch_index)

        def hook(index, group):
            def accumulate(module, args):
                if group[0] not in self.hessians:
                    self.hessians[group[0]] = HessianAccumulator(module.in_features, self.device,
                                                                 self.sample_rows_per_batch())
                self.hessians[group[0]].add(args[0], self.first_batch + self.batch_index)
                if index == 0:  # the inputs of a pass's later groups went through its layers still unquantized
                    for name in filter(self.replayed.needs_input, group):
                        self.replayed.save_input(name, args[0])
                if len(groups) == 1:
                    raise StopForward
            return accumulate

        handles = [self.block.get_submodule(group[0]).register_forward_pre_hook(hook(index, group))
                   for index, group in enumerate(groups)]
        try:
            with self.autocast():
                self.block(hidden, **kwargs)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    def _quantize_pass(self, groups: list[list[str]]) -> None:
        """Quantize the pass's groups, each on its owner process (dealt out in turn), and put every result into every
        process's block."""
        rank, processes = world()
        owners = [(self.groups_dealt + i) % processes for i in range(len(groups))]
        self.groups_dealt += len(groups)
        hessians = {names[0]: self._group_hessian(names, owner) for names, owner in zip(groups, owners)}
        if self.save_hessians:
            prefix = self.block_prefix(self.current_epoch)
            for names, owner in zip(groups, owners):
                if owner == rank:
                    hessian, inputs, _ = hessians[names[0]]
                    save_group(self.hessians_dir, [prefix + name for name in names], hessian, inputs)
        results = {names[0]: self._quantize_group(names, *hessians[names[0]])
                   for names, owner in zip(groups, owners) if owner == rank}
        for names, owner in zip(groups, owners):
            if owner != rank:
                self.report(f"receiving {', '.join(names)} from process {owner}")
            weights, errors, fallback = broadcast_from(owner, results.get(names[0]))
            self.layer_errors.update(errors)
            self.fallbacks += fallback
            for name, weight in zip(names, weights):
                set_submodule(self.block, name, QuantizedLinear(weight, self.block.get_submodule(name).bias)
                              .to(self.device))
                if weight.history:
                    self.layer_history[self.block_prefix(self.current_epoch) + name] = weight.history
                child = self.pending[name.split(".")[0]]
                child.discard(name)
                if not child:
                    self.replayed.finish(name.split(".")[0])

    def sample_rows_per_batch(self) -> int:
        """Input rows each calibration batch contributes to a group's sample (the quantizer's `input_sample_rows`
        spread over all batches)."""
        data = self.trainer.datamodule
        return -(-self.input_sample_rows * data.batch_size // data.num_calibration_windows)

    def _group_hessian(self, names: list[str], owner: int) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """On the owner of the group: the Hessian its Linears are quantized with, every process's part merged (None
        for a method without one), the sample of their inputs (None unless the method asks for one), and whether
        the Hessian is the fallback; elsewhere (None, None, False). The fallback is the identity, taken when they saw
        fewer than `fallback_below` of the calibration tokens, or none: a Hessian of a few tokens is nearly singular,
        and without tokens GPTQ would take every column as dead and zero it."""
        accumulator = self.hessians.pop(names[0], None)
        if not self.needs_hessian:
            return None, None, False
        parts = gather_to(owner, ({}, 0, {}) if accumulator is None else accumulator.partial())
        if parts is None:
            return None, None, False
        hessian = HessianAccumulator(self.block.get_submodule(names[0]).in_features, self.device)
        for part in parts:
            hessian.merge(*part)
        positions = self.trainer.datamodule.num_calibration_windows * self.inputs.shape[1]
        if hessian.count < self.fallback_below * positions:
            return torch.eye(hessian.features, device=self.device), hessian.sample(), True
        return hessian.hessian(), hessian.sample(), False

    def _quantize_group(self, names: list[str], hessian: torch.Tensor | None, inputs: torch.Tensor | None,
                        fallback: bool):
        """(quantized weights, {layer: relative output error}, Linears quantized with the identity Hessian)."""
        prefix = self.block_prefix(self.current_epoch)
        linears = [self.block.get_submodule(name) for name in names]
        label = ", ".join(names)
        self.report(f"quantizing {label}")
        quantizers = [self.quantizer_for(prefix + name) for name in names]
        weights = [None] * len(names)
        for quantizer in {id(q): q for q in quantizers}.values():  # each quantizer's Linears together
            members = [i for i, q in enumerate(quantizers) if q is quantizer]
            try:
                results = quantizer.quantize_shared(
                    [linears[i].weight.detach() for i in members], hessian,
                    progress=lambda status: self.report(f"quantizing {label}: {status}"), inputs=inputs)
            except LqtkError as err:
                raise LqtkError(f"{prefix}{label}: {err}") from err
            for i, weight in zip(members, results):
                weights[i] = weight
        errors = {prefix + name: relative_output_error(linear.weight, weight, hessian)
                  for name, linear, weight in zip(names, linears, weights)}
        return weights, errors, [prefix + name for name in names] if fallback else []

    def on_fit_end(self) -> None:
        """The walk is over (and ExportQuantized, which runs first, has exported): the memory-mapped activations are
        not needed. The block files stay: they hold the finished model's blocks (`self.model` reads them)."""
        if self.activations_dir is not None:
            shutil.rmtree(self.activations_dir, ignore_errors=True)

    # --- checkpoints --------------------------------------------------------------------------------------
    def identity(self) -> dict:
        def described(quantizer):
            return {"class": type(quantizer).__qualname__, **dataclasses.asdict(quantizer)}

        quantizer = described(self.quantizer)
        tuning = None if self.block_tuning is None else dataclasses.asdict(self.block_tuning)
        return {"model": str(self.model_path), "quantizer": quantizer, "sequential": self.sequential,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "skip": list(self.skip), "block_tuning": tuning, "fallback_below": self.fallback_below,
                "save_hessians": self.save_hessians,
                "layer_quantizers": {pattern: described(q) for pattern, q in self.layer_quantizers.items()},
                "data": dict(self.trainer.datamodule.hparams)}

    def walk_state(self) -> dict:
        layers = {name: m.layer_config() for name, m in quantized_layers(self.model).items()}
        return {"layers": layers, "finished_blocks": self.finished_blocks, **self.phase_metrics()}

    def phase_metrics(self) -> dict:
        return {"layer_errors": self.layer_errors, "layer_history": self.layer_history,
                "block_tuning": self.tuning_results, "fallback_layers": self.fallbacks}

    def restore_walk_state(self, state: dict) -> None:
        files = weight_files(self.model)
        for index in state["finished_blocks"]:
            if not self.block_file(index).is_file():
                raise LqtkError(f"{self.block_file(index)}, written with the checkpoint, is missing: start afresh "
                                "without --ckpt_path")
            files.add(self.block_file(index))
        blocks = {self.block_prefix(index): self.block_file(index) for index in state["finished_blocks"]}
        for name, config in state["layers"].items():
            source = next(file for prefix, file in blocks.items() if name.startswith(prefix))
            set_submodule(self.model, name, meta_quantized_linear(files, name, config, source))
        self.finished_blocks = state["finished_blocks"]
        self.layer_errors = state["layer_errors"]
        self.layer_history = state["layer_history"]
        self.tuning_results = state["block_tuning"]
        self.fallbacks = state["fallback_layers"]


def first_window(hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """A batch's block inputs and keyword arguments cut to its first window: the tensors (or tuples of them) whose
    first dim is the batch's (a Gemma-3 sliding-window mask); those shared by all windows (positions) stay."""
    windows = hidden.shape[0]

    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == windows:
            return value[:1]
        return tuple(cut(v) for v in value) if isinstance(value, tuple) else value

    return hidden[:1], {name: cut(value) for name, value in kwargs.items()}


def relative_output_error(weight: torch.Tensor, quantized: QuantizedWeight, hessian: torch.Tensor | None) -> float:
    """||(W - Q) X||² / ||W X||² over the calibration inputs (tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)); plain weight error
    when there is no Hessian."""
    w = weight.detach().float()
    delta = w - quantized.dequantize().to(w.device)
    if hessian is None:
        return (delta.pow(2).sum() / w.pow(2).sum()).item()
    return output_error(delta, hessian) / output_error(w, hessian)
