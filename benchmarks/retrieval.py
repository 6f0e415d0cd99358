"""Retrieval among distractors, trained from scratch: Llama against differential attention at equal parameters.

The paper's key-information retrieval and multi-needle claims, at a size this machine trains. A sequence is

    BOS  <context of `length` tokens>  ? k1 k2 k3 v1 v2 ;  ? ...

The context is random filler holding 1 + D records `k1 k2 k3 v1 v2 ;` at random places. Keys are three symbols
of 16, values two of 16 (256 values, chance 1/256; the two alphabets are disjoint, so no marker separates them).
The keys all share a prefix (one or two symbols, drawn per key) with one root key, so every record has D
distractors that agree with it on at least its first symbol. The queries (up to eight, each a different record)
ask for values; only the query's two value tokens are scored, and a query is correct when both are the argmax. A
wrong answer that is another record's value counts as a distractor error.

Training samples a length from `--lengths` per batch and the distractor count per sequence from `--distractors`
(at least one: with a lone record, copying the only value in sight answers without reading the key; as many as
fit in 60% of the context); evaluation is a fixed set per (length, distractors) cell, the same for every model,
with no distractor as one of its cells. Models: `llama` and `diff-v1` (the paper's parameter matching),
`llama-wide` and `diff-v2` (the Llama with 5/4-wide heads against version 2), see `lab.KINDS`; `--lrs` is swept
on the first seed and the other seeds run at each model's best (the default is a single rate for every model).

Sized by pilot runs of the Llama on this machine: at hidden 64 the models stayed at picking a random record's value
(accuracy 1/(D+1)) for 2,000 steps; at hidden 128 and 2 layers the key lookup starts within 1,000 steps, which
leaves accuracies between chance and perfect that can move with the distractors and the model.

    python benchmarks/retrieval.py               # the committed results (about 4 hours on one shared core)
    python benchmarks/retrieval.py --quick       # a smoke run
    python benchmarks/retrieval.py --device cuda --size 256x8x16 --lengths 256 512 1024 2048 --steps 20000

Writes `results.json` (after every run; a rerun resumes), `results.md` and `accuracy.png` to `--out`; checkpoints
of every run to `cache/` (not committed), which `probes.py` reads.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lab

OUT = lab.ROOT / "benchmarks" / "results" / "retrieval"
MODELS = ("llama", "llama-wide", "diff-v1", "diff-v2")
CONTROLS = ("diff-v1-onemap", "llama-v2scale")  # of lab.CONTROLS: the same models without the difference's cause
COMPARISONS = (("diff-v1", "llama"), ("diff-v2", "llama-wide"), ("diff-v2", "llama"), ("llama-wide", "llama"),
               ("diff-v1", "diff-v1-onemap"), ("diff-v2", "llama-v2scale"), ("llama-v2scale", "llama"))

# The vocabulary: three markers (and a spare), 16 key symbols, 16 value symbols, 64 filler tokens.
BOS, END, QUERY = 0, 1, 2
KEY_SYMBOLS, VALUE_SYMBOLS, FILLER = range(4, 20), range(20, 36), range(36, 100)
VOCAB_SIZE = 128  # 100 used, rounded up
KEY_LENGTH, VALUE_LENGTH = 3, 2
RECORD = KEY_LENGTH + VALUE_LENGTH + 1  # k1 k2 k3 v1 v2 ;
MAX_QUERIES = 8
RECORD_SHARE = 0.6  # records fill at most this much of the context


def max_distractors(length: int) -> int:
    return int(length * RECORD_SHARE) // RECORD - 1


@dataclass
class Example:
    """One sequence and where things are in it (token positions)."""

    tokens: list[int]
    records: list[tuple[int, list[int], list[int]]]  # (start, key, value) of every record, in context order
    queries: list[tuple[int, int]] = field(default_factory=list)  # (position of the query's k3, record index)


def make_example(rng: random.Random, length: int, distractors: int, queries: int = MAX_QUERIES) -> Example:
    """BOS, `length` context tokens with 1 + `distractors` records, then up to `queries` queries of distinct
    records."""
    if distractors > max_distractors(length):
        raise ValueError(f"{distractors} distractors do not fit in a context of {length} tokens "
                         f"(at most {max_distractors(length)})")
    root = [rng.choice(KEY_SYMBOLS) for _ in range(KEY_LENGTH)]
    keys = [root]
    while len(keys) < distractors + 1:
        shared = rng.choice((1, 2))  # prefix shared with the first key
        key = root[:shared] + [rng.choice(KEY_SYMBOLS) for _ in range(KEY_LENGTH - shared)]
        if key not in keys:
            keys.append(key)
    rng.shuffle(keys)
    values = [[rng.choice(VALUE_SYMBOLS) for _ in range(VALUE_LENGTH)] for _ in keys]
    # Record starts: choose the filler tokens before each record (a uniform random placement of the records).
    filler = length - RECORD * len(keys)
    cuts = sorted(rng.randint(0, filler) for _ in keys)
    tokens, records, previous = [BOS], [], 0
    for cut, key, value in zip(cuts, keys, values):
        tokens += [rng.choice(FILLER) for _ in range(cut - previous)]
        records.append((len(tokens), key, value))
        tokens += key + value + [END]
        previous = cut
    tokens += [rng.choice(FILLER) for _ in range(filler - previous)]
    example = Example(tokens, records)
    for index in rng.sample(range(len(keys)), min(queries, len(keys))):
        example.tokens += [QUERY] + records[index][1]
        example.queries.append((len(example.tokens) - 1, index))
        example.tokens += records[index][2] + [END]
    return example


def collate(examples: list[Example]) -> dict:
    """Inputs padded at the end with filler (causal: nothing before it changes), labels on the answers only."""
    width = max(len(example.tokens) for example in examples)
    ids = torch.full((len(examples), width), FILLER[0], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for row, example in enumerate(examples):
        ids[row, : len(example.tokens)] = torch.tensor(example.tokens)
        for position, _ in example.queries:
            span = slice(position + 1, position + 1 + VALUE_LENGTH)
            labels[row, span] = ids[row, span]
    return {"input_ids": ids, "labels": labels}


def training_batches(*, seed: int, batch_size: int, lengths: list[int], distractors: list[int],
                     queries: int = MAX_QUERIES):
    rng = random.Random(seed)

    def batch(step: int) -> dict:
        length = rng.choice(lengths)
        fits = [d for d in distractors if d <= max_distractors(length)]
        return collate([make_example(rng, length, rng.choice(fits), queries) for _ in range(batch_size)])

    return batch


def eval_cells(lengths: list[int], distractors: list[int]) -> list[tuple[int, int]]:
    return [(length, d) for length in lengths for d in distractors if d <= max_distractors(length)]


def eval_set(cells: list[tuple[int, int]], per_cell: int, queries: int = MAX_QUERIES, seed: int = 12345) -> dict:
    """The fixed evaluation examples of each cell (independent of the run's seed)."""
    return {cell: [make_example(random.Random(f"{seed}/{cell}/{i}"), *cell, queries) for i in range(per_cell)]
            for cell in cells}


@torch.no_grad()
def score(model, examples: list[Example], batch_size: int = 32) -> dict:
    """Accuracy (both value tokens the argmax), and the share of queries answered with another record's value."""
    device = next(model.parameters()).device
    correct = distracted = total = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        logits = model(input_ids=collate(chunk)["input_ids"].to(device)).logits
        for row, example in enumerate(chunk):
            for position, index in example.queries:
                # the logits at the query's last key symbol and at v1 predict v1 and v2
                answer = logits[row, position : position + VALUE_LENGTH].argmax(-1).tolist()
                correct += answer == example.records[index][2]
                distracted += answer != example.records[index][2] and any(
                    answer == value for i, (_, _, value) in enumerate(example.records) if i != index)
                total += 1
    return {"accuracy": correct / total, "distractor_errors": distracted / total, "queries": total}


def run_key(kind: str, lr: float, seed: int) -> str:
    return f"{kind}/lr{lr:g}/seed{seed}"


def run(task: dict) -> dict:
    shape = lab.Shape.parse(task["size"])

    def config_for(kind, **overrides):
        return lab.model_config(kind, shape, vocab_size=VOCAB_SIZE, max_positions=task["max_positions"], **overrides)

    cells = eval_cells(task["eval_lengths"] or task["lengths"], task["eval_distractors"])
    examples = eval_set(cells, task["eval_examples"], task["queries"])
    probe = [example for cell in cells for example in examples[cell][: task["probe_examples"]]]
    stream = dict(seed=task["seed"], batch_size=task["batch_size"], lengths=task["lengths"],
                  distractors=task["distractors"], queries=task["queries"])
    first = training_batches(**stream)(1)["input_ids"].to(task["device"])  # a stream of its own: the same first batch
    if task.get("start"):  # --extend: the model the shorter experiment trained, trained on from here
        model, _ = lab.load_checkpoint(Path(task["start"]), device=task["device"])
        model.train()
    else:
        model, _ = lab.build_kind(task["kind"], config_for, first, seed=task["seed"], device=task["device"])
    batches = training_batches(**stream)
    record = lab.train(model, batches, steps=task["steps"], lr=task["lr"], warmup=task["warmup"],
                       evaluate=lambda m: score(m, probe)["accuracy"],
                       eval_steps=range(task["eval_every"], task["steps"] + 1, task["eval_every"]))
    grid = {f"{length}/{d}": score(model, examples[(length, d)]) for length, d in cells}
    accuracy = statistics.fmean(cell["accuracy"] for cell in grid.values())
    if task.get("checkpoint"):
        lab.save_checkpoint(model, Path(task["checkpoint"]), kind=task["kind"], lr=task["lr"], seed=task["seed"])
    print(f"[retrieval] {task['kind']} lr {task['lr']:g} seed {task['seed']}: accuracy {accuracy:.3f} "
          f"({record['seconds']:.0f} s)", flush=True)
    return {**{key: task[key] for key in ("kind", "lr", "seed")}, "accuracy": accuracy, "grid": grid,
            "parameters": lab.count(model), **record}


def planner(settings: dict, results: lab.Results, base_task: dict, cache: Path):
    def task(kind, lr, seed):
        key = run_key(kind, lr, seed)
        start = str(checkpoint_file(Path(settings["lr_from_file"]).parent, key)) if settings["extend"] else None
        return key, {**base_task, "kind": kind, "lr": lr, "seed": seed, "start": start,
                     "checkpoint": str(checkpoint_file(cache.parent, key))}

    def plan():
        first = settings["seeds"][0]
        pending = [task(kind, lr, first) for kind in settings["models"] for lr in sweep(settings, results.runs, kind)]
        chosen = {kind: best_lr(results.runs, kind, sweep(settings, results.runs, kind), first)
                  for kind in settings["models"]}
        if None not in chosen.values():  # until every sweep is done the grid may still grow, and a best rate move
            pending += [task(kind, lr, seed) for seed in settings["seeds"][1:] for kind, lr in chosen.items()]
        return [(key, job) for key, job in pending if key not in results]

    return plan


def checkpoint_file(out: Path, key: str) -> Path:
    """Where the experiment writing to `out` keeps the model of run `key`."""
    return out / "cache" / "checkpoints" / (key.replace("/", "_") + ".pt")


def lr_grid(settings: dict, runs: dict) -> list[float]:
    """The rates every model is swept over on the first seed: `--lrs`, grown by a factor of 2 at an end, for every
    model alike, while some model's best rate sits at that end (at most `--grow` times an end)."""
    grid, first = sorted(settings["lrs"]), settings["seeds"][0]
    swept = [kind for kind in settings["models"] if kind not in settings["lr_from"]]
    if len(grid) < 2 or not swept:  # one rate is a choice, not a sweep
        return grid
    grown = {"low": 0, "high": 0}
    while True:
        best = [best_lr(runs, kind, grid, first) for kind in swept]
        if None in best:
            return grid
        if min(best) == grid[0] and grown["low"] < settings["grow"]:
            grown["low"] += 1
            grid.insert(0, grid[0] / 2)
        elif max(best) == grid[-1] and grown["high"] < settings["grow"]:
            grown["high"] += 1
            grid.append(grid[-1] * 2)
        else:
            return grid


def sweep(settings: dict, runs: dict, kind: str) -> list[float]:
    """`kind`'s rates on the first seed: the grid, or the one rate `--lr-from` chose for it."""
    return [settings["lr_from"][kind]] if kind in settings["lr_from"] else lr_grid(settings, runs)


def best_lr(runs: dict, kind: str, lrs: list[float], seed: int) -> float | None:
    """The rate of the highest mean accuracy on the first seed (ties: the lower final training loss)."""
    chosen = [runs.get(run_key(kind, lr, seed)) for lr in lrs]
    if any(run is None for run in chosen):
        return None
    scores = {lr: (run["accuracy"], -statistics.fmean(run["train_loss_curve"][-50:])) for lr, run in zip(lrs, chosen)}
    return max(scores, key=scores.get)


def summarise(settings: dict, runs: dict) -> dict:
    models, first = {}, settings["seeds"][0]
    for kind in settings["models"]:
        rates = sweep(settings, runs, kind)
        swept = {lr: runs[key]["accuracy"] for lr in rates if (key := run_key(kind, lr, first)) in runs}
        lr = best_lr(runs, kind, rates, first)
        if lr is None:
            models[kind] = {"sweep": swept}
            continue
        chosen = {seed: runs[key] for seed in settings["seeds"] if (key := run_key(kind, lr, seed)) in runs}
        by_cell = {cell: {seed: run["grid"][cell]["accuracy"] for seed, run in chosen.items()}
                   for cell in next(iter(chosen.values()))["grid"]}
        accuracy_mean, accuracy_std = lab.mean_std([r["accuracy"] for r in chosen.values()])
        models[kind] = {
            "sweep": swept, "best_lr": lr, "accuracy_by_seed": {s: r["accuracy"] for s, r in chosen.items()},
            "accuracy_mean": accuracy_mean, "accuracy_std": accuracy_std,
            "distractor_errors_mean": statistics.fmean(
                statistics.fmean(cell["distractor_errors"] for cell in r["grid"].values()) for r in chosen.values()),
            "cells": {cell: dict(zip(("mean", "std"), lab.mean_std(list(by_seed.values()))), by_seed=by_seed)
                      for cell, by_seed in by_cell.items()},
            "parameters": next(iter(chosen.values()))["parameters"],
        }
    comparisons = {}
    for model, reference in COMPARISONS:
        if "accuracy_by_seed" in models.get(model, {}) and "accuracy_by_seed" in models.get(reference, {}):
            # paired on error rates (lower is better), so "wins" counts seeds where the model is more accurate
            errors = {kind: {seed: 1 - a for seed, a in models[kind]["accuracy_by_seed"].items()}
                      for kind in (model, reference)}
            comparisons[f"{model} vs {reference}"] = lab.paired(errors[model], errors[reference])
    return {"lr_grid": lr_grid(settings, runs), "models": models, "comparisons": comparisons}


def write_report(results: lab.Results, out: Path) -> None:
    settings = results.data["settings"]
    summary = summarise(settings, results.runs)
    results.put("summary", summary)
    s, grid = settings, summary["lr_grid"]
    rates = (f"learning rates {', '.join(f'{lr:g}' for lr in grid)} swept on seed {s['seeds'][0]}, seeds "
             f"{', '.join(map(str, s['seeds'][1:]))} at each model's best" if not s["lr_from"] else
             f"each model at the best rate of {s['lr_from_file']} "
             f"({', '.join(f'{k} {v:g}' for k, v in s['lr_from'].items())})")
    lines = [
        f"Retrieval among distractors, "
        f"{'each model trained on from its run in ' + s['lr_from_file'] if s['extend'] else 'from scratch'}: "
        f"{s['size']} (hidden × layers × Llama heads), {s['steps']} steps "
        f"of {s['batch_size']} sequences, context lengths {', '.join(map(str, s['lengths']))}"
        f"{' (evaluated at ' + ', '.join(map(str, s['eval_lengths'])) + ')' if s['eval_lengths'] else ''}, "
        f"{', '.join(map(str, s['distractors']))} distractors sharing a key prefix; {rates}; seeds "
        f"{', '.join(map(str, s['seeds']))}; {s['eval_examples']} fixed evaluation sequences per cell (up to "
        f"{s['queries']} queries each), accuracy = both value tokens right.", "",
        lab.markdown_table(
            ["model", "non-embedding parameters", f"accuracy by lr (seed {s['seeds'][0]})", "best lr", "seeds",
             "accuracy (mean ± std over seeds, all cells)", "accuracy by seed",
             "answers that are a distractor's value"],
            [[kind, f"{m['parameters']['non_embedding']:,}" if "parameters" in m else "–",
              " / ".join(f"{m['sweep'][lr]:.3f}" if lr in m["sweep"] else "–"
                         for lr in (grid if kind not in s["lr_from"] else [s["lr_from"][kind]])),
              f"{m['best_lr']:g}" if "best_lr" in m else "–", len(m.get("accuracy_by_seed", {})),
              f"{m['accuracy_mean']:.3f} ± {m['accuracy_std']:.3f}" if "best_lr" in m else "–",
              " / ".join(f"{a:.2f}" for a in m.get("accuracy_by_seed", {}).values()) or "–",
              f"{m['distractor_errors_mean']:.3f}" if "best_lr" in m else "–"]
             for kind, m in summary["models"].items()]), "",
        "Accuracy by cell (context length / distractors), mean ± std over seeds:", "",
    ]
    done = {kind: m for kind, m in summary["models"].items() if "cells" in m}
    if done:
        cells = list(next(iter(done.values()))["cells"])
        lines.append(lab.markdown_table(
            ["length / distractors"] + list(done),
            [[cell] + [f"{m['cells'][cell]['mean']:.3f} ± {m['cells'][cell]['std']:.3f}" for m in done.values()]
             for cell in cells]))
    lines += ["", "Paired by seed, error-rate difference (negative: the first model is more accurate):", "",
              lab.markdown_table(["comparison", "Δ error (mean ± 95% CI)", "seeds more accurate"],
                                 [[name, f"{c['mean_difference']:+.3f} ± {c['ci95']:.3f}", f"{c['wins']}/{c['n']}"]
                                  for name, c in summary["comparisons"].items()]), ""]
    lines += superseded_notes(results)
    (out / "results.md").write_text("\n".join(lines))
    plot(summary, settings, out)


def superseded_notes(results: lab.Results) -> list[str]:
    """Runs trained again, each with its first accuracy, the new one and why (results.json's `superseded`)."""
    superseded = results.data.get("superseded", {})
    if not superseded:
        return []
    lines = ["Runs trained again, their first record kept under `superseded` in results.json:", ""]
    for key, first in superseded.items():
        again = f"trained again: {results.runs[key]['accuracy']:.3f}" if key in results.runs else "not trained again"
        lines.append(f"- {key}: {first['accuracy']:.3f} at first, {again} ({first['reason']})")
    return lines + [""]


def plot(summary: dict, settings: dict, out: Path) -> None:
    """Accuracy against context length and against distractors: each model's mean over seeds as a line, each seed
    as a faint dot (the seeds of a model can split into groups that a mean and a spread would hide)."""
    plt = lab.pyplot()
    done = {kind: m for kind, m in summary["models"].items() if "cells" in m}
    figure, (by_length, by_distractors) = plt.subplots(1, 2, figsize=(12, 4.2))

    def draw(axis, xs: list[int], values: list[dict], label: str, color=None):
        line, = axis.plot(xs, [value["mean"] for value in values], marker="o", color=color, label=label)
        for x, value in zip(xs, values):
            seeds = list(value["by_seed"].values())
            axis.scatter([x] * len(seeds), seeds, s=14, alpha=0.35, color=line.get_color(), linewidths=0)
        return line

    for kind, m in done.items():
        cells = {tuple(map(int, cell.split("/"))): value for cell, value in m["cells"].items()}
        lengths = sorted({length for length, _ in cells})
        # the most distractors that every context length holds, so the line spans the lengths
        top = max(d for d in {d for _, d in cells} if all((length, d) in cells for length in lengths))
        line = draw(by_length, lengths, [cells[(length, top)] for length in lengths], f"{kind}, {top} distractors")
        longest = max(length for length, _ in cells)
        counts = sorted(d for length, d in cells if length == longest)
        draw(by_distractors, counts, [cells[(longest, d)] for d in counts], f"{kind}, length {longest}",
             line.get_color())
    by_length.set(xscale="log", xlabel="context length (tokens)", ylabel="accuracy (mean of seeds; dots: seeds)",
                  ylim=(0, 1.02))
    by_distractors.set(xlabel="distractor records", ylabel="accuracy (mean of seeds; dots: seeds)", ylim=(0, 1.02))
    for axis in (by_length, by_distractors):
        axis.legend(fontsize=8)
    how = "trained on from shorter contexts" if settings.get("extend") else "from scratch"
    figure.suptitle(f"Retrieval among distractors, {how} ({settings['size']})")
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=100)
    plt.close(figure)


def rates_from(parser, path: Path | None, models: list[str]) -> dict[str, float]:
    """{model: best rate} of another run of this experiment (`--lr-from`), for every model of this one."""
    if path is None:
        return {}
    try:
        chosen = json.loads(path.read_text())["summary"]["models"]
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--lr-from {path}: not a retrieval results.json with a summary ({error})")
    missing = [kind for kind in models if "best_lr" not in chosen.get(kind, {})]
    if missing:
        parser.error(f"--lr-from {path}: no best rate for {', '.join(missing)} (its sweep has not finished for "
                     "them); run it first, or leave them out of --models")
    return {kind: chosen[kind]["best_lr"] for kind in models}


def check_extension(parser, args) -> None:
    """--extend's starting models exist: every model and seed at its best rate, trained by the --lr-from run."""
    if args.lr_from_file is None:
        parser.error("--extend trains on from another run's models: name its results.json with --lr-from")
    controls = [kind for kind in args.models if kind in CONTROLS]
    if controls:
        parser.error(f"--extend: the controls ({', '.join(controls)}) are built at step 0, not loaded; leave them out")
    folder = Path(args.lr_from_file).parent
    missing = [str(path) for kind in args.models for seed in args.seeds
               if not (path := checkpoint_file(folder, run_key(kind, args.lr_from[kind], seed))).is_file()]
    if missing:
        parser.error(f"--extend: {len(missing)} starting models are missing ({', '.join(missing[:3])}"
                     f"{', ...' if len(missing) > 3 else ''}): run those seeds of {args.lr_from_file} first (a run "
                     "recorded there without its model: train it again with the same settings and `--out` another "
                     "folder, then copy its cache/checkpoints/ file across)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--size", default="128x2x8", help="HIDDENxLAYERSxHEADS")
    parser.add_argument("--models", nargs="+", choices=MODELS + CONTROLS, default=list(MODELS + CONTROLS),
                        help=f"models to train (the controls {', '.join(CONTROLS)} are lab.CONTROLS)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3],
                        help="swept on the first seed for every model; one rate is used as it is")
    parser.add_argument("--grow", type=int, default=2,
                        help="times the sweep may grow by 2x at each end, for every model, while a best rate sits "
                             "at that end")
    parser.add_argument("--lr-from", type=Path, default=None, metavar="RESULTS_JSON",
                        help="no sweep: each model at its best rate in another retrieval results.json")
    parser.add_argument("--extend", action="store_true",
                        help="with --lr-from: train on from that experiment's model of the same kind and seed (its "
                             "checkpoint at its best rate) instead of from scratch, as a context extension")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the first one sweeps")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128], help="context lengths (tokens)")
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=None,
                        help="context lengths of the evaluation cells (default: the training lengths)")
    parser.add_argument("--distractors", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="distractor counts training draws from")
    parser.add_argument("--eval-distractors", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--queries", type=int, default=MAX_QUERIES,
                        help="records queried per sequence (at most; each a different record)")
    parser.add_argument("--eval-examples", type=int, default=200, help="fixed sequences per evaluation cell")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--probe-examples", type=int, default=20, help="per cell, for the curve during training")
    lab.add_common_arguments(parser, out=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.lrs, args.seeds = "64x2x4", [1e-3, 3e-3], [0, 1]
        args.steps, args.warmup, args.eval_every = 4, 1, 2
        args.lengths, args.distractors, args.eval_distractors = [32, 64], [1, 2], [0, 2]
        args.eval_examples, args.probe_examples, args.batch_size, args.grow = 8, 2, 4, 0
    args.size = str(lab.Shape.parse(args.size))
    args.lr_from_file, args.lr_from = args.lr_from and str(args.lr_from), rates_from(parser, args.lr_from, args.models)
    if args.extend:
        check_extension(parser, args)
    out = lab.setup(args, out=OUT)
    settings = {name: getattr(args, name) for name in (
        "size", "models", "lrs", "seeds", "steps", "warmup", "batch_size", "lengths", "eval_lengths", "distractors",
        "eval_distractors", "queries", "eval_examples", "eval_every", "probe_examples", "device", "quick", "grow",
        "lr_from", "lr_from_file", "extend")}
    results = lab.Results(out / "results.json", settings, fresh=args.fresh,
                          selects=("models", "seeds", "lrs", "grow", "lr_from_file"))
    results.put("environment", lab.environment())
    longest = max(args.lengths + (args.eval_lengths or [])) + 1 + args.queries * (RECORD + 1)
    base_task = {name: getattr(args, name) for name in (
        "size", "steps", "warmup", "batch_size", "lengths", "eval_lengths", "distractors", "eval_distractors",
        "queries", "eval_examples", "eval_every", "probe_examples", "device")}
    base_task["max_positions"] = longest
    started = time.perf_counter()
    lab.execute(planner(settings, results, base_task, out / "cache"), run, results, jobs=args.jobs,
                threads=args.threads, name="retrieval",
                after=lambda: write_report(results, out))
    write_report(results, out)
    print(f"[retrieval] wrote {out} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
