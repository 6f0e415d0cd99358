"""From scratch at small scale: a Llama against parameter-matched differential attention, on Python code.

Three decoders with the same hidden size, layers, MLP, data order, steps, learning-rate schedule and seeds:

- `llama`: H heads of width d = hidden / H;
- `diff-v1`: the paper's parameter matching, H/2 differential heads of map width d (so `q_proj`, `k_proj`,
  `v_proj`, `o_proj` have the Llama's shapes; 6·d extra parameters a layer for λ and the head-norm gain);
- `diff-v2`: the 2026 revision, H heads of width d over the Llama's keys and values; it adds a second query map
  and `lambda_proj` (hidden·H·d + hidden·H a layer), which the table counts.

Each is trained on packed blocks of standard-library code and scored on held-out files (`finetune.data` splits by
file, so no part of a held-out file is ever trained on).

Tokenizer: a 4,096-token byte-level BPE trained here on the training files only (held-out files never reach it).
SmolLM2's 49,152-token vocabulary would make the embedding several times the size of these decoders and its output
softmax most of the compute (measured at hidden 256, 6 layers: 3 to 6× slower a step than with 4,096 tokens), so
the budget would go to the embedding rather than to the attention being compared.

    python benchmarks/scratch.py           # the committed results (under an hour on 2 cores)
    python benchmarks/scratch.py --quick   # a smoke run: tiny models, a few steps, one seed

Writes `results.json`, `results.md` and `loss_curves.png` to `--out` (default `benchmarks/results/scratch`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the model files and packages live at the repository root

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

import modeling_diff
from configuration_diff import DiffLlamaConfig
from finetune.data import (
    PackedBlocks,
    default_data_dir,
    python_files,
    split_files,
    tokenize_files,
)

MODELS = ("llama", "diff-v1", "diff-v2")
EOS = "<|endoftext|>"


def train_tokenizer(files: list[Path], vocab_size: int, max_chars: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (no unknown tokens: any byte sequence encodes) from the first `max_chars` of `files`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        budget = max_chars
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")[:budget]
            budget -= len(text)
            yield text
            if budget <= 0:
                return

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts(), trainer=trainer)
    # model_max_length: whole files are tokenised before packing; the length warning would be noise.
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, model_max_length=10**9)


def model_configs(*, vocab_size: int, hidden: int, layers: int, heads: int, block_size: int) -> dict:
    if heads % 2:
        raise ValueError(f"heads ({heads}) must be even: version 1 uses heads / 2 differential heads")
    d = hidden // heads
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 31) // 32 * 32,
                  num_hidden_layers=layers, max_position_embeddings=block_size, tie_word_embeddings=True,
                  head_dim=d, bos_token_id=None, eos_token_id=0, pad_token_id=None)
    return {
        "llama": LlamaConfig(num_attention_heads=heads, num_key_value_heads=heads, **common),
        "diff-v1": DiffLlamaConfig(diff_version=1, num_attention_heads=heads // 2, num_key_value_heads=heads // 2,
                                   **common),
        "diff-v2": DiffLlamaConfig(diff_version=2, num_attention_heads=heads, num_key_value_heads=heads, **common),
    }


def build_model(config):
    kind = modeling_diff.DiffLlamaForCausalLM if isinstance(config, DiffLlamaConfig) else LlamaForCausalLM
    return kind._from_config(config, attn_implementation="sdpa")


def count(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding is counted once
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding}


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean loss over every predicted held-out token (all blocks are full, so a mean of batch means is exact
    only with equal batches: weight each by its size)."""
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train()
    return total / len(blocks)


def train_one(config, seed: int, train: PackedBlocks, held_out: torch.Tensor, args) -> dict:
    torch.manual_seed(seed)
    model = build_model(config)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; norms, λ vectors and biases are not decayed
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    # The data order depends on the seed alone, so every model type sees the same blocks in the same order.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    train_curve, eval_curve = [], [(0, evaluate(model, held_out, args.batch_size))]
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = order[((step - 1) * args.batch_size + torch.arange(args.batch_size)) % len(train)]
        batch = train.blocks[index]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        train_curve.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            eval_curve.append((step, evaluate(model, held_out, args.batch_size)))
    seconds = time.perf_counter() - started
    final = eval_curve[-1][1]
    return {
        "seed": seed,
        "held_out_loss": final,
        "held_out_perplexity": math.exp(final),
        "train_loss_curve": train_curve,
        "held_out_loss_curve": eval_curve,
        "seconds": seconds,
        "train_tokens_per_s": args.steps * args.batch_size * train.blocks.shape[1] / seconds,
        "parameters": count(model),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: dict) -> None:
    llama_ppl = {run["seed"]: run["held_out_perplexity"] for run in results["runs"]["llama"]}
    for name, runs in results["runs"].items():
        ppl = [run["held_out_perplexity"] for run in runs]
        summary = {
            "parameters": runs[0]["parameters"],
            "held_out_perplexity_mean": mean_std(ppl)[0],
            "held_out_perplexity_std": mean_std(ppl)[1],
            "held_out_loss_mean": statistics.fmean(run["held_out_loss"] for run in runs),
            # Paired by seed (same data order), which removes most of the seed-to-seed variation.
            "wins_vs_llama": sum(run["held_out_perplexity"] < llama_ppl[run["seed"]] for run in runs),
            "train_tokens_per_s_mean": statistics.fmean(run["train_tokens_per_s"] for run in runs),
        }
        results.setdefault("summary", {})[name] = summary


def write_outputs(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    s = results["settings"]
    llama = results["summary"]["llama"]
    lines = [
        (
            f"From scratch on Python standard-library code: hidden {s['hidden']}, {s['layers']} layers, "
            f"{s['steps']} steps of {s['batch_size']}×{s['block_size']} tokens ({s['train_tokens']:,} tokens), "
            f"cosine LR {s['lr']} with {s['warmup']} warm-up steps, seeds {', '.join(map(str, s['seeds']))}; "
            f"held-out perplexity on {s['held_out_tokens']:,} tokens from {s['held_out_files']} files never trained on "
            f"({s['vocab_size']}-token BPE)."
        ),
        "",
        (
            "| model | heads × map width | non-embedding parameters | vs Llama | held-out perplexity (mean ± std) "
            "| seeds better than Llama | train tokens/s |"
        ),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, summary in results["summary"].items():
        layout = results["layouts"][name]
        extra = summary["parameters"]["non_embedding"] - llama["parameters"]["non_embedding"]
        wins = "–" if name == "llama" else f"{summary['wins_vs_llama']}/{len(s['seeds'])}"
        lines.append(
            f"| {name} | {layout} | {summary['parameters']['non_embedding']:,} | {extra:+,} | "
            f"{summary['held_out_perplexity_mean']:.3f} ± {summary['held_out_perplexity_std']:.3f} | {wins} | "
            f"{summary['train_tokens_per_s_mean']:,.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")

    figure, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, s["steps"] // 20)
    for name, runs in results["runs"].items():
        # Mean over seeds, then a trailing moving average: single-batch losses are too noisy to compare by eye.
        mean_curve = [statistics.fmean(values) for values in zip(*(run["train_loss_curve"] for run in runs))]
        smooth = [statistics.fmean(mean_curve[max(0, i - window + 1) : i + 1]) for i in range(len(mean_curve))]
        line, = train_axis.plot(range(1, len(smooth) + 1), smooth, label=name)
        steps = [step for step, _ in runs[0]["held_out_loss_curve"]]
        per_seed = [[loss for _, loss in run["held_out_loss_curve"]] for run in runs]
        means = [statistics.fmean(values) for values in zip(*per_seed)]
        low = [min(values) for values in zip(*per_seed)]
        high = [max(values) for values in zip(*per_seed)]
        eval_axis.plot(steps, means, marker="o", color=line.get_color(), label=name)
        eval_axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    train_axis.set(xlabel="step", ylabel=f"training loss (mean of seeds, {window}-step average)")
    eval_axis.set(xlabel="step", ylabel="held-out loss (mean, band: min–max of seeds)")
    for axis in (train_axis, eval_axis):
        axis.set_ylim(top=min(axis.get_ylim()[1], 8.5))  # the first steps sit near ln(vocab) and hide the rest
        axis.legend()
    figure.suptitle("Llama vs differential attention from scratch on Python code")
    figure.tight_layout()
    figure.savefig(out / "loss_curves.png", dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8, help="the Llama's heads; version 1 gets half")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-blocks", type=int, default=400,
                        help="held-out blocks of block-size tokens; fewer would come from a handful of files")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--tokenizer-chars", type=int, default=8_000_000, help="training text the BPE learns from")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")
    parser.add_argument("--data", type=Path, default=None, help="folder of .py files; default: the standard library")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/scratch[-quick]")
    parser.add_argument("--quick", action="store_true", help="tiny models, 6 steps, one seed: checks the pipeline")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.hidden, args.layers, args.heads = 6, [0], 64, 2, 4
        args.warmup, args.eval_every, args.eval_blocks, args.vocab_size, args.tokenizer_chars = 2, 3, 4, 512, 200_000
    out = args.out or ROOT / "benchmarks" / "results" / ("scratch-quick" if args.quick else "scratch")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "llama" not in args.models:
        parser.error("--models must include llama: every other model is reported against it")

    started = time.perf_counter()
    data = args.data or default_data_dir()
    train_files, held_out_files = split_files(python_files(data), root=data, eval_fraction=0.05)
    tokenizer = train_tokenizer(train_files, args.vocab_size, args.tokenizer_chars)
    train_ids, train_files = tokenize_files(train_files, tokenizer,
                                            max_tokens=args.steps * args.batch_size * args.block_size)
    held_out_ids, held_out_files = tokenize_files(held_out_files, tokenizer,
                                                  max_tokens=args.eval_blocks * args.block_size)
    train, held_out = PackedBlocks(train_ids, args.block_size), PackedBlocks(held_out_ids, args.block_size)
    print(f"[scratch] {len(train)} training blocks from {len(train_files)} files, {len(held_out)} held-out blocks "
          f"from {len(held_out_files)} files ({time.perf_counter() - started:.0f} s)", flush=True)

    configs = model_configs(vocab_size=len(tokenizer), hidden=args.hidden, layers=args.layers, heads=args.heads,
                            block_size=args.block_size)
    configs = {name: configs[name] for name in MODELS if name in args.models}
    runs = {name: [] for name in configs}
    # Seed-major order: an interrupted run still holds complete seeds for every model, and the three models of a
    # seed run back to back under the same machine load.
    for seed in args.seeds:
        for name, config in configs.items():
            run = train_one(config, seed, train, held_out.blocks, args)
            runs[name].append(run)
            print(f"[scratch] {name} seed {seed}: held-out perplexity {run['held_out_perplexity']:.3f} "
                  f"({run['seconds']:.0f} s)", flush=True)

    d = args.hidden // args.heads
    results = {
        "settings": {
            "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "head_dim": d,
            "steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size, "lr": args.lr,
            "warmup": args.warmup, "seeds": args.seeds, "vocab_size": len(tokenizer),
            "train_tokens": args.steps * args.batch_size * args.block_size, "held_out_tokens": held_out.num_tokens,
            "train_files": len(train_files), "held_out_files": len(held_out_files),
            "threads": torch.get_num_threads(), "quick": args.quick,
        },
        "layouts": {"llama": f"{args.heads} × {d}", "diff-v1": f"{args.heads // 2} × 2 maps × {d}",
                    "diff-v2": f"{args.heads} × 2 maps × {d}"},
        "runs": runs,
    }
    summarise(results)
    results["wall_s"] = time.perf_counter() - started
    write_outputs(results, out)
    print(f"[scratch] wrote {out} in {results['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
