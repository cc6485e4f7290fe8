"""`lqtk generate`: try a model from the command line: text from a prompt, streamed to stdout as it is produced.

    lqtk generate --model runs/smollm2-135m/gptq-w4g128/model --prompt "The king said" [--max-new-tokens 64]
    lqtk generate --model smollm2-135m --prompt "Who is Prospero?" --chat --temperature 0.7 --top-p 0.9 --seed 1

The model is any that lqtk loads (`lqtk.models.load_causal_lm`: an lqtk export, an fp HF causal-LM folder, a .gguf
file, a reference model name), so an export runs on lqtk's QuantizedLinear layers and their kernels (lqtk.kernels:
the one-token decode steps read the stored codes; on the GPU when there is one). Tokens come from transformers'
`generate` with its KV cache: greedy by default, sampled when --temperature > 0 (nucleus --top-p, seeded by --seed).
The last line, on stderr, counts the prompt and new tokens and gives the speed, prefill included.

The model loading and generation are imported when the command runs, not with this module, which `lqtk --help` loads
(this module adds nothing to what `import lqtk` already loads).
"""

import argparse
import sys
import time

from lqtk.errors import LqtkError


def generate_command(args: list[str]) -> None:
    """Parse `args`, load the model and its tokenizer, stream the generated text to stdout, the speed to stderr."""
    opts = build_parser().parse_args(args)
    check_options(opts)
    import torch

    from lqtk.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(opts.model)
    prompt_ids = encode_prompt(tokenizer, opts.prompt, opts.chat)
    model = load_causal_lm(opts.model).eval()
    check_context(model, prompt_ids.shape[1], opts.max_new_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    streamer = Streamer(tokenizer)
    output = generate(model, prompt_ids.to(device), opts, streamer)
    new_tokens = output.shape[1] - prompt_ids.shape[1]
    print(speed_line(prompt_ids.shape[1], new_tokens, streamer), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lqtk generate", description="Generate text from a prompt with an fp or "
                                     "lqtk-quantized model (its QuantizedLinear layers and kernels), streamed to "
                                     "stdout; the prompt and new tokens and tokens/s go to stderr. Greedy by default.")
    parser.add_argument("--model", required=True, help="Model folder (an lqtk export or an fp HF causal LM) or "
                        "reference model name.")
    parser.add_argument("--prompt", required=True, help="The text to continue.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Stop after this many new tokens (or at the "
                        "end-of-sequence token).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the most likely token each step); "
                        "above 0: sample from the softmax of logits / T.")
    parser.add_argument("--top-p", type=float, default=1.0, help="When sampling, draw from the smallest set of tokens "
                        "whose probabilities add up to P (1: every token).")
    parser.add_argument("--seed", type=int, help="Seed of the sampling (default: a different draw each run).")
    parser.add_argument("--chat", action="store_true", help="Wrap the prompt as a user message in the tokenizer's "
                        "chat template (instruction-tuned models).")
    return parser


def check_options(opts: argparse.Namespace) -> None:
    """Refuse settings that cannot generate, before anything loads."""
    if not opts.prompt.strip():
        raise LqtkError('the prompt is empty: pass the text to continue with --prompt, e.g. --prompt "The king said"')
    if opts.max_new_tokens < 1:
        raise LqtkError(f"--max-new-tokens {opts.max_new_tokens} generates nothing: pass 1 or more")
    if not opts.temperature >= 0:  # NaN too
        raise LqtkError(f"--temperature {opts.temperature} is not allowed: pass 0 for greedy decoding or a positive "
                        "temperature to sample")
    if not 0 < opts.top_p <= 1:
        raise LqtkError(f"--top-p {opts.top_p} is not in (0, 1]: pass a probability above 0 and at most 1 (1 keeps "
                        "every token)")


def encode_prompt(tokenizer, prompt: str, chat: bool):
    """The prompt's token ids (1, n): as the tokenizer encodes text (with its BOS, if it adds one), or with `chat`
    as a user message in the tokenizer's chat template, ready for the assistant's answer."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if not tokenizer.chat_template:
        raise LqtkError(f"the tokenizer of this model ({tokenizer.name_or_path}) has no chat template: drop --chat to "
                        "continue the prompt as plain text, or use an instruction-tuned model whose tokenizer has one")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    # the template writes the special tokens (BOS, role markers) itself
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the positions the model was made for (past them its output is noise)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    if prompt_tokens >= context:
        raise LqtkError(f"the prompt's {prompt_tokens} tokens fill the model's context of {context} tokens: shorten "
                        "the prompt")
    raise LqtkError(f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the model's context of "
                    f"{context} tokens: pass --max-new-tokens {context - prompt_tokens} or less, or a shorter prompt")


def generate(model, prompt_ids, opts: argparse.Namespace, streamer=None):
    """transformers' `generate` on `prompt_ids` (1, n) with the KV cache; the prompt and new ids (1, n + m)."""
    import torch

    settings = {"do_sample": False}
    if opts.temperature > 0:
        if opts.seed is not None:
            torch.manual_seed(opts.seed)  # CUDA's generators too
        # top_k 0: --top-p is the only cut of the distribution (transformers' default would add top_k 50)
        settings = {"do_sample": True, "temperature": opts.temperature, "top_p": opts.top_p, "top_k": 0}
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:  # one sequence has no padding; set, it spares transformers' warning
        pad = eos[0] if isinstance(eos, list) else eos
    if streamer is not None:
        streamer.start = time.perf_counter()
    with torch.no_grad():
        return model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), use_cache=True,
                              max_new_tokens=opts.max_new_tokens, pad_token_id=pad, streamer=streamer, **settings)


class Streamer:
    """Prints the new tokens to stdout as `generate` produces them (its `put` and `end`, as transformers'
    BaseStreamer), and times them: `start` (set before `generate`), the first new token, the end.

    The new tokens are decoded together each step and only the text not yet printed goes out: a token alone may
    decode differently (a SentencePiece word's leading space), and a byte-level token may be part of a character
    (held back while the text ends in U+FFFD, until the character is complete)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out
        self.prompt_seen, self.tokens, self.printed = False, [], 0
        self.start = self.first_token = self.stop = None

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        if self.first_token is None:
            self.first_token = time.perf_counter()
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.text()
        if not text.endswith("\ufffd"):
            self.write(text[self.printed:])
            self.printed = len(text)

    def end(self) -> None:
        self.stop = time.perf_counter()
        self.write(self.text()[self.printed:] + "\n")

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def write(self, text: str) -> None:
        out = self.out or sys.stdout  # looked up when writing: pytest's capsys replaces sys.stdout
        out.write(text)
        out.flush()


def speed_line(prompt_tokens: int, new_tokens: int, streamer: Streamer) -> str:
    """E.g. '12 prompt tokens, 64 new tokens in 3.2 s: 20.1 tokens/s (prefill 0.3 s)': the time from the call of
    `generate` to its end, the prefill up to the first new token."""
    total = streamer.stop - streamer.start
    prefill = (streamer.first_token or streamer.stop) - streamer.start
    return (f"{prompt_tokens} prompt tokens, {new_tokens} new tokens in {total:.1f} s: "
            f"{new_tokens / total:.1f} tokens/s (prefill {prefill:.1f} s)")
