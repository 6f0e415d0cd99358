"""What the experiments in `benchmarks/` share: models, data, the training loop, scoring, results and plots.

An experiment script is a thin layer over these functions (`scratch.py`, `retrieval.py` and `probes.py` are the
examples):

    import lab                                        # benchmarks/ is on sys.path when a script there runs

    shape = lab.Shape.parse("128x4x8")                # hidden × layers × the Llama's heads
    config = lab.model_config("diff-v2", shape, vocab_size=4096, max_positions=256)
    corpus = lab.code_corpus(vocab_size=4096, block_size=256, train_tokens=300_000, eval_tokens=100_000)
    torch.manual_seed(seed)
    model = lab.build_model(config, device="cpu")
    run = lab.train(model, lab.lm_batches(corpus.train, batch_size=8, seed=seed), steps=150, lr=1.5e-3,
                    warmup=15, evaluate=lambda m: lab.lm_losses(m, corpus.held_out).mean().item(),
                    eval_steps=[50, 100, 150])
    results = lab.Results(out / "results.json", settings)  # reopens what an interrupted run wrote
    results.add("diff-v2/seed0", run)                      # on disk at once

Model kinds (`KINDS`), all with the same hidden size, layers, MLP and tied embedding for a given `Shape`:

- `llama`: H heads of width d = hidden / H;
- `llama-wide`: H heads of width 5d/4, the Llama's attention widened to version 2's parameters (5·hidden·H·d
  against version 2's 5·hidden·H·d + hidden·H: the extra parameters where version 2 has them);
- `diff-v1`: the paper's parameter matching, H/2 differential heads of map width d (the Llama's projection shapes,
  6·d extra parameters a layer for λ and the head-norm gain);
- `diff-v1-nonorm`: `diff-v1` without the per-head norm (and its `1 − λ_init` scale), `use_head_norm=False`;
- `diff-v2`: the 2026 revision, H heads of width d over the Llama's keys and values, plus a second query map and
  `lambda_proj` per head.

Controls (`CONTROLS`, built by `build_kind`): a kind changed at step 0 to isolate one cause of a difference. With
N(0, 0.02) weights, version 1's per-head norm starts its attention outputs several times the embedding's RMS, a
Llama's start near it, and version 2's (two nearly equal maps subtracted) below it.

- `diff-v1-gain`: `diff-v1` whose head-norm gains are scaled, layer by layer, so that each attention output's RMS
  over the embedding's on the first batch equals the Llama's of the same seed;
- `diff-v1-onemap`, `diff-v1-gain-onemap`: `diff-v1` and `diff-v1-gain` without the difference (λ held at 0,
  the `1 − λ_init` scale kept in the gain): each head is its first map over the 2d-wide value, normed, and the
  second maps' projections get no gradient;
- `llama-v2scale`, `llama-wide-v2scale`: the Llama and the wide Llama with `o_proj` scaled, layer by layer, so that
  their attention outputs start at version 2's scale of the same seed.

Every run is deterministic given its seed: `torch.manual_seed(seed)` before `build_model` fixes the initialisation,
and `lm_batches` orders the data by the seed alone, so all kinds see the same blocks in the same order.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the model files and packages live at the repository root

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

import modeling_diff
from configuration_diff import DiffLlamaConfig

KINDS = ("llama", "llama-wide", "diff-v1", "diff-v1-nonorm", "diff-v2")
EOS = "<|endoftext|>"


# --- models ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A model size: hidden width, layers, and the Llama's number of heads H (head width hidden / H)."""

    hidden: int
    layers: int
    heads: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """`"128x4x8"` → hidden 128, 4 layers, 8 heads."""
        try:
            hidden, layers, heads = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"model size {text!r} must read HIDDENxLAYERSxHEADS, e.g. 128x4x8") from None
        if heads % 2 or hidden % heads or (hidden // heads) % 8:
            raise ValueError(
                f"model size {text}: heads ({heads}) must be even (version 1 takes H/2 heads) and divide hidden "
                f"({hidden}) into heads of a width that is a multiple of 8 (the wide Llama's are 5/4 as wide, even)"
            )
        return cls(hidden, layers, heads)

    def __str__(self) -> str:
        return f"{self.hidden}x{self.layers}x{self.heads}"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def model_config(kind: str, shape: Shape, *, vocab_size: int, max_positions: int, **overrides):
    """The config of one model kind (see the module docstring) at `shape`; `overrides` go to the config."""
    h, d = shape.heads, shape.head_dim
    common = dict(vocab_size=vocab_size, hidden_size=shape.hidden,
                  intermediate_size=(shape.hidden * 8 // 3 + 31) // 32 * 32, num_hidden_layers=shape.layers,
                  max_position_embeddings=max_positions, tie_word_embeddings=True, head_dim=d, bos_token_id=None,
                  eos_token_id=0, pad_token_id=None, **overrides)
    if kind == "llama":
        return LlamaConfig(num_attention_heads=h, num_key_value_heads=h, **common)
    if kind == "llama-wide":
        return LlamaConfig(num_attention_heads=h, num_key_value_heads=h, **{**common, "head_dim": d * 5 // 4})
    if kind in ("diff-v1", "diff-v1-nonorm"):
        return DiffLlamaConfig(diff_version=1, num_attention_heads=h // 2, num_key_value_heads=h // 2,
                               use_head_norm=kind == "diff-v1", **common)
    if kind == "diff-v2":
        return DiffLlamaConfig(diff_version=2, num_attention_heads=h, num_key_value_heads=h, **common)
    raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(KINDS)}")


def layout(kind: str, shape: Shape) -> str:
    """Heads × map width, as the tables print it."""
    h, d = shape.heads, shape.head_dim
    kind = CONTROLS.get(kind, (kind,))[0]
    return {"llama": f"{h} × {d}", "llama-wide": f"{h} × {d * 5 // 4}", "diff-v1": f"{h // 2} × 2 maps × {d}",
            "diff-v1-nonorm": f"{h // 2} × 2 maps × {d}", "diff-v2": f"{h} × 2 maps × {d}"}[kind]


# name: (the kind built, the kind whose attention/embedding RMS ratio it takes at step 0 or None, the weight that
# scales a layer's attention output linearly (o_proj has no bias), whether the difference is switched off)
CONTROLS = {
    "diff-v1-gain": ("diff-v1", "llama", lambda attention: attention.head_norm.weight, False),
    "diff-v1-onemap": ("diff-v1", None, None, True),
    "diff-v1-gain-onemap": ("diff-v1", "llama", lambda attention: attention.head_norm.weight, True),
    "llama-v2scale": ("llama", "diff-v2", lambda attention: attention.o_proj.weight, False),
    "llama-wide-v2scale": ("llama-wide", "diff-v2", lambda attention: attention.o_proj.weight, False),
}


@torch.no_grad()
def attention_scale(model, batch: torch.Tensor) -> dict:
    """Each layer's attention output RMS (after `o_proj`) over the embedding's RMS, on `batch`."""
    outputs = []
    hooks = [layer.self_attn.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
             for layer in model.model.layers]
    try:
        model(input_ids=batch)
    finally:
        for hook in hooks:
            hook.remove()
    embedding = model.get_input_embeddings()(batch).pow(2).mean().sqrt().item()
    attention = [output.pow(2).mean().sqrt().item() for output in outputs]
    return {"embedding_rms": embedding, "attention_rms": attention, "ratio": [a / embedding for a in attention]}


def build_kind(kind: str, config_for: Callable, batch: torch.Tensor, *, seed: int, device: str = "cpu"):
    """(model at its initialisation, what was changed) for a kind or a control; `config_for(kind, **overrides)`
    gives a kind's config, `batch` is the first training batch (the controls' scales are measured on it)."""
    built, reference, weight, onemap = CONTROLS.get(kind, (kind, None, None, False))
    torch.manual_seed(seed)
    model = build_model(config_for(built, **({"lambda_init": 0.0} if onemap else {})), device=device)
    if onemap:
        # λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init = 1 − 1 + 0 exactly, for good: λ_init 0 and the vectors zero and
        # frozen; the gain takes the 1 − λ_init that version 1 scales each head by, so the model starts as diff-v1
        # would without its second maps.
        scales = config_for(built)
        with torch.no_grad():
            for index, layer in enumerate(model.model.layers):
                for vector in layer.self_attn.lambdas.parameters():
                    vector.zero_()
                    vector.requires_grad_(False)
                layer.self_attn.head_norm.weight.mul_(1.0 - scales.lambda_init_for(index))
    if reference is None:
        return model, {}
    torch.manual_seed(seed)
    target = attention_scale(build_model(config_for(reference), device=device), batch)["ratio"]
    factors = []
    # Layer by layer: a layer's attention output is linear in the weight scaled, and its input depends only on the
    # layers below, which are already rescaled.
    for index, layer in enumerate(model.model.layers):
        factors.append(target[index] / attention_scale(model, batch)["ratio"][index])
        with torch.no_grad():
            weight(layer.self_attn).mul_(factors[-1])
    return model, {"attention_rescaled_by": factors}


def build_model(config, *, device: str | torch.device = "cpu", attn: str = "sdpa"):
    """A freshly initialised causal LM for `config` (Llama or DiffLlama) on `device`, in training mode."""
    kind = modeling_diff.DiffLlamaForCausalLM if isinstance(config, DiffLlamaConfig) else LlamaForCausalLM
    model = kind._from_config(config, attn_implementation=attn).to(device)
    model.train()
    return model


def count(model) -> dict[str, int]:
    """Parameters in total (the tied embedding once) and without the embedding."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def save_checkpoint(model, path: Path, **meta) -> None:
    """The model's config and weights (and any JSON-able `meta`) in one file, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": model.config.to_dict(), "meta": meta,
             "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}}
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def load_checkpoint(path: Path, *, device: str | torch.device = "cpu", attn: str = "sdpa"):
    """(model in eval mode, meta) from `save_checkpoint`'s file."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fields = dict(state["config"])
    config_class = DiffLlamaConfig if fields.get("model_type") == DiffLlamaConfig.model_type else LlamaConfig
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        fields.pop(key, None)
    model = build_model(config_class(**fields), device=device, attn=attn)
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, state["meta"]


# --- data ------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Packed token blocks of training and held-out code, `(blocks, block_size)` long tensors, and what they hold."""

    tokenizer: PreTrainedTokenizerFast
    train: torch.Tensor
    held_out: torch.Tensor
    info: dict


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


def code_corpus(*, vocab_size: int, block_size: int, train_tokens: int, eval_tokens: int,
                tokenizer_chars: int = 8_000_000, data: Path | None = None) -> Corpus:
    """Python code split by file (`finetune.data`: no part of a held-out file is trained on), a BPE of
    `vocab_size` tokens learnt from the training files only, and the first `train_tokens` / `eval_tokens` of each
    side packed into blocks (the files come in a fixed hash order, so the budget samples the whole library).

    `data`: a folder of `.py` files, by default the running Python's standard library.

    A 4,096-token vocabulary rather than SmolLM2's 49,152: that one would make the embedding several times the size
    of the small decoders compared here and the output softmax most of the compute.
    """
    from finetune.data import PackedBlocks, default_data_dir, python_files, split_files, tokenize_files

    data = data or default_data_dir()
    train_files, held_out_files = split_files(python_files(data), root=data, eval_fraction=0.05)
    tokenizer = train_tokenizer(train_files, vocab_size, tokenizer_chars)
    train_ids, train_files = tokenize_files(train_files, tokenizer, max_tokens=train_tokens)
    held_out_ids, held_out_files = tokenize_files(held_out_files, tokenizer, max_tokens=eval_tokens)
    train, held_out = PackedBlocks(train_ids, block_size), PackedBlocks(held_out_ids, block_size)
    info = {"vocab_size": len(tokenizer), "train_files": len(train_files), "held_out_files": len(held_out_files),
            "train_blocks": len(train), "held_out_blocks": len(held_out), "held_out_tokens": held_out.num_tokens}
    return Corpus(tokenizer, train.blocks, held_out.blocks, info)


def lm_batches(blocks: torch.Tensor, *, batch_size: int, seed: int) -> Callable[[int], dict]:
    """Step (from 1) → a batch of whole blocks as inputs and labels, in an order fixed by `seed` alone (it wraps
    around when the steps ask for more blocks than there are)."""
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))

    def batch(step: int) -> dict:
        ids = blocks[order[((step - 1) * batch_size + torch.arange(batch_size)) % len(blocks)]]
        return {"input_ids": ids, "labels": ids}

    return batch


# --- training and scoring --------------------------------------------------------------------------------------


def train(model, batches: Callable[[int], dict], *, steps: int, lr: float, warmup: int, weight_decay: float = 0.1,
          evaluate: Callable | None = None, eval_steps: Iterable[int] = (), log: Callable[[str], None] | None = None
          ) -> dict:
    """AdamW (β 0.9/0.95, weight decay on matrices only), cosine schedule after `warmup` linear steps, gradients
    clipped to norm 1: the recipe of every from-scratch run here.

    `batches(step)` gives the step's batch (`input_ids`, `labels`, optionally `attention_mask`; labels -100 are not
    scored); `evaluate(model)`, when given, runs in eval mode at each of `eval_steps` and returns something JSON-able.
    Returns the per-step training losses, the evaluations as `(step, value)` pairs, the seconds and tokens trained.
    """
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; norms, λ vectors and biases are not decayed
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    eval_steps = set(eval_steps)
    train_curve, eval_curve, tokens = [], [], 0
    started = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        batch = {name: tensor.to(device) for name, tensor in batches(step).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        train_curve.append(loss.item())
        tokens += batch["input_ids"].numel()
        if evaluate is not None and step in eval_steps:
            model.eval()
            with torch.no_grad():
                eval_curve.append((step, evaluate(model)))
            model.train()
        if log is not None and (step % max(1, steps // 10) == 0 or step == steps):
            log(f"step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    seconds = time.perf_counter() - started
    return {"train_loss_curve": train_curve, "eval_curve": eval_curve, "seconds": seconds,
            "train_tokens": tokens, "train_tokens_per_s": tokens / seconds}


@torch.no_grad()
def lm_losses(model, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The mean next-token loss of each block, `(blocks,)`: blocks are equally long, so their mean is the loss
    per token and any subset's mean is that subset's."""
    device = next(model.parameters()).device
    losses = []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        losses.append(per_token.mean(dim=1).cpu())
    return torch.cat(losses)


# --- results ---------------------------------------------------------------------------------------------------


class Results:
    """An experiment's results in one JSON file, rewritten (atomically) after every added run, so an interrupted
    experiment keeps what it finished and running it again skips those runs.

    `settings` are the choices that change the numbers; reopening a file written under other settings is refused
    (mixing them would be wrong), unless `fresh` starts it over. Settings named in `selects` only choose which runs
    to do (sizes, seeds): they may change, and the file then records the new ones.
    """

    def __init__(self, path: Path, settings: dict, *, fresh: bool = False, selects: Iterable[str] = ()):
        self.path = Path(path)
        settings = json.loads(json.dumps(settings))  # as JSON stores it: tuples become lists, keys strings
        self.data = {"settings": settings, "runs": {}}
        if self.path.is_file() and not fresh:
            stored = json.loads(self.path.read_text())
            changed = sorted(key for key in {*settings, *stored.get("settings", {})}
                             if key not in selects and stored.get("settings", {}).get(key) != settings.get(key))
            if changed:
                raise SystemExit(f"{self.path} holds results made with other settings ({', '.join(changed)}); "
                                 "rerun with those settings to resume, pass --fresh to start over, or use another "
                                 "--out")
            self.data = {**stored, "settings": settings}

    @property
    def runs(self) -> dict:
        return self.data["runs"]

    def __contains__(self, key: str) -> bool:
        return key in self.data["runs"]

    def add(self, key: str, record: dict) -> None:
        self.data["runs"][key] = record
        self.save()

    def put(self, section: str, value) -> None:
        """A top-level section besides settings and runs (summaries, environment)."""
        self.data[section] = value
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    partial.replace(path)


def execute(plan: Callable[[], list[tuple[str, object]]], work: Callable, results: Results, *, jobs: int = 1,
            threads: int | None = None, name: str = "lab", after: Callable[[], None] | None = None) -> None:
    """Run every task `plan()` returns until it returns none, `jobs` at a time, each result `results.add`ed as it
    arrives.

    `plan()` is asked again after every result, so a task may depend on earlier ones (the best learning rate of a
    sweep, say); it returns `(key, task)` pairs, tasks whose key is not yet in `results`. `work(task)` returns the
    run's record; with `jobs` > 1 it runs in `jobs` spawned processes (so it must be a module-level function and
    the task picklable), each with `threads` torch threads. `after()`, when given, runs after a result at most
    once a minute (to rewrite a report from the partial results, say). Progress lines are printed as `[name] ...`
    and flushed, so a redirected log shows them while the workers run.
    """
    last_report = time.perf_counter()

    def finish(key: str, record: dict) -> None:
        nonlocal last_report
        results.add(key, record)
        print(f"[{name}] done {key}", flush=True)
        if after is not None and time.perf_counter() - last_report > 60:  # a report a minute is enough
            after()
            last_report = time.perf_counter()

    if jobs <= 1:
        while pending := plan():
            key, task = pending[0]
            finish(key, work(task))
        return
    running = {}
    with ProcessPoolExecutor(jobs, mp_context=torch.multiprocessing.get_context("spawn"),
                             initializer=_worker_setup, initargs=(threads,)) as pool:
        while True:
            in_flight = {key for key, _ in running.values()}
            for key, task in plan():
                if len(running) >= jobs:
                    break
                if key not in in_flight:
                    running[pool.submit(work, task)] = (key, task)
                    in_flight.add(key)
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key, _ = running.pop(future)
                finish(key, future.result())


def _worker_setup(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_common_arguments(parser, *, out: Path) -> None:
    """--device, --threads, --jobs, --out, --fresh and --quick, as every experiment takes them."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one process then: --jobs is ignored)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads a process (default 1, so other work keeps a core)")
    parser.add_argument("--jobs", type=int, default=1, help="training processes at once (CPU)")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {out.relative_to(ROOT)}[-quick]")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming --out")
    parser.add_argument("--quick", action="store_true", help="a smoke run of the pipeline at a tiny size (seconds)")


def setup(args, *, out: Path) -> Path:
    """Applies --threads and --device (CUDA: one process), returns the output folder."""
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
        args.jobs = 1
    folder = args.out or out.with_name(out.name + ("-quick" if args.quick else ""))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def environment() -> dict:
    """What the numbers depend on besides the settings: library versions and the model code (a hash of its two
    files, which also identifies an uncommitted or exported copy)."""
    import hashlib

    import transformers

    code = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in ("configuration_diff.py",
                                                                             "modeling_diff.py")))
    from perf import cpu_description

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "model_code_sha256": code.hexdigest()[:16], "threads": torch.get_num_threads(), "cpu": cpu_description()}


# --- statistics, tables and plots ------------------------------------------------------------------------------

# Two-sided 95% Student t quantiles by degrees of freedom (n − 1 for n paired seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: dict, b: dict) -> dict:
    """`a` against `b`, both `{seed: value}` (lower is better): the seeds in both, the mean difference a − b, its
    95% t interval half-width, and on how many seeds a is lower."""
    seeds = sorted(set(a) & set(b))
    differences = [a[seed] - b[seed] for seed in seeds]
    mean, std = mean_std(differences) if differences else (math.nan, math.nan)
    half = _T95.get(len(seeds) - 1, 1.96) * std / math.sqrt(len(seeds)) if len(seeds) > 1 else math.nan
    return {"seeds": seeds, "mean_difference": mean, "ci95": half,
            "wins": sum(d < 0 for d in differences), "n": len(seeds)}


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; `align` one character a column, `l` or `r` (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: single-batch losses are too noisy to compare by eye."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
