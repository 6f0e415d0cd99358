"""Running locally on a CPU: decode speed and perplexity of each version against the source Llama, per runtime.

SmolLM2-135M-Instruct as a plain Llama and its three conversions (`v2` and `widened` with `--preserve`, `dex`: the
folders `benchmarks/serving.py` makes), each run five ways at batch 1:

- `torch`: our model in transformers, fp32 (`generate()`, SDPA);
- `torch-int8`: torchao's int8 weight-only quantisation (`Int8WeightOnlyConfig`) of every linear layer;
- `torch-int4`: torchao's int4 weights with int8 dynamic activations (`Int8DynamicActivationIntxWeightConfig`, groups
  of 32): torchao 0.18 has no int4 weight-only kernel for CPUs (its formats need CUDA or the `mslk` package);
- `onnx`: the `python -m diffllama_onnx` export on onnxruntime, fp32 (`OnnxCausalLM`);
- `onnx-int8`: the same graph through onnxruntime's dynamic int8 quantiser;
- `executorch`: the `python -m diffllama_executorch` program (XNNPACK, fp32) in the ExecuTorch runtime
  (`ExecuTorchCausalLM`).

Decode tokens/s is N greedy tokens after a P-token prompt, the fastest of `--repeats` runs (prefill excluded);
perplexity is over the held-out standard-library files the code recipe holds out, in blocks. Ratios divide each
model's decode speed by the Llama's in the same runtime; the perplexity cost of a quantisation is its perplexity
over the same model's fp32 one. The exported runtimes' greedy tokens are also checked against `generate()`.

    python benchmarks/local_inference.py                  # this CPU: P 128, N 32, 4 blocks of 512 tokens
    python benchmarks/local_inference.py --quick --source DIR   # a smoke run on a small Llama folder
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import lab

OUT = lab.ROOT / "benchmarks" / "results" / "local_inference"
MODELS = ("llama", "v2", "widened", "dex")
RUNTIMES = ("torch", "torch-int8", "torch-int4", "onnx", "onnx-int8", "executorch")


def held_out_blocks(tokenizer, *, blocks: int, block_size: int) -> torch.Tensor:
    """Blocks of the standard library's held-out files (the code recipe's split), tokenised and packed."""
    from finetune.data import default_data_dir, python_files, split_files, tokenize_files

    files = python_files(default_data_dir())
    _, held_out = split_files(files, root=default_data_dir(), eval_fraction=0.05)
    ids, _ = tokenize_files(held_out, tokenizer, max_tokens=blocks * block_size)
    return torch.tensor(ids[: blocks * block_size]).view(blocks, block_size)


def torch_model(folder: Path, runtime: str):
    from transformers import AutoModelForCausalLM

    import modeling_diff  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if runtime == "torch-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    elif runtime == "torch-int4":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    return model


def measure_torch(model, blocks: torch.Tensor, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        losses = [model(input_ids=block[None], labels=block[None], use_cache=False).loss.item() for block in blocks]
        model.generate(prompt[:, :16], max_new_tokens=4, **kwargs)  # warm-up
        prefills, totals = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, **kwargs)
            prefills.append(time.perf_counter() - started)
            started = time.perf_counter()
            tokens = model.generate(prompt, max_new_tokens=new_tokens + 1, **kwargs)
            totals.append(time.perf_counter() - started)
    return {"perplexity": math.exp(sum(losses) / len(losses)), "decode_tok_s": new_tokens / (min(totals) - min(prefills)),
            "tokens": tokens[0, prompt.shape[1]:].tolist()}


def measure_onnx(folder: Path, int8: bool, blocks: torch.Tensor, prompt: torch.Tensor, new_tokens: int,
                 repeats: int) -> dict:
    import numpy as np

    from diffllama_onnx import OnnxCausalLM

    model = OnnxCausalLM(folder, int8=int8, threads=torch.get_num_threads())
    losses = []
    for block in blocks.numpy():
        ids = block[None]
        logits, _ = model.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], model.empty_cache(1))
        logits = torch.from_numpy(logits[0, :-1])
        losses.append(torch.nn.functional.cross_entropy(logits, torch.from_numpy(block[1:])).item())
    return measure_generator(model, losses, prompt, new_tokens, repeats)


def measure_executorch(folder: Path, blocks: torch.Tensor, prompt: torch.Tensor, new_tokens: int,
                       repeats: int) -> dict:
    from diffllama_executorch import ExecuTorchCausalLM

    model = ExecuTorchCausalLM(folder)
    losses = []
    for block in blocks:
        logits = torch.from_numpy(model.step(block.tolist(), 0)[:-1])
        losses.append(torch.nn.functional.cross_entropy(logits, block[1:]).item())
    return measure_generator(model, losses, prompt, new_tokens, repeats)


def measure_generator(model, losses: list[float], prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Perplexity from `losses`, and decode tokens/s of an exported model's `generate` (prefill subtracted)."""
    ids = prompt.tolist()
    model.generate(ids, max_new_tokens=2)  # warm-up
    prefills, totals = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1)
        prefills.append(time.perf_counter() - started)
        started = time.perf_counter()
        tokens = model.generate(ids, max_new_tokens=new_tokens + 1)
        totals.append(time.perf_counter() - started)
    return {"perplexity": math.exp(sum(losses) / len(losses)), "decode_tok_s": new_tokens / (min(totals) - min(prefills)),
            "tokens": tokens[0]}


def onnx_folder(folder: Path, work: Path) -> Path:
    from diffllama_onnx import export

    target = work / f"{folder.name}-onnx"
    if not (target / "onnx_layout.json").is_file():
        export(folder, target, int8=True)
    return target


def executorch_folder(folder: Path, work: Path, max_cache_len: int) -> Path:
    from diffllama_executorch import export

    target = work / f"{folder.name}-executorch"
    if not (target / "executorch_layout.json").is_file():
        export(folder, target, max_cache_len=max_cache_len)
    return target


def report(results: lab.Results, out: Path) -> None:
    settings = results.data["settings"]
    lines = ["# Running locally: each version against the source Llama, per runtime (same run)", "",
             f"`python benchmarks/local_inference.py` on {results.data.get('environment', {}).get('cpu', 'this CPU')}, "
             f"{settings['threads']} threads, batch 1: {settings['new_tokens']} greedy tokens after a "
             f"{settings['prompt']}-token prompt (the fastest of {settings['repeats']} runs), perplexity over "
             f"{settings['blocks']} held-out blocks of {settings['block_size']} standard-library tokens. "
             "`× Llama` divides decode tokens/s by the Llama's in the same runtime; `ppl ×` divides perplexity by "
             "the same model's fp32 (`torch`) perplexity.", ""]
    rows = []
    for runtime in RUNTIMES:
        for name in MODELS:
            run = results.runs.get(f"{name}/{runtime}")
            if run is None:
                continue
            llama = results.runs.get(f"llama/{runtime}")
            full = results.runs.get(f"{name}/torch")
            rows.append([runtime, name, f"{run['decode_tok_s']:.1f}",
                         f"{run['decode_tok_s'] / llama['decode_tok_s']:.2f}" if llama else "",
                         f"{run['perplexity']:.3f}", f"{run['perplexity'] / full['perplexity']:.3f}" if full else "",
                         {True: "yes", False: "no"}.get(run.get("tokens_equal_torch"), "")])
    lines.append(lab.markdown_table(["runtime", "model", "decode tok/s", "× Llama", "perplexity", "ppl ×",
                                     "greedy tokens = torch"], rows))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plt = lab.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(MODELS)
    for i, name in enumerate(MODELS):
        present = [r for r in RUNTIMES if f"{name}/{r}" in results.runs]
        xs = [RUNTIMES.index(r) + i * width for r in present]
        axes[0].bar(xs, [results.runs[f"{name}/{r}"]["decode_tok_s"] for r in present], width, label=name)
        axes[1].bar(xs, [results.runs[f"{name}/{r}"]["perplexity"] for r in present], width, label=name)
    for axis, title in zip(axes, ("decode tokens/s (batch 1)", "held-out perplexity")):
        axis.set_xticks([x + width * (len(MODELS) - 1) / 2 for x in range(len(RUNTIMES))], RUNTIMES, fontsize=8)
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "results.png", dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    lab.add_common_arguments(parser, out=OUT)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens")
    parser.add_argument("--blocks", type=int, default=4, help="held-out blocks for perplexity")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="decode runs; the fastest counts")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                        help="the models to measure (the Llama always)")
    parser.add_argument("--work", type=Path, default=None, help="model folders (default: the serving benchmark's)")
    parser.add_argument("--source", type=Path, default=None, help="a Llama folder instead of SmolLM2-135M-Instruct")
    parser.set_defaults(threads=2)
    args = parser.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("this benchmark measures local CPU runtimes: --device cpu")
    out = lab.setup(args, out=OUT)
    if args.quick:
        args.prompt, args.new_tokens, args.blocks, args.block_size, args.repeats = 16, 16, 1, 64, 2
    from serving import OUT as SERVING_OUT, folders
    from transformers import AutoTokenizer

    work = args.work or (out / "cache" if args.source else SERVING_OUT / "cache")
    made = folders(work, args.source, {"llama", *args.models})
    settings = {"prompt": args.prompt, "new_tokens": args.new_tokens, "blocks": args.blocks,
                "block_size": args.block_size, "repeats": args.repeats, "threads": args.threads}
    results = lab.Results(out / "results.json", settings, fresh=args.fresh, selects=("repeats",))
    results.put("environment", lab.environment())
    tokenizer = AutoTokenizer.from_pretrained(made["llama"])
    blocks = held_out_blocks(tokenizer, blocks=args.blocks, block_size=args.block_size)
    vocab = len(tokenizer)
    prompt = torch.randint(vocab // 10, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    for runtime in args.runtimes:
        for name, folder in made.items():
            key = f"{name}/{runtime}"
            if key in results:
                continue
            if runtime == "executorch":
                room = max(args.block_size, args.prompt + args.new_tokens + 1)
                record = measure_executorch(executorch_folder(folder, work, room), blocks, prompt, args.new_tokens,
                                            args.repeats)
            elif runtime.startswith("onnx"):
                record = measure_onnx(onnx_folder(folder, work), runtime == "onnx-int8", blocks, prompt,
                                      args.new_tokens, args.repeats)
            else:
                record = measure_torch(torch_model(folder, runtime), blocks, prompt, args.new_tokens, args.repeats)
            reference = results.runs.get(f"{name}/torch")
            if runtime != "torch" and reference is not None:
                record["tokens_equal_torch"] = record["tokens"] == reference["tokens"]
            results.add(key, record)
            print(f"[local] {key}: {record['decode_tok_s']:.1f} tok/s, perplexity {record['perplexity']:.3f}",
                  flush=True)
            report(results, out)
    report(results, out)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
