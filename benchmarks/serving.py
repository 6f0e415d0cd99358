"""Serving throughput in vLLM: each version against the source Llama in the same run, and vLLM against `generate()`.

SmolLM2-135M-Instruct as a plain Llama and its three conversions (`v2` and `widened` with `--preserve`, `dex`), each
served by vLLM through `vllm_diffllama` with the same engine settings. For every batch size and prompt length of the
grid, one `generate` call of B random prompts of P tokens and N more tokens each: all prompts are prefilled in one
step (the step's token budget holds them all), then N decode steps. Prefill tokens/s is B·P over the time to the
first tokens; decode tokens/s is B·N over the time from the first tokens to the last (vLLM's own per-request
timestamps). The ratios divide each model's figure by the Llama's, measured in the same run. Then `generate()` of
our model (SDPA, batch 1, the shortest prompt) against vLLM's batch-1 decode of the same folder.

    python benchmarks/serving.py                         # the CPU grid below, fp32 and bf16, best of 2
    python benchmarks/serving.py --quick --source DIR    # a smoke run on a Llama folder: batch 1, 64 tokens, fp32
    python benchmarks/serving.py --device cuda --full    # every batch (1, 8, 32) at every length (512, 2,048)

vLLM lives in an environment of its own (docs/serving.md): `--vllm-python` names its interpreter, by default
`.venv-vllm/bin/python`. On this CPU the grid leaves out batch 32 at 2,048 tokens (its fp32 KV cache alone is 7.5 GB
for widened version 1 and it would take as long as the rest); `--full` runs it. Each model and dtype is written to
`results.json` as it finishes and skipped when the command runs again. Each setting counts its fastest of
`--repeats` runs, a whole pass over the grid apart. The engine is compiled, as vLLM serves by default (about a minute
an engine here); `--no-compile --out benchmarks/results/serving-eager` measures the eager engine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import lab

OUT = lab.ROOT / "benchmarks" / "results" / "serving"
MODELS = {"llama": None, "v2": "v2", "widened": "widened", "dex": "dex"}  # name: conversion strategy
CPU_GRID = [(1, 512), (8, 512), (32, 512), (1, 2048), (8, 2048)]  # (batch, prompt tokens)
FULL_GRID = [(batch, length) for length in (512, 2048) for batch in (1, 8, 32)]
QUICK_GRID = [(1, 64)]
RESULT = "SERVING-RESULT "


# --- in vLLM's environment -------------------------------------------------------------------------------------
def measure_in_vllm(job: dict) -> dict:
    """One engine for `job["folder"]`, every (batch, length) of the grid: prefill and decode tokens per second."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    grid, new_tokens = [tuple(setting) for setting in job["grid"]], job["new_tokens"]
    longest = max(length for _, length in grid) + new_tokens + 1
    budget = max(batch * length for batch, length in grid)
    llm = LLM(model=job["folder"], dtype=job["dtype"], skip_tokenizer_init=True, seed=0,
              kv_cache_memory_bytes=job["kv_cache_bytes"], max_model_len=longest,
              max_num_seqs=max(batch for batch, _ in grid), max_num_batched_tokens=budget,
              enable_prefix_caching=False,  # every prompt is prefilled in full
              disable_log_stats=False,  # per-request timestamps
              enforce_eager=not job["compile"])
    params = SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True, temperature=0.0, detokenize=False)
    rng = random.Random(0)
    vocab = json.loads((Path(job["folder"]) / "config.json").read_text())["vocab_size"]
    tokens = range(vocab // 10, vocab)  # past the special tokens at the start of most vocabularies
    warm = [TokensPrompt(prompt_token_ids=[rng.choice(tokens) for _ in range(32)])]
    llm.generate(warm, params, use_tqdm=False)  # compiles and warms up outside the timed calls
    prompts = {(batch, length): [TokensPrompt(prompt_token_ids=[rng.choice(tokens) for _ in range(length)])
                                 for _ in range(batch)] for batch, length in grid}
    times = {setting: ([], []) for setting in grid}  # prefill and decode seconds of each run
    # The fastest of a few runs counts (a busy machine only ever slows a run down), and a setting's runs are minutes
    # apart, a pass over the whole grid between them, so that one busy spell does not slow them all.
    for _ in range(job["repeats"]):
        for setting in grid:
            outputs = llm.generate(prompts[setting], params, use_tqdm=False)
            assert all(len(output.outputs[0].token_ids) == new_tokens + 1 for output in outputs)
            stats = [output.metrics for output in outputs]
            first = max(s.first_token_ts for s in stats)
            times[setting][0].append(first - min(s.scheduled_ts for s in stats))
            times[setting][1].append(max(s.last_token_ts for s in stats) - first)
    rows = []
    for (batch, length), (prefills, decodes) in times.items():
        rows.append({"batch": batch, "prompt": length, "new_tokens": new_tokens, "prefill_s": prefills,
                     "decode_s": decodes, "prefill_tok_s": batch * length / min(prefills),
                     "decode_tok_s": batch * new_tokens / min(decodes)})
        print(f"  {job['name']} {job['dtype']} batch {batch} prompt {length}: prefill "
              f"{rows[-1]['prefill_tok_s']:.0f} tok/s, decode {rows[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    return {"rows": rows}


# --- here ------------------------------------------------------------------------------------------------------
def folders(work: Path, source: Path | None, names=tuple(MODELS)) -> dict[str, Path]:
    """The Llama (SmolLM2-135M-Instruct unless `source` names another folder) and its conversions `names`, made
    once."""
    from conversion import convert

    if source is None:
        from recovery import export_source  # SmolLM2-135M-Instruct from its GGUF, as a plain Llama folder

        source = export_source(work / "llama")
    made = {}
    for name, strategy in MODELS.items():
        if name not in names:
            continue
        folder = source if strategy is None else work / name
        if strategy is not None and not (folder / "config.json").is_file():
            convert(source=source, output=folder, strategy=strategy, preserve=True, verify=False, progress=False)
        made[name] = folder
    return made


def run_vllm(python: Path, job: dict) -> dict:
    # On a CPU the engine runs in this process: as a process of its own, its busy loop takes one of two cores from
    # the model. On a GPU it runs as when serving.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lab.ROOT), str(lab.ROOT / "benchmarks")]),
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if job["device"].startswith("cuda") else "0"}
    process = subprocess.run([str(python), __file__, "--in-vllm", json.dumps(job)], env=environment, text=True,
                             stdout=subprocess.PIPE, stderr=None)  # vLLM's log goes straight to the terminal
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
    for line in process.stdout.splitlines():
        if not line.startswith(RESULT):
            print(line, flush=True)
    if process.returncode or not lines:
        raise SystemExit(f"vLLM failed on {job['name']} {job['dtype']} (exit {process.returncode})")
    return json.loads(lines[-1].removeprefix(RESULT))


def measure_generate(folder: Path, dtype: str, length: int, new_tokens: int, device: str, repeats: int) -> dict:
    """Our model's `generate()` at batch 1: decode tokens per second after a prompt of `length` tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    import modeling_diff  # noqa: F401  our model type, without trust_remote_code

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab // 10, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    prefills, totals = [], []
    with torch.no_grad():
        model.generate(prompt[:, :32], max_new_tokens=4, **kwargs)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, **kwargs)
            prefills.append(time.perf_counter() - started)
            started = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens + 1, **kwargs)
            totals.append(time.perf_counter() - started)
    decode = min(totals) - min(prefills)
    return {"prompt": length, "new_tokens": new_tokens, "prefill_s": prefills, "total_s": totals,
            "decode_tok_s": new_tokens / decode}


def ratio_rows(results: lab.Results, dtypes: list[str], grid) -> list[list]:
    rows = []
    for dtype in dtypes:
        base = results.runs.get(f"vllm/llama/{dtype}")
        if base is None:
            continue
        base_rows = {(r["batch"], r["prompt"]): r for r in base["rows"]}
        for name in MODELS:
            run = results.runs.get(f"vllm/{name}/{dtype}")
            if run is None or name == "llama":
                continue
            for row in run["rows"]:
                llama = base_rows[(row["batch"], row["prompt"])]
                rows.append([name, dtype, row["batch"], row["prompt"], f"{row['prefill_tok_s']:.0f}",
                             f"{row['prefill_tok_s'] / llama['prefill_tok_s']:.2f}", f"{row['decode_tok_s']:.1f}",
                             f"{row['decode_tok_s'] / llama['decode_tok_s']:.2f}"])
    return rows


def report(results: lab.Results, folder: Path, dtypes: list[str], grid) -> None:
    settings = results.data["settings"]
    engine = "compiled (vLLM's default)" if settings.get("compile") else "eager (`--no-compile`)"
    lines = ["# vLLM serving throughput: each version against the source Llama (same run)", "",
             f"`python benchmarks/serving.py` on {results.data.get('environment', {}).get('cpu', 'this machine')}, "
             f"{settings['device']}, engine {engine}, {settings['new_tokens']} decoded tokens a request, the fastest "
             f"of {settings.get('repeats', 1)} runs. Ratios are the model's tokens/s over the Llama's at the same "
             "batch, prompt and dtype.", ""]
    llama_rows = []
    for dtype in dtypes:
        base = results.runs.get(f"vllm/llama/{dtype}")
        for row in base["rows"] if base else []:
            llama_rows.append(["llama", dtype, row["batch"], row["prompt"], f"{row['prefill_tok_s']:.0f}", "1.00",
                               f"{row['decode_tok_s']:.1f}", "1.00"])
    header = ["model", "dtype", "batch", "prompt", "prefill tok/s", "× Llama", "decode tok/s", "× Llama"]
    lines += [lab.markdown_table(header, llama_rows + ratio_rows(results, dtypes, grid)), ""]
    generate_rows = []
    for key, run in sorted(results.runs.items()):
        if not key.startswith("generate/"):
            continue
        _, name, dtype = key.split("/")
        served = results.runs.get(f"vllm/{name}/{dtype}")
        batch1 = next((r for r in served["rows"] if r["batch"] == 1 and r["prompt"] == run["prompt"]), None) \
            if served else None
        generate_rows.append([name, dtype, run["prompt"], f"{run['decode_tok_s']:.1f}",
                              f"{batch1['decode_tok_s']:.1f}" if batch1 else "", 
                              f"{batch1['decode_tok_s'] / run['decode_tok_s']:.2f}" if batch1 else ""])
    if generate_rows:
        lines += ["## vLLM against `generate()` (batch 1, decode)", "",
                  lab.markdown_table(["model", "dtype", "prompt", "generate() tok/s", "vLLM tok/s", "vLLM ×"],
                                     generate_rows), ""]
    (folder / "results.md").write_text("\n".join(lines))
    plot(results, folder / "results.png", dtypes)


def plot(results: lab.Results, path: Path, dtypes: list[str]) -> None:
    plt = lab.pyplot()
    figure, axes = plt.subplots(len(dtypes), 2, figsize=(11, 3.6 * len(dtypes)), squeeze=False)
    for row_axes, dtype in zip(axes, dtypes):
        base = results.runs.get(f"vllm/llama/{dtype}")
        if base is None:
            continue
        settings = [(r["batch"], r["prompt"]) for r in base["rows"]]
        labels = [f"B{b}\nP{p}" for b, p in settings]
        names = [name for name in MODELS if name != "llama" and f"vllm/{name}/{dtype}" in results]
        for axis, figure_name in zip(row_axes, ("prefill_tok_s", "decode_tok_s")):
            llama = {(r["batch"], r["prompt"]): r[figure_name] for r in base["rows"]}
            width = 0.8 / max(1, len(names))
            for i, name in enumerate(names):
                mine = {(r["batch"], r["prompt"]): r[figure_name] for r in results.runs[f"vllm/{name}/{dtype}"]["rows"]}
                axis.bar([x + i * width for x in range(len(settings))],
                         [mine[s] / llama[s] for s in settings], width, label=name)
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(settings))], labels)
            axis.set_title(f"{figure_name.split('_')[0]} ({dtype}), × the Llama's tokens/s")
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    lab.add_common_arguments(parser, out=OUT)
    parser.add_argument("--full", action="store_true", help="every batch at every prompt length")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 bfloat16 (--quick: float32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens a request")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting; the fastest counts")
    parser.add_argument("--vllm-python", type=Path, default=lab.ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--work", type=Path, default=None, help="model folders (default: OUT/cache)")
    parser.add_argument("--source", type=Path, default=None, help="a Llama folder instead of SmolLM2-135M-Instruct")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="the models to measure (the Llama always)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="vLLM's torch.compile (and CUDA graphs on a GPU), as vLLM serves by default; "
                             "default: on, off for --quick; --no-compile measures the eager engine")
    parser.add_argument("--in-vllm", help=argparse.SUPPRESS)  # the measuring process, in vLLM's environment
    parser.set_defaults(threads=os.cpu_count())  # generate() gets every core, as vLLM's engine does
    args = parser.parse_args(argv)
    if args.in_vllm:
        print(RESULT + json.dumps(measure_in_vllm(json.loads(args.in_vllm))), flush=True)
        return 0
    out = lab.setup(args, out=OUT)
    grid = QUICK_GRID if args.quick else FULL_GRID if args.full or args.device.startswith("cuda") else CPU_GRID
    dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    new_tokens = 4 if args.quick else args.new_tokens
    if args.compile is None:
        args.compile = not args.quick  # compiling takes about a minute an engine on this CPU
    if not args.vllm_python.is_file():
        raise SystemExit(f"no vLLM interpreter at {args.vllm_python}: build its environment (docs/serving.md)")
    results = lab.Results(out / "results.json", {"grid": grid, "new_tokens": new_tokens, "device": args.device,
                                                 "compile": args.compile, "repeats": args.repeats}, fresh=args.fresh,
                          selects=("repeats",))
    results.put("environment", lab.environment())
    made = folders(args.work or out / "cache", args.source, {"llama", *args.models})
    for dtype in dtypes:
        for name, folder in made.items():
            key = f"vllm/{name}/{dtype}"
            if key in results:
                continue
            budget = max(b * (p + new_tokens) for b, p in grid)
            # the widened model caches twice the Llama's keys and values: 92 kB a token in fp32 for SmolLM2
            job = {"name": name, "folder": str(folder), "dtype": dtype, "grid": grid, "new_tokens": new_tokens,
                   "device": args.device, "compile": args.compile, "repeats": 1 if args.quick else args.repeats,
                   "kv_cache_bytes": int(budget * 100_000 * (1 if dtype == "float32" else 0.5)) + (256 << 20)}
            results.add(key, run_vllm(args.vllm_python, job))
            print(f"[serving] done {key}", flush=True)
            report(results, out, dtypes, grid)
        for name, folder in made.items():
            key = f"generate/{name}/{dtype}"
            if key not in results:
                results.add(key, measure_generate(folder, dtype, grid[0][1], new_tokens, args.device,
                                                  1 if args.quick else args.repeats))
                print(f"[serving] done {key}", flush=True)
        report(results, out, dtypes, grid)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
