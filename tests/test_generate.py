"""`lqtk generate` on the tiny model: greedy generation is transformers' own greedy `generate`, an export generates
on its QuantizedLinear layers with the speed line on stderr, sampling is seeded, and bad input is refused with one
LqtkError naming the fix before anything loads."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lqtk.anatomy import decoder_blocks
from lqtk.errors import LqtkError
from lqtk.generate import encode_prompt, generate_command
from lqtk.model_format import save_quantized
from lqtk.models import load_causal_lm, prepare_model
from lqtk.nn import QuantizedLinear, set_submodule
from lqtk.quant import RTN

PROMPT = "The king said"
SPEED = re.compile(r"^(\d+) prompt tokens, (\d+) new tokens in [\d.]+ s: [\d.]+ tokens/s \(prefill [\d.]+ s\)$")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """tiny-llama's decoder Linears rounded to 4 bits (RTN) and saved as an lqtk export, without the calibration
    walk (Lightning, the Trainer, the export's checks would take most of this file's time): a second."""
    path, out = prepare_model("tiny-llama"), tmp_path_factory.mktemp("generate") / "rtn"
    model, quantizer = load_causal_lm(path), RTN(bits=4, group_size=32)
    for block in decoder_blocks(model):
        for name, linear in list(block.named_modules()):
            if isinstance(linear, torch.nn.Linear):
                set_submodule(block, name, QuantizedLinear(quantizer.quantize(linear.weight.detach()), linear.bias))
    save_quantized(model, out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def run(capsys, *args) -> tuple[str, re.Match]:
    """`lqtk generate ARGS`: its stdout, and the match of its last stderr line against SPEED."""
    generate_command(list(args))
    out, err = capsys.readouterr()
    speed = SPEED.match(err.strip().splitlines()[-1])
    assert speed, err
    return out, speed


def test_greedy_is_transformers_greedy_generate(capsys):
    path = prepare_model("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # the naive reference
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                               pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    out, speed = run(capsys, "--model", "tiny-llama", "--prompt", PROMPT, "--max-new-tokens", "12")
    assert out == tokenizer.decode(reference, skip_special_tokens=True, clean_up_tokenization_spaces=False) + "\n"
    assert (int(speed[1]), int(speed[2])) == (ids.shape[1], len(reference))


def test_an_export_generates_on_its_quantized_layers(export, capsys, monkeypatch):
    calls = []
    forward = QuantizedLinear.forward
    monkeypatch.setattr(QuantizedLinear, "forward", lambda self, x: calls.append(x.shape) or forward(self, x))
    out, speed = run(capsys, "--model", str(export), "--prompt", PROMPT, "--max-new-tokens", "8")
    assert out.strip() and int(speed[2]) >= 1
    # 14 quantized layers run on the prompt (prefill), then on one token per decode step
    assert len(calls) == 14 * int(speed[2]) and calls[-1][-2] == 1


def test_sampling_is_seeded(export, capsys):
    args = ["--model", str(export), "--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "1.5",
            "--top-p", "0.95"]
    first, _ = run(capsys, *args, "--seed", "1")
    again, _ = run(capsys, *args, "--seed", "1")
    other, _ = run(capsys, *args, "--seed", "2")
    assert first == again != other


def test_chat_wraps_the_prompt_in_the_template():
    tokenizer = AutoTokenizer.from_pretrained(prepare_model("tiny-llama"))
    with pytest.raises(LqtkError, match="has no chat template: drop --chat"):
        encode_prompt(tokenizer, PROMPT, chat=True)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert tokenizer.decode(encode_prompt(tokenizer, PROMPT, chat=True)[0]) == f"<user>{PROMPT}<assistant>"


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "the prompt is empty: pass the text to continue with --prompt"),
    (["--prompt", "  \n"], "the prompt is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 generates nothing: pass 1 or more"),
    (["--temperature", "-0.5"], "--temperature -0.5 is not allowed: pass 0 for greedy decoding"),
    (["--top-p", "0"], r"--top-p 0.0 is not in \(0, 1\]: pass a probability above 0 and at most 1"),
    (["--top-p", "1.5"], r"--top-p 1.5 is not in \(0, 1\]"),
    (["--max-new-tokens", "2000"], "exceed the model's context of 1024 tokens: pass --max-new-tokens 1011 or less"),
    (["--prompt", "x" * 1024], "the prompt's 1024 tokens fill the model's context of 1024 tokens: shorten the prompt"),
    (["--chat"], "has no chat template: drop --chat"),
    (["--model", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
])
def test_bad_input_is_refused_with_the_fix(args, message):
    with pytest.raises(LqtkError, match=message):
        generate_command(["--model", "tiny-llama", "--prompt", PROMPT, *args])
