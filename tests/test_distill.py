"""KL distillation and PV-tuning on the tiny model, as CLI subprocesses (1 or 2 CPU processes with gloo, FSDP2): the
loss falls, checkpoints are sharded, 1 and 2 processes (and 2 "nodes" under torchrun) compute the same losses, a run
killed at a random moment resumes to the same result, also on another number of processes; PV-tuning's code search
brings the decoded weight nearer to its target."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import LQTK, QUICK, REPO, fails_with, kill_at_random_moment, recipe_args, run_lqtk
from lqtk.cli import main
from lqtk.formats import FORMATS
from lqtk.nn import QuantizedLinear
from lqtk.phases.pv import PVTuning, StraightThroughCodes
from lqtk.quant import AQLM, GPTQ, LeanQuant

DEBUG = REPO / "configs" / "debug"
PV = ["--model.init_args.pv", '{"lr": 0.001, "max_code_change": 0.05}']


@pytest.fixture(scope="module")
def students(corpus, tmp_path_factory):
    """Exports of the tiny model by the AQLM and GPTQ debug recipes."""
    root = tmp_path_factory.mktemp("students")
    for recipe in ("aqlm-tiny", "gptq-tiny"):  # in-process: they are only the distillations' inputs
        main(recipe_args(corpus, root / recipe, "--export.evaluate", "false", *QUICK[recipe],
                         recipe=str(DEBUG / f"{recipe}.yaml")))
    return {recipe: root / recipe / "model" for recipe in ("aqlm-tiny", "gptq-tiny")}


def distill_args(corpus, students, run_dir, *extra, student="aqlm-tiny", processes=1):
    return recipe_args(corpus, run_dir, "--model.init_args.model", str(students[student]), "--trainer.devices",
                       str(processes), *extra, recipe=str(DEBUG / "aqlm-tiny-distill.yaml"))


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def losses(run_dir) -> list[float]:
    return [entry["kl"] for entry in metrics(run_dir)["distillation_history"] if "kl" in entry]


def assert_same_export(a, b, exact: bool) -> None:
    expected, actual = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        if exact:
            assert torch.equal(expected[key], actual[key]), key
        else:
            # other process counts sum the gradients in another order: equal to float rounding, and an fp16
            # codebook entry may round to the neighbouring value
            torch.testing.assert_close(actual[key].float(), expected[key].float(), rtol=2e-3, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def pv_runs(corpus, students, tmp_path_factory):
    """The same PV-tuning run of the AQLM student on 1 and on 2 processes."""
    root = tmp_path_factory.mktemp("pv")
    for processes in (1, 2):
        proc = run_lqtk(*distill_args(corpus, students, root / f"p{processes}", *PV, processes=processes), cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {1: root / "p1", 2: root / "p2"}


@pytest.mark.slow
def test_two_processes_lower_the_loss_and_write_a_sharded_checkpoint(pv_runs):
    run = pv_runs[2]
    kl = losses(run)
    assert len(kl) == 6 and kl[-1] < kl[0]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "step-6.ckpt"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {f.name for f in last.resolve().iterdir()}
    assert metrics(run)["perplexity"] > 0


@pytest.mark.slow
def test_one_and_two_processes_compute_the_same_losses_and_halve_the_sharded_state(pv_runs):
    one, two = losses(pv_runs[1]), losses(pv_runs[2])
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-3, atol=0)
    single, = metrics(pv_runs[1])["memory_per_process"]
    for process in metrics(pv_runs[2])["memory_per_process"]:
        for key in ("trainable_parameters_bytes", "optimizer_state_bytes"):
            assert process[key] == pytest.approx(single[key] / 2, rel=0.1), key


@pytest.mark.slow
def test_pv_tuning_moves_the_codes(pv_runs, students):
    before = load_file(students["aqlm-tiny"] / "model.safetensors")
    after = load_file(pv_runs[1] / "model" / "model.safetensors")
    codes = [key for key in before if key.endswith(".codes")]
    assert codes and any(not torch.equal(before[key], after[key]) for key in codes)


@pytest.mark.slow
def test_killed_distillation_resumes_to_the_same_export(corpus, students, pv_runs, tmp_path):
    killed = tmp_path / "killed"
    args = distill_args(corpus, students, killed, *PV, processes=1)
    kill_at_random_moment(args, killed, metrics(pv_runs[1])["quantize_time_s"], tmp_path)
    if not (killed / "model").exists():
        proc = run_lqtk(*args, "--ckpt_path", "last", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_export(pv_runs[1], killed, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_distillation_resumes_on_another_number_of_processes(corpus, students, pv_runs, first, then, tmp_path):
    killed = tmp_path / "killed"
    args = distill_args(corpus, students, killed, *PV, processes=first)
    kill_at_random_moment(args, killed, metrics(pv_runs[first])["quantize_time_s"], tmp_path)
    if not (killed / "model").exists():
        resumed = distill_args(corpus, students, killed, *PV, "--ckpt_path", "last", processes=then)
        proc = run_lqtk(*resumed, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_export(pv_runs[then], killed, exact=False)


@pytest.mark.slow
def test_two_nodes_under_torchrun_compute_the_losses_of_two_processes(corpus, students, pv_runs, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "nodes"
    args = distill_args(corpus, students, run_dir, *PV, "--trainer.num_nodes", "2")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               *LQTK[1:], *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    torch.testing.assert_close(torch.tensor(losses(run_dir)), torch.tensor(losses(pv_runs[2])), rtol=1e-3, atol=0)


@pytest.mark.slow
def test_pv_tuning_moves_scalar_codes_and_8bit_adamw_runs_under_ddp(corpus, students, tmp_path):
    proc = run_lqtk(*distill_args(corpus, students, tmp_path / "gptq", *PV, "--model.init_args.optimizer", "adamw8bit",
                                  "--trainer.strategy", "ddp", student="gptq-tiny", processes=2), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = load_file(students["gptq-tiny"] / "model.safetensors")
    after = load_file(tmp_path / "gptq" / "model" / "model.safetensors")
    assert any(not torch.equal(before[key], after[key]) for key in before if key.endswith(".qweight"))


@pytest.mark.slow
def test_8bit_adamw_under_fsdp2_is_refused(corpus, students, tmp_path, capsys):
    fails_with(capsys, distill_args(corpus, students, tmp_path / "run", "--model.init_args.optimizer", "adamw8bit"),
               "cannot update FSDP2-sharded")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("quantizer", [GPTQ(bits=2, group_size=16), LeanQuant(bits=2),
                                       AQLM(num_codebooks=2, nbits_per_codebook=4, in_group_size=4, max_rounds=1)])
def test_nearest_codes_bring_the_weight_nearer_to_the_target_within_the_change_budget(quantizer):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=gen)
    x = torch.randn(256, 64, generator=gen)
    quantized = quantizer.quantize(weight, 2 * x.T @ x / len(x))
    target = quantized.dequantize() + 0.3 * torch.randn(32, 64, generator=gen)
    fmt = FORMATS[quantized.format]
    for budget in (0.05, 1.0):
        codes = fmt.nearest_codes(quantized.tensors, quantized.spec, target, budget, beam_size=2)
        moved = quantized.tensors | codes
        before = (quantized.dequantize() - target).square().sum()
        after = (fmt.dequantize(moved, quantized.spec) - target).square().sum()
        assert after < before
        units = (fmt.dequantize(moved, quantized.spec) != quantized.dequantize())
        per_unit = quantized.spec.get("in_group_size", 1)  # an AQLM group changes together
        assert units.sum() / per_unit <= budget * weight.numel() / per_unit + 1


@pytest.mark.parametrize("trust_ratio", [None, 0.05])
def test_v_step_keeps_the_weight_change_within_the_trust_ratio(trust_ratio):
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(32, 64, generator=gen), torch.randn(256, 64, generator=gen)
    quantizer = AQLM(num_codebooks=2, nbits_per_codebook=4, in_group_size=4, max_rounds=1)
    model = torch.nn.Sequential(QuantizedLinear(quantizer.quantize(weight, x.T @ x / len(x))))
    codes = StraightThroughCodes(model, PVTuning(lr=0.3, max_code_change=0.5, trust_ratio=trust_ratio))
    model[0].weight_grad.copy_(torch.randn(32, 64, generator=gen))  # as if a backward pass had left it
    change = codes.step()
    assert 0 < change["code_change"] <= 0.5 + 1e-6
    assert change["weight_change"] > 0.05 if trust_ratio is None else 0 < change["weight_change"] <= trust_ratio


@pytest.mark.slow  # its `students` fixture calibrates two exports
def test_unknown_trainable_group_is_refused(capsys, corpus, students, tmp_path):
    fails_with(capsys, distill_args(corpus, students, tmp_path / "run", "--model.init_args.trainable", "[codes]"),
               "trainable=['codes']: choose a non-empty subset")


@pytest.mark.slow
def test_global_batch_that_processes_cannot_share_is_refused(corpus, students, tmp_path, capsys):
    fails_with(capsys, distill_args(corpus, students, tmp_path / "run", "--data.global_batch_size", "3"),
               "data.global_batch_size=3 must be a multiple of the 2 windows")
    assert not (tmp_path / "run").exists()
