"""From scratch on Python code: a Llama against differential attention at equal parameters, two sizes, each model at
its own best learning rate, five seeds.

The models (`lab.KINDS`) share hidden size, layers, MLP, tied embedding, data order, steps and schedule; each
differential model is compared with the Llama of its own parameter count:

- `diff-v1` (the paper's matching: H/2 differential heads, the Llama's projection shapes) against `llama`;
- `diff-v2` (H heads with a second query map and `lambda_proj`) against `llama-wide`, a Llama whose heads are 5/4
  as wide, which gives it version 2's attention parameters (within hidden·H a layer, 0.5% of the model);
  against `llama` too, to show what the extra parameters were worth before.

Protocol, per size and model: seed 0 at every learning rate of `--lrs`; the lowest held-out loss picks the rate;
the other seeds run at it. Every model gets the same sweep, and a rate chosen on seed 0 is kept for its seeds.

The lead about initialisation, and what explains a gain (`--ablations`, at `--ablation-sizes`): `diff-v1-nonorm`
(version 1 without its head norm, a kind of `lab.KINDS`) and the controls of `lab.CONTROLS`: `diff-v1-gain` (version
1's attention outputs started at the Llama's scale), `diff-v1-onemap` and `diff-v1-gain-onemap` (the same without
the difference: what a version-1 model gains over them is the difference's, not the norm's), `llama-v2scale` (the
Llama, and the wide Llama of version 2's parameter count, started at version 2's scale: what version 2 gains over
them is not its smaller start).

Every run records that ratio at step 0 (`init_scale`). Held-out perplexity: whole files never trained on (the
`finetune.data` split); intermediate evaluations use the first `--eval-subset` blocks, the final one all of them.

    python benchmarks/scratch.py --jobs 2            # the committed results (about 1.5 hours on 2 cores)
    python benchmarks/scratch.py --quick             # a smoke run: tiny models, a few steps
    python benchmarks/scratch.py --device cuda --sizes 256x8x16 512x12x16 --steps 2000 --eval-every 500

Runs are written to `results.json` as they finish and skipped when the command runs again (resume); the report,
`results.md`, `loss_curves.png`, `lr_sweep.png` and `trend.png`, is rewritten after every run. Checkpoints of
every run go to `cache/` (not committed), for `probes.py`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import lab

OUT = lab.ROOT / "benchmarks" / "results" / "scratch"
MODELS = ("llama", "llama-wide", "diff-v1", "diff-v2")
ABLATIONS = ("diff-v1-gain", "diff-v1-nonorm", "diff-v1-onemap", "diff-v1-gain-onemap", "llama-v2scale",
             "llama-wide-v2scale")
# (model, its reference): the comparisons every table and the trend report, lower loss is better.
COMPARISONS = (("diff-v1", "llama"), ("diff-v2", "llama-wide"), ("diff-v2", "llama"), ("llama-wide", "llama"),
               ("diff-v1-gain", "llama"), ("diff-v1-gain", "diff-v1"), ("diff-v1-nonorm", "llama"),
               ("diff-v1-nonorm", "diff-v1"), ("diff-v1-gain-onemap", "llama"),
               ("diff-v1-gain", "diff-v1-gain-onemap"), ("diff-v1", "diff-v1-onemap"), ("diff-v2", "llama-v2scale"),
               ("llama-v2scale", "llama"), ("diff-v2", "llama-wide-v2scale"))


def run_key(size: str, kind: str, lr: float, seed: int) -> str:
    return f"{size}/{kind}/lr{lr:g}/seed{seed}"


# --- one run (also in a worker process) ------------------------------------------------------------------------

_CORPUS: dict = {}


def load_corpus(path: str) -> dict:
    if path not in _CORPUS:
        _CORPUS[path] = torch.load(path, weights_only=True)
    return _CORPUS[path]


def run(task: dict) -> dict:
    corpus = load_corpus(task["corpus"])
    shape = lab.Shape.parse(task["size"])

    def config_for(kind, **overrides):
        return lab.model_config(kind, shape, vocab_size=corpus["vocab_size"], max_positions=task["block_size"],
                                **overrides)

    batches = lab.lm_batches(corpus["train"], batch_size=task["batch_size"], seed=task["seed"])
    first = batches(1)["input_ids"].to(task["device"])
    model, extra = lab.build_kind(task["kind"], config_for, first, seed=task["seed"], device=task["device"])
    init_scale = lab.attention_scale(model, first)
    held_out, subset = corpus["held_out"], corpus["held_out"][: task["eval_subset"]]
    eval_steps = [step for step in range(task["eval_every"], task["steps"], task["eval_every"])]
    record = lab.train(model, batches, steps=task["steps"], lr=task["lr"], warmup=task["warmup"],
                       evaluate=lambda m: lab.lm_losses(m, subset).mean().item(), eval_steps=eval_steps)
    final = lab.lm_losses(model, held_out)
    record["eval_curve"].append((task["steps"], final[: task["eval_subset"]].mean().item()))
    if task.get("checkpoint"):
        lab.save_checkpoint(model, Path(task["checkpoint"]), kind=task["kind"], size=task["size"], lr=task["lr"],
                            seed=task["seed"])
    loss = final.mean().item()
    print(f"[scratch] {task['size']} {task['kind']} lr {task['lr']:g} seed {task['seed']}: held-out perplexity "
          f"{math.exp(loss):.2f} ({record['seconds']:.0f} s)", flush=True)
    return {**{key: task[key] for key in ("size", "kind", "lr", "seed")}, "held_out_loss": loss,
            "held_out_perplexity": math.exp(loss), "parameters": lab.count(model), "init_scale": init_scale,
            **extra, **record}


# --- the plan --------------------------------------------------------------------------------------------------


def best_lr(runs: dict, size: str, kind: str, lrs: list[float], seed: int) -> float | None:
    """The learning rate of the lowest seed-`seed` held-out loss, once every rate of the sweep has run."""
    losses = {lr: runs.get(run_key(size, kind, lr, seed), {}).get("held_out_loss") for lr in lrs}
    if any(loss is None for loss in losses.values()):
        return None
    return min(losses, key=losses.get)


def size_lrs(settings: dict, size: str) -> list[float]:
    """The learning rates swept at `size`: `--size-lrs` where it names the size, else `--lrs`."""
    return settings["size_lrs"].get(size, settings["lrs"])


def grid(settings: dict) -> list[tuple[str, list[str]]]:
    """(size, kinds) in the order they run: every size's main models, the ablations at their sizes."""
    return [(size, settings["models"] + [kind for kind in settings["ablations"]
                                          if size in settings["ablation_sizes"][kind]]) for size in settings["sizes"]]


def ablation_sizes(parser, entries: list[str], ablations: list[str]) -> dict[str, list[str]]:
    """`--ablation-sizes` as {ablation: [sizes]}: an entry SIZE,SIZE applies to every ablation, KIND=SIZE,SIZE to
    one (the later entry wins)."""
    sizes = {}
    for entry in entries:
        kind, _, listed = entry.rpartition("=")
        if kind and kind not in ablations:
            parser.error(f"--ablation-sizes {entry}: {kind} is not among --ablations ({', '.join(ablations)})")
        try:
            parsed = [str(lab.Shape.parse(size)) for size in listed.split(",")]
        except ValueError as error:
            parser.error(f"--ablation-sizes {entry}: {error}")
        sizes.update({name: parsed for name in ([kind] if kind else ablations)})
    return sizes


def planner(settings: dict, results: lab.Results, base_task: dict, cache: Path):
    def task(size, kind, lr, seed):
        key = run_key(size, kind, lr, seed)
        checkpoint = cache / "checkpoints" / (key.replace("/", "_") + ".pt")
        return key, {**base_task, "size": size, "kind": kind, "lr": lr, "seed": seed, "checkpoint": str(checkpoint)}

    def plan():
        # A size's sweep first, then its seeds for every model whose sweep is complete, then the next size: an
        # interrupted run holds whole sizes.
        pending = []
        first, others = settings["seeds"][0], settings["seeds"][1:]
        for size, kinds in grid(settings):
            lrs = size_lrs(settings, size)
            pending += [task(size, kind, lr, first) for kind in kinds for lr in lrs]
            chosen = {kind: best_lr(results.runs, size, kind, lrs, first) for kind in kinds}
            # seed by seed, so that an interrupted run holds whole seeds
            pending += [task(size, kind, lr, seed) for seed in others for kind, lr in chosen.items() if lr is not None]
        return [(key, job) for key, job in pending if key not in results]

    return plan


# --- the report ------------------------------------------------------------------------------------------------


def summarise(settings: dict, runs: dict) -> dict:
    """Per size and model: the sweep, the chosen rate, the final losses by seed; then the paired comparisons."""
    summary = {}
    for size, kinds in grid(settings):
        models = {}
        for kind in kinds:
            lrs = size_lrs(settings, size)
            sweep = {lr: runs[key]["held_out_loss"] for lr in lrs
                     if (key := run_key(size, kind, lr, settings["seeds"][0])) in runs}
            lr = best_lr(runs, size, kind, lrs, settings["seeds"][0])
            if lr is None:
                models[kind] = {"sweep": sweep}
                continue
            by_seed = {seed: runs[key]["held_out_loss"] for seed in settings["seeds"]
                       if (key := run_key(size, kind, lr, seed)) in runs}
            first = runs[run_key(size, kind, lr, settings["seeds"][0])]
            perplexities = [math.exp(loss) for loss in by_seed.values()]
            models[kind] = {
                "sweep": sweep, "best_lr": lr, "best_lr_at_edge": lr in (min(lrs), max(lrs)),
                "loss_by_seed": by_seed, "perplexity_mean": lab.mean_std(perplexities)[0],
                "perplexity_std": lab.mean_std(perplexities)[1], "loss_mean": statistics.fmean(by_seed.values()),
                "parameters": first["parameters"], "layout": lab.layout(kind,
                                                                        lab.Shape.parse(size)),
                "init_attention_ratio": first["init_scale"]["ratio"],
                "train_tokens_per_s": statistics.fmean(
                    runs[run_key(size, kind, lr, seed)]["train_tokens_per_s"] for seed in by_seed),
            }
        comparisons = {}
        for model, reference in COMPARISONS:
            if "loss_by_seed" in models.get(model, {}) and "loss_by_seed" in models.get(reference, {}):
                comparisons[f"{model} vs {reference}"] = lab.paired(models[model]["loss_by_seed"],
                                                                    models[reference]["loss_by_seed"])
        summary[size] = {"models": models, "comparisons": comparisons}
    return summary


def write_report(results: lab.Results, out: Path) -> None:
    settings, summary = results.data["settings"], summarise(results.data["settings"], results.runs)
    results.put("summary", summary)
    s = settings
    lines = [
        f"From scratch on Python standard-library code: {s['steps']} steps of {s['batch_size']}×{s['block_size']} "
        f"tokens ({s['steps'] * s['batch_size'] * s['block_size']:,} tokens), AdamW, cosine schedule with "
        f"{s['warmup']} warm-up steps; learning rates {', '.join(f'{lr:g}' for lr in s['lrs'])}"
        + "".join(f" ({size}: {', '.join(f'{lr:g}' for lr in lrs)})" for size, lrs in s["size_lrs"].items())
        + f" swept on seed "
        f"{s['seeds'][0]}, then seeds {', '.join(map(str, s['seeds'][1:]))} at each model's best; held-out "
        f"perplexity on {results.data['corpus']['held_out_tokens']:,} tokens of "
        f"{results.data['corpus']['held_out_files']} files never trained on "
        f"({results.data['corpus']['vocab_size']}-token BPE).", "",
    ]
    for size, part in summary.items():
        models = part["models"]
        lines += [f"## {size} (hidden × layers × Llama heads)", "", "Learning-rate sweep, held-out perplexity of seed "
                  f"{s['seeds'][0]}:", ""]
        lines.append(lab.markdown_table(
            ["model"] + [f"lr {lr:g}" for lr in size_lrs(s, size)],
            [[kind] + [f"{math.exp(m['sweep'][lr]):.2f}" if lr in m["sweep"] else "–" for lr in size_lrs(s, size)]
             for kind, m in models.items()]))
        lines += ["", "At each model's best rate:", ""]
        rows = []
        for kind, m in models.items():
            if "loss_by_seed" not in m:
                continue
            edge = " (edge)" if m["best_lr_at_edge"] else ""
            rows.append([kind, m["layout"], f"{m['parameters']['non_embedding']:,}", f"{m['best_lr']:g}{edge}",
                         len(m["loss_by_seed"]), f"{m['perplexity_mean']:.2f} ± {m['perplexity_std']:.2f}",
                         " ".join(f"{r:.1f}" for r in m["init_attention_ratio"]),
                         f"{m['train_tokens_per_s']:,.0f}"])
        lines.append(lab.markdown_table(
            ["model", "heads × map width", "non-embedding parameters", "best lr", "seeds",
             "held-out perplexity (mean ± std)", "attention/embedding RMS at step 0, by layer", "train tokens/s"],
            rows))
        lines += ["", "Paired by seed (same data order), held-out loss difference (nats; negative: the first is better):",
                  ""]
        lines.append(lab.markdown_table(
            ["comparison", "Δ loss (mean ± 95% CI)", "seeds better"],
            [[name, f"{c['mean_difference']:+.4f} ± {c['ci95']:.4f}", f"{c['wins']}/{c['n']}"]
             for name, c in part["comparisons"].items()]))
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    plot(results, summary, out)


def plot(results: lab.Results, summary: dict, out: Path) -> None:
    plt = lab.pyplot()
    settings, runs = results.data["settings"], results.runs
    sizes = list(summary)
    figure, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for column, size in enumerate(sizes):
        train_axis, eval_axis = axes[0][column], axes[1][column]
        for kind, m in summary[size]["models"].items():
            if "loss_by_seed" not in m:
                continue
            chosen = [runs[run_key(size, kind, m["best_lr"], seed)] for seed in m["loss_by_seed"]]
            mean_curve = [statistics.fmean(values) for values in zip(*(r["train_loss_curve"] for r in chosen))]
            line, = train_axis.plot(lab.smooth(mean_curve, max(1, settings["steps"] // 20)), label=kind)
            steps = [step for step, _ in chosen[0]["eval_curve"]]
            per_seed = [[loss for _, loss in r["eval_curve"]] for r in chosen]
            eval_axis.plot(steps, [statistics.fmean(v) for v in zip(*per_seed)], marker="o", color=line.get_color(),
                           label=f"{kind} (lr {m['best_lr']:g})")
            eval_axis.fill_between(steps, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                                   color=line.get_color(), alpha=0.15)
        train_axis.set(title=size, xlabel="step", ylabel="training loss (mean of seeds, moving average)")
        eval_axis.set(xlabel="step", ylabel=f"held-out loss, first {settings['eval_subset']} blocks (band: seeds)")
        for axis in (train_axis, eval_axis):
            axis.set_ylim(top=min(axis.get_ylim()[1], 8.5))  # the first steps sit near ln(vocab) and hide the rest
            axis.legend(fontsize=8)
    figure.suptitle("Llama vs differential attention from scratch on Python code, each at its best learning rate")
    figure.tight_layout()
    figure.savefig(out / "loss_curves.png", dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for axis, size in zip(axes[0], sizes):
        for kind, m in summary[size]["models"].items():
            lrs = sorted(m["sweep"])
            axis.plot(lrs, [math.exp(m["sweep"][lr]) for lr in lrs], marker="o", label=kind)
        axis.set(xscale="log", title=size, xlabel="peak learning rate",
                 ylabel=f"held-out perplexity, seed {settings['seeds'][0]}")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "lr_sweep.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name in ("diff-v1 vs llama", "diff-v2 vs llama-wide", "diff-v2 vs llama"):
        points = [(summary[size]["models"][name.split(" vs ")[1]]["parameters"]["non_embedding"],
                   summary[size]["comparisons"][name]) for size in sizes if name in summary[size]["comparisons"]]
        if points:
            axis.errorbar([p for p, _ in points], [c["mean_difference"] for _, c in points],
                          yerr=[c["ci95"] if math.isfinite(c["ci95"]) else 0 for _, c in points], marker="o",
                          capsize=4, label=name)
    axis.axhline(0, color="grey", lw=0.8)
    axis.set(xscale="log", xlabel="non-embedding parameters (reference model)",
             ylabel="held-out loss difference (nats, paired mean, 95% CI)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "trend.png", dpi=100)
    plt.close(figure)


# --- command line ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", nargs="+", default=["128x4x8", "256x8x16"], help="HIDDENxLAYERSxHEADS")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--ablations", nargs="*", choices=ABLATIONS, default=["diff-v1-gain"])
    parser.add_argument("--ablation-sizes", nargs="*", default=None, metavar="[KIND=]SIZE,SIZE",
                        help="sizes the ablations run at: SIZE,SIZE for every ablation, KIND=SIZE,SIZE for one "
                        "(default: every size)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2])
    parser.add_argument("--size-lrs", nargs="*", default=["256x8x16=3.75e-4,7.5e-4,1.5e-3,3e-3,6e-3"],
                        metavar="SIZE=LR,LR", help="a sweep of its own at a size (default: the larger one spans "
                        "3.75e-4 to 6e-3; it grew from 7.5e-4..3e-3 at each end while some model's best sat there)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the first one sweeps")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-blocks", type=int, default=400,
                        help="held-out blocks of block-size tokens; fewer would come from a handful of files")
    parser.add_argument("--eval-subset", type=int, default=100, help="blocks of the intermediate evaluations")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--tokenizer-chars", type=int, default=8_000_000, help="training text the BPE learns from")
    parser.add_argument("--data", type=Path, default=None, help="folder of .py files; default: the standard library")
    lab.add_common_arguments(parser, out=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.lrs, args.seeds, args.steps, args.warmup = ["64x2x4"], [1e-3, 3e-3], [0, 1], 6, 2
        args.eval_every, args.eval_blocks, args.eval_subset, args.vocab_size = 3, 4, 2, 512
        args.tokenizer_chars, args.ablations, args.size_lrs = 200_000, ["diff-v1-gain"], []
    args.sizes = [str(lab.Shape.parse(size)) for size in args.sizes]
    args.ablation_sizes = ablation_sizes(parser, args.ablation_sizes or [",".join(args.sizes)], args.ablations)
    try:
        args.size_lrs = {str(lab.Shape.parse(size)): [float(lr) for lr in lrs.split(",")]
                         for size, lrs in (entry.split("=") for entry in args.size_lrs)}
    except ValueError:
        parser.error(f"--size-lrs {' '.join(args.size_lrs)}: give SIZE=LR,LR entries, e.g. 256x8x16=1e-3,2e-3")
    if not {"llama", "llama-wide"} <= set(args.models):
        parser.error("--models must include llama and llama-wide: the differential models are reported against them")
    out = lab.setup(args, out=OUT)

    settings = {name: getattr(args, name) for name in (
        "sizes", "models", "ablations", "ablation_sizes", "lrs", "size_lrs", "seeds", "steps", "warmup", "batch_size",
        "block_size", "eval_every", "eval_blocks", "eval_subset", "vocab_size", "tokenizer_chars", "device", "quick")}
    settings["data"] = "stdlib" if args.data is None else str(args.data)
    results = lab.Results(out / "results.json", settings, fresh=args.fresh,
                          selects=("sizes", "models", "ablations", "ablation_sizes", "seeds", "lrs", "size_lrs"))

    started = time.perf_counter()
    corpus = lab.code_corpus(vocab_size=args.vocab_size, block_size=args.block_size,
                             train_tokens=args.steps * args.batch_size * args.block_size,
                             eval_tokens=args.eval_blocks * args.block_size, tokenizer_chars=args.tokenizer_chars,
                             data=args.data)
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    corpus_file = cache / "corpus.pt"
    torch.save({"train": corpus.train, "held_out": corpus.held_out, "vocab_size": corpus.info["vocab_size"]},
               corpus_file)
    results.put("corpus", corpus.info)
    results.put("environment", lab.environment())
    print(f"[scratch] {corpus.info} ({time.perf_counter() - started:.0f} s)", flush=True)

    base_task = {name: getattr(args, name) for name in (
        "steps", "warmup", "batch_size", "block_size", "eval_every", "eval_subset", "device")}
    base_task["corpus"] = str(corpus_file)
    lab.execute(planner(settings, results, base_task, cache), run, results, jobs=args.jobs, threads=args.threads,
                name="scratch", after=lambda: write_report(results, out))
    write_report(results, out)
    print(f"[scratch] wrote {out} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
