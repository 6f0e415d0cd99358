"""Probes of the trained models: attention allocation, activation outliers, weight quantisation.

Reads the checkpoints that `scratch.py` (language models on code) and `retrieval.py` (retrieval among
distractors) leave in their `cache/` folders: every seed of each model at its chosen learning rate.

- Attention noise (retrieval models): at the position that predicts a query's answer, the share of each layer's
  attention mass (mean over heads and examples) on the queried record, on the distractor records and on the rest
  (filler, markers, earlier queries), from the eager `output_attentions` maps; for differential models those
  are the maps A1 − λ·A2, whose rows sum to 1 − λ, so shares are of the row's sum (they can be negative). Also
  a picture of one example's maps for each model (`attention_maps.png`).
- Activation outliers (all models): the largest pre-softmax attention logits q·k/√d (queries and keys after
  rotary, computed by a hook from the layer's own projections, every map of every head) and their median |logit|;
  the largest hidden-state entries (every layer's output) and their median |value|; top-1/2/3 as the paper's table.
- Quantisation (all models): weight-only round-to-nearest, symmetric, of every linear layer in the decoder blocks
  (embedding and tied head in full precision; norms and λ vectors untouched), per output channel and per group
  of 32 input weights, at 8, 6, 4, 3 and 2 bits; held-out loss (language models) and retrieval accuracy lost.
  `--quantizer torchao` uses torchao's `IntxWeightOnlyConfig` instead on the same layers (`pip install -e
  ".[quant]"`; it runs on CPU with torch 2.13): its symmetric grid uses the full signed range, −2^(b−1) to
  2^(b−1) − 1 (4 levels at 2 bits against our 3), so it loses less at the lowest widths.

    python benchmarks/probes.py        # the committed results, after scratch.py and retrieval.py
    python benchmarks/probes.py --quick --scratch-out DIR --retrieval-out DIR

Writes `results.json` (after every model; a rerun resumes), `results.md`, `attention_maps.png` and
`quantization.png` to `--out` (default `benchmarks/results/probes`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import lab
import retrieval

OUT = lab.ROOT / "benchmarks" / "results" / "probes"
BITS = (8, 6, 4, 3, 2)  # down to ternary: at this scale 4 bits cost the models almost nothing
GROUP_SIZE = 32


# --- attention logits and hidden states ------------------------------------------------------------------------


class LogitProbe:
    """Records every layer's pre-softmax attention logits during a forward pass, without touching the model code:
    a pre-hook on each attention module recomputes its queries and keys from its own projections and rotary
    embedding (as its forward does) and forms q·k/√d for every map of every head over the causal positions.

    After the forward, `logits[layer]` is (B, maps, T, S) with -inf above the diagonal; maps are the query maps
    in the model's order (Llama: its heads; differential: 2 per head, map 2i+s of head i).
    """

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.hooks = [layer.self_attn.register_forward_pre_hook(self._hook, with_kwargs=True)
                      for layer in model.model.layers]

    def _hook(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        batch, length, _ = hidden.shape
        d = module.head_dim
        query = module.q_proj(hidden).view(batch, length, -1, d)  # (B, T, query maps, d)
        key = module.k_proj(hidden).view(batch, length, -1, d)  # (B, T, key maps, d)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)
        maps, key_maps = query.shape[2], key.shape[2]
        if getattr(module, "version", None) == 1:
            # map s of differential head i reads key map s of its KV head g: key index 2g + s
            heads, groups = maps // 2, maps // 2 // (key_maps // 2)
            index = torch.tensor([2 * (i // groups) + s for i in range(heads) for s in range(2)])
        else:  # Llama heads and version 2's query maps read their group's one key
            index = torch.arange(maps) // (maps // key_maps)
        key = key[:, :, index]  # (B, T, maps, d)
        logits = torch.einsum("bqmd,bkmd->bmqk", query.float(), key.float()) * module.scaling
        future = torch.ones(length, length, dtype=torch.bool, device=logits.device).triu(1)
        self.logits.append(logits.masked_fill(future, -math.inf))

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def top_values(values: torch.Tensor, k: int = 3) -> list[float]:
    return values.flatten().topk(k).values.tolist()


@torch.no_grad()
def outliers(model, input_ids: torch.Tensor) -> dict:
    """Top-3 and median of the attention logits (causal entries) and of |hidden states| (every layer's output)."""
    probe = LogitProbe(model)
    try:
        output = model(input_ids=input_ids, output_hidden_states=True)
    finally:
        probe.remove()
    logits = torch.cat([layer[torch.isfinite(layer)] for layer in probe.logits])
    hidden = torch.cat([state.abs().flatten() for state in output.hidden_states[1:]])
    per_layer = [layer[torch.isfinite(layer)].max().item() for layer in probe.logits]
    result = {
        "logit_top": top_values(logits), "logit_median_abs": logits.abs().median().item(),
        "logit_max_by_layer": per_layer,
        "hidden_top": top_values(hidden), "hidden_median_abs": hidden.median().item(),
    }
    result["logit_ratio"] = result["logit_top"][0] / result["logit_median_abs"]
    result["hidden_ratio"] = result["hidden_top"][0] / result["hidden_median_abs"]
    return result


# --- attention allocation --------------------------------------------------------------------------------------


def regions(example: retrieval.Example, query: int) -> torch.Tensor:
    """Per context position up to the query's last key symbol: 0 the queried record, 1 a distractor record,
    2 the rest."""
    position, index = example.queries[query]
    label = torch.full((position + 1,), 2)
    for i, (start, _, _) in enumerate(example.records):
        label[start : start + retrieval.RECORD] = 0 if i == index else 1
    return label


@torch.no_grad()
def allocation(model, examples: list[retrieval.Example]) -> dict:
    """Each layer's attention shares (queried record, distractors, rest) at the first query's last key symbol, mean
    over heads and examples; and the largest share on the queried record of any single head."""
    shares, best_head = [], []
    for example in examples:
        position, _ = example.queries[0]
        ids = torch.tensor([example.tokens[: position + 1]], device=next(model.parameters()).device)
        maps = model(input_ids=ids, output_attentions=True).attentions  # per layer (1, heads, T, T)
        label = regions(example, 0).to(ids.device)
        per_layer, heads = [], []
        for layer in maps:
            row = layer[0, :, position].float()  # (heads, T)
            total = row.sum(-1, keepdim=True)
            part = torch.stack([row[:, label == r].sum(-1) for r in range(3)], -1) / total  # (heads, 3)
            per_layer.append(part.mean(0).tolist())
            heads.append(part[:, 0].max().item())
        shares.append(per_layer)
        best_head.append(max(heads))
    mean = torch.tensor(shares).mean(0)  # (layers, 3)
    return {"by_layer": mean.tolist(), "best_head_record_share": statistics.fmean(best_head),
            "all_layers": mean.mean(0).tolist()}


def plot_maps(models: dict, example: retrieval.Example, out: Path) -> None:
    """One example, one panel a model: each layer's attention row (mean over heads) at the first query's last key
    symbol."""
    plt = lab.pyplot()
    position, index = example.queries[0]
    label = regions(example, 0)
    figure, axes = plt.subplots(len(models), 1, figsize=(12, 2.0 * len(models)), squeeze=False)
    for axis, (name, model) in zip(axes[:, 0], models.items()):
        ids = torch.tensor([example.tokens[: position + 1]], device=next(model.parameters()).device)
        with torch.no_grad():
            maps = model(input_ids=ids, output_attentions=True).attentions
        rows = torch.stack([layer[0, :, position].float().mean(0) for layer in maps]).cpu()  # (layers, T)
        limit = rows.abs().max().item()
        image = axis.imshow(rows, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        for start in torch.nonzero(label[1:] != label[:-1]).flatten().tolist():
            axis.axvline(start + 0.5, color="grey", lw=0.3)
        for i, (start, _, _) in enumerate(example.records):
            axis.axvspan(start - 0.5, start + retrieval.RECORD - 0.5, ymin=0.97, ymax=1.0,
                         color="green" if i == index else "orange", clip_on=False)
        axis.set(ylabel=f"{name}\nlayer", yticks=range(len(maps)))
        figure.colorbar(image, ax=axis, pad=0.01)
    axes[-1, 0].set_xlabel("context position (bar on top: green the queried record, orange distractors)")
    figure.suptitle("Attention of the answer-predicting position, mean over heads (differential: A1 − λ·A2)")
    figure.tight_layout()
    figure.savefig(out / "attention_maps.png", dpi=100)
    plt.close(figure)


# --- quantisation ----------------------------------------------------------------------------------------------


def decoder_linears(model):
    return [(name, module) for name, module in model.model.layers.named_modules()
            if isinstance(module, torch.nn.Linear)]


@torch.no_grad()
def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric round-to-nearest of a (out, in) weight, one scale per output row or per `group_size` inputs:
    q = clamp(round(w / s), −(2^(b−1) − 1), 2^(b−1) − 1), s = max|w| / (2^(b−1) − 1); returns q·s."""
    rows, columns = weight.shape
    group = columns if group_size is None else group_size
    if columns % group:
        raise ValueError(f"group size {group} does not divide the input width {columns}")
    grouped = weight.reshape(rows, columns // group, group)
    levels = 2 ** (bits - 1) - 1
    scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-12) / levels
    return (grouped / scale).round().clamp(-levels, levels).mul(scale).reshape(rows, columns)


@torch.no_grad()
def quantize(model, bits: int, group_size: int | None, quantizer: str = "rtn"):
    """The decoder blocks' linear weights quantised in place (see the module docstring)."""
    if quantizer == "torchao":
        try:
            from torchao.quantization import IntxWeightOnlyConfig, quantize_
            from torchao.quantization.granularity import PerAxis, PerGroup
        except ImportError:
            raise SystemExit("--quantizer torchao: torchao is not installed (pip install torchao)") from None
        granularity = PerAxis(0) if group_size is None else PerGroup(group_size)
        config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=granularity)
        quantize_(model.model.layers, config)
        return model
    for _, module in decoder_linears(model):
        # a group that does not divide the width shrinks to their common divisor (the tiny --quick models only)
        group = None if group_size is None else math.gcd(group_size, module.weight.shape[1])
        module.weight.copy_(round_to_nearest(module.weight, bits, group))
    return model


WIDTHS = [("fp32", None, None)] + [(f"int{b} {g}", b, size) for b in BITS
                                   for g, size in (("channel", None), (f"group{GROUP_SIZE}", GROUP_SIZE))]


# --- the models and the plan -----------------------------------------------------------------------------------


def chosen_runs(results_dir: Path) -> list[dict]:
    """Every seed at its model's chosen rate, from a finished (or partial) scratch or retrieval results file, with
    where its checkpoint would be (it may have been deleted, or never kept)."""
    path = results_dir / "results.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    found = []
    summary = data.get("summary", {})
    parts = summary.items() if "models" not in summary else [(None, summary)]
    for size, part in parts:
        for kind, model in part["models"].items():
            if "best_lr" not in model:
                continue
            for seed in model.get("loss_by_seed", model.get("accuracy_by_seed", {})):
                key = "/".join(p for p in (size, kind, f"lr{model['best_lr']:g}", f"seed{seed}") if p)
                checkpoint = results_dir / "cache" / "checkpoints" / (key.replace("/", "_") + ".pt")
                found.append({"key": key, "size": size, "kind": kind, "seed": int(seed),
                              "checkpoint": str(checkpoint)})
    return found


def chosen_checkpoints(results_dir: Path) -> list[dict]:
    """The chosen runs whose checkpoints are here: the ones that can be probed."""
    return [run for run in chosen_runs(results_dir) if Path(run["checkpoint"]).is_file()]


def forget_unchosen(results: lab.Results, prefix: str, chosen: set[str]) -> None:
    """Drops the probes of models the experiment no longer chooses (its sweep moved a best rate, say), so the report
    covers the chosen ones only. `chosen` comes from the experiment's results file, not from the checkpoints present:
    a chosen model's probes stay when its checkpoint is gone; an experiment without a results file keeps its probes."""
    if not chosen:
        return
    stale = [key for key in results.runs if key.startswith(prefix) and key not in chosen]
    for key in stale:
        del results.runs[key]
        print(f"[probes] dropped {key}: no longer a chosen model", flush=True)
    if stale:
        results.save()


def probe_language_model(job: dict, args, held_out: torch.Tensor) -> dict:
    model, _ = lab.load_checkpoint(Path(job["checkpoint"]), device=args.device)
    record = {"outliers": outliers(model, held_out[: args.outlier_blocks].to(args.device))}
    blocks = held_out[: args.quant_blocks]
    record["loss"] = {}
    for name, bits, group in WIDTHS:
        if bits is not None:
            model, _ = lab.load_checkpoint(Path(job["checkpoint"]), device=args.device)
            quantize(model, bits, group, args.quantizer)
        record["loss"][name] = lab.lm_losses(model, blocks).mean().item()
    return record


def probe_retrieval_model(job: dict, args, examples: dict, longest: list) -> dict:
    model, _ = lab.load_checkpoint(Path(job["checkpoint"]), device=args.device, attn="eager")
    ids = retrieval.collate(longest[: args.outlier_examples])["input_ids"].to(args.device)
    record = {"outliers": outliers(model, ids), "allocation": allocation(model, longest[: args.allocation_examples])}
    record["accuracy"] = {}
    everything = [example for cell in examples.values() for example in cell]
    for name, bits, group in WIDTHS:
        model, _ = lab.load_checkpoint(Path(job["checkpoint"]), device=args.device)
        if bits is not None:
            quantize(model, bits, group, args.quantizer)
        record["accuracy"][name] = retrieval.score(model, everything)["accuracy"]
    return record


# --- the report ------------------------------------------------------------------------------------------------


def group_by_model(runs: dict, prefix: str) -> dict:
    """{model: its records, by seed}, in the order the models were first probed."""
    groups = {}
    for key, record in runs.items():
        if key.startswith(prefix):
            groups.setdefault(record["model"], []).append(record)
    return {model: sorted(records, key=lambda record: record["seed"]) for model, records in groups.items()}


def write_report(results: lab.Results, out: Path) -> None:
    runs = results.runs
    lines = ["Probes of the trained models (every seed of each model at its chosen learning rate).", ""]
    retrieval_models = group_by_model(runs, "retrieval/")
    if retrieval_models:
        lines += ["## Attention allocation (retrieval models)", "",
                  "Share of the attention row at the position predicting the first query's answer (mean over heads, "
                  "examples and seeds; differential maps A1 − λ·A2 as a share of their row sum):", ""]
        rows = []
        for model, records in retrieval_models.items():
            by_layer = torch.tensor([r["allocation"]["by_layer"] for r in records]).mean(0)
            every = torch.tensor([r["allocation"]["all_layers"] for r in records])
            last = torch.tensor([r["allocation"]["by_layer"][-1] for r in records])
            best = max(range(len(by_layer)), key=lambda layer: by_layer[layer][0])
            rows.append([model, len(records), *(f"{v:.3f}" for v in every.mean(0).tolist()),
                         f"{last[:, 0].mean():.3f} / {last[:, 2].mean():.3f}",
                         f"{best}: {by_layer[best][0]:.3f} / {by_layer[best][2]:.3f}",
                         f"{statistics.fmean(r['allocation']['best_head_record_share'] for r in records):.3f}",
                         " / ".join(f"{r['allocation']['all_layers'][0]:.2f}" for r in records),
                         " / ".join(f"{r['allocation']['all_layers'][2]:.2f}" for r in records)])
        lines.append(lab.markdown_table(
            ["model", "seeds", "queried record (all layers)", "distractors", "rest (noise)",
             "last layer: record / rest", "best layer: record / rest", "best head: record",
             "queried record, by seed", "rest, by seed"], rows))
        lines += ["", "![attention maps](attention_maps.png)", ""]
    lines += ["## Activation outliers", "",
              "Largest pre-softmax attention logit and hidden-state entry, and each over its median |value| "
              "(mean ± std over seeds):", ""]
    rows = []
    for prefix in ("scratch/", "retrieval/"):
        for model, records in group_by_model(runs, prefix).items():
            o = [r["outliers"] for r in records]
            cell = lambda key: "{:.3g} ± {:.2g}".format(*lab.mean_std([x[key] for x in o]))  # noqa: E731
            top = lambda key: " / ".join(f"{v:.3g}" for v in torch.tensor([x[key] for x in o]).mean(0).tolist())  # noqa: E731
            rows.append([f"{prefix[:-1]} {model}", len(records), top("logit_top"), cell("logit_median_abs"),
                         cell("logit_ratio"), top("hidden_top"), cell("hidden_median_abs"), cell("hidden_ratio")])
    lines.append(lab.markdown_table(
        ["model", "seeds", "logit top-1/2/3", "logit median |·|", "top-1 / median", "hidden top-1/2/3",
         "hidden median |·|", "top-1 / median"], rows))
    widths = [name for name, _, _ in WIDTHS]
    lines += ["", f"## Weight-only quantisation ({results.data['settings']['quantizer']})", "",
              "Held-out loss increase over fp32 (language models, nats) and retrieval accuracy lost (points), mean "
              "± std over seeds:", ""]
    rows = []
    for prefix, metric, sign in (("scratch/", "loss", 1), ("retrieval/", "accuracy", -1)):
        for model, records in group_by_model(runs, prefix).items():
            row = [f"{prefix[:-1]} {model}", f"{statistics.fmean(r[metric]['fp32'] for r in records):.3f}"]
            for width in widths[1:]:
                lost = [sign * (r[metric][width] - r[metric]["fp32"]) for r in records]
                row.append("{:+.3f} ± {:.3f}".format(*lab.mean_std(lost)))
            rows.append(row)
    lines.append(lab.markdown_table(["model", "fp32 (loss / accuracy)"] + widths[1:], rows))
    lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    plot_quantization(results, out)


def plot_quantization(results: lab.Results, out: Path) -> None:
    plt = lab.pyplot()
    groups = [(prefix, metric) for prefix, metric in (("scratch/", "loss"), ("retrieval/", "accuracy"))
              if group_by_model(results.runs, prefix)]
    if not groups:
        return
    figure, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4), squeeze=False)
    for axis, (prefix, metric) in zip(axes[0], groups):
        for model, records in group_by_model(results.runs, prefix).items():
            bits = [32] + list(BITS)
            names = ["fp32"] + [f"int{b} group{GROUP_SIZE}" for b in BITS]
            values = [statistics.fmean(r[metric][name] - r[metric]["fp32"] for r in records) for name in names]
            axis.plot(bits, values, marker="o", label=model)
        axis.set(xscale="log", xticks=[*BITS, 32], xticklabels=[*map(str, BITS), "fp32"],
                 xlabel=f"weight bits (per group of {GROUP_SIZE})",
                 ylabel="held-out loss change (nats)" if metric == "loss" else "retrieval accuracy change",
                 title="language models on code" if metric == "loss" else "retrieval among distractors")
        axis.axhline(0, color="grey", lw=0.8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "quantization.png", dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--scratch-out", type=Path, default=lab.ROOT / "benchmarks" / "results" / "scratch")
    parser.add_argument("--retrieval-out", type=Path, default=lab.ROOT / "benchmarks" / "results" / "retrieval")
    parser.add_argument("--quantizer", choices=("rtn", "torchao"), default="rtn")
    parser.add_argument("--quant-blocks", type=int, default=100, help="held-out blocks scored at each width")
    parser.add_argument("--outlier-blocks", type=int, default=8)
    parser.add_argument("--outlier-examples", type=int, default=32)
    parser.add_argument("--allocation-examples", type=int, default=64)
    parser.add_argument("--quant-examples", type=int, default=100, help="retrieval examples a cell at each width")
    lab.add_common_arguments(parser, out=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.quant_blocks, args.outlier_blocks, args.outlier_examples, args.allocation_examples = 2, 2, 4, 4
        args.quant_examples = 4
    out = lab.setup(args, out=OUT)
    settings = {name: getattr(args, name) for name in (
        "quantizer", "quant_blocks", "outlier_blocks", "outlier_examples", "allocation_examples", "quant_examples",
        "device", "quick")}
    settings["bits"] = list(BITS)
    results = lab.Results(out / "results.json", settings, fresh=args.fresh)
    results.put("environment", lab.environment())
    started = time.perf_counter()

    scratch_jobs = chosen_checkpoints(args.scratch_out)
    if scratch_jobs:
        held_out = torch.load(args.scratch_out / "cache" / "corpus.pt", weights_only=True)["held_out"]
    for job in scratch_jobs:
        key = f"scratch/{job['key']}"
        if key not in results:
            record = probe_language_model(job, args, held_out)
            results.add(key, {"model": f"{job['size']} {job['kind']}", "seed": job["seed"], **record})
            print(f"[probes] {key}: {record['outliers']['logit_top'][0]:.1f} top logit", flush=True)

    retrieval_jobs = chosen_checkpoints(args.retrieval_out)
    for prefix, folder in (("scratch/", args.scratch_out), ("retrieval/", args.retrieval_out)):
        forget_unchosen(results, prefix, {f"{prefix}{run['key']}" for run in chosen_runs(folder)})
    if retrieval_jobs:
        stored = json.loads((args.retrieval_out / "results.json").read_text())["settings"]
        cells = retrieval.eval_cells(stored["lengths"], stored["eval_distractors"])
        examples = retrieval.eval_set(cells, args.quant_examples)
        hardest = max(cells)  # the longest context, with the most distractors that fit
        longest = retrieval.eval_set([hardest], max(args.allocation_examples, args.outlier_examples))[hardest]
    for job in retrieval_jobs:
        key = f"retrieval/{job['key']}"
        if key not in results:
            record = probe_retrieval_model(job, args, examples, longest)
            results.add(key, {"model": job["kind"], "seed": job["seed"], **record})
            print(f"[probes] {key}: record share {record['allocation']['all_layers'][0]:.3f}", flush=True)
    if retrieval_jobs:
        first = {}
        for job in retrieval_jobs:
            first.setdefault(job["kind"], job)
        models = {kind: lab.load_checkpoint(Path(job["checkpoint"]), device=args.device, attn="eager")[0]
                  for kind, job in first.items()}
        plot_maps(models, longest[0], out)
    write_report(results, out)
    print(f"[probes] wrote {out} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
