"""Which initialisation of the new parameters lets a `widened --preserve` conversion learn fastest.

Every candidate (conversion.weight_map.WIDENED_INITS) starts as exactly SmolLM2-135M-Instruct, so they differ only
in how quickly training uses the second map. Each is converted from the same source, then fine-tuned for the same
few AdamW steps on the same batches of Python standard-library code, and scored on held-out standard-library
modules before and after. The unconverted source, fine-tuned the same way, is the reference. Writes
benchmarks/results/convert_init.json.

    python benchmarks/convert_init.py [--steps 20]
"""

import argparse
import inspect
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM

from conversion import WIDENED_INITS, convert, sources

TRAIN_MODULES = (
    "argparse",
    "collections",
    "dataclasses",
    "email.message",
    "json.decoder",
    "logging",
    "pathlib",
    "pprint",
    "shutil",
    "string",
    "tempfile",
    "typing",
    "zipfile",
)
HELD_OUT_MODULES = ("textwrap", "difflib", "csv", "fractions")


def chunks(tokenizer, module_names, length: int) -> torch.Tensor:
    """Consecutive `length`-token windows of the modules' source code, (N, length)."""
    ids = []
    for name in module_names:
        module = __import__(name, fromlist=["_"])
        ids.extend(tokenizer(inspect.getsource(module)).input_ids)
    count = len(ids) // length
    return torch.tensor(ids[: count * length]).view(count, length)


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    losses = [
        model(input_ids=data[i : i + batch], labels=data[i : i + batch]).loss.item() for i in range(0, len(data), batch)
    ]
    return sum(losses) / len(losses)


def train(model, train_data, held_out, *, steps: int, batch: int, lr: float, seed: int) -> dict:
    model.get_input_embeddings().weight.requires_grad_(False)  # tied to lm_head: the vocabulary is not the point
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed))
    before = held_out_loss(model, held_out)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        model.train()
        rows = order[(torch.arange(batch) + step * batch) % len(order)]
        loss = model(input_ids=train_data[rows], labels=train_data[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(round(loss.item(), 4))
    seconds = time.perf_counter() - start
    after = held_out_loss(model, held_out)
    lambdas = [layer.self_attn.lambdas().item() for layer in model.model.layers if hasattr(layer.self_attn, "lambdas")]
    return {
        "held_out_loss_before": round(before, 4),
        "held_out_loss_after": round(after, 4),
        "held_out_perplexity_after": round(math.exp(after), 3),
        "train_loss_curve": curve,
        "mean_abs_lambda_after": round(sum(abs(x) for x in lambdas) / len(lambdas), 5) if lambdas else None,
        "seconds_per_step": round(seconds / steps, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "convert_init.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="convert-init-"))
    results = {}
    try:
        # Dequantise the GGUF once into a safetensors folder; every candidate converts from it.
        source = sources.resolve(None)
        folder = work / "source"
        tokenizer = source.tokenizer()
        # A GGUF-loaded model refuses save_pretrained; its dequantised tensors and config are all a folder needs.
        model = source.load_model(torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        folder.mkdir()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        source.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model, state
        train_data = chunks(tokenizer, TRAIN_MODULES, args.length)
        held_out = chunks(tokenizer, HELD_OUT_MODULES, args.length)[:32]
        print(f"train windows {len(train_data)}, held-out windows {len(held_out)} of {args.length} tokens")

        for candidate in (*WIDENED_INITS, "source"):
            torch.manual_seed(args.seed)
            if candidate == "source":
                path = folder
            else:
                path = convert(
                    source=folder,
                    output=work / candidate,
                    strategy="widened",
                    preserve=True,
                    init=candidate,
                    verify=False,
                    progress=False,
                    seed=args.seed,
                )
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            results[candidate] = train(
                model, train_data, held_out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed
            )
            print(candidate, json.dumps(results[candidate]), flush=True)
            del model
            write_summary(args, results)  # after each run: a long measurement keeps what it finished
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = write_summary(args, results)
    print(f"lowest held-out loss after {args.steps} steps: {best}")


def write_summary(args, results: dict) -> str:
    converted = {name: r for name, r in results.items() if name != "source"}
    best = min(converted, key=lambda name: converted[name]["held_out_loss_after"])
    summary = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised), widened --preserve",
        "setup": {
            **{k: v for k, v in vars(args).items() if k != "output"},
            "train_modules": TRAIN_MODULES,
            "held_out_modules": HELD_OUT_MODULES,
            "optimizer": "AdamW, embeddings frozen",
        },
        "results": results,
        "best": best,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    return best


if __name__ == "__main__":
    main()
