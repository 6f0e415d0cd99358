"""Causal-LM fine-tuning on code with the Hugging Face `Trainer`: LoRA or full, with held-out perplexity.

One recipe for DiffLlama checkpoints and plain Llama ones (both load through `AutoModelForCausalLM`), so a
converted model and its source are trained and measured the same way.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

# Registers `diff_llama` with the Auto classes, so our checkpoints load without trust_remote_code.
import modeling_diff  # noqa: F401

from .data import PackedBlocks, build_corpus, default_data_dir
from .lora import lora_config

logger = logging.get_logger(__name__)

MODES = ("lora", "full")
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
MERGED_DIR = "merged"


def prepare_model(
    model,
    *,
    mode: str,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    second_maps: str = "lora",
):
    """The model to train: `model` itself for `"full"`, a LoRA `PeftModel` from `lora_config` for `"lora"`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "full":
        return model
    config = lora_config(model, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, second_maps=second_maps)
    return get_peft_model(model, config)


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def held_out_loss(model, blocks: PackedBlocks, *, batch_size: int = 8) -> float:
    """Mean next-token loss over every predicted token of the held-out blocks (exp of it is the perplexity).

    Summed per batch and divided once, so a smaller last batch weighs by its tokens, not as a whole batch.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks.blocks[start : start + batch_size].to(device)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        predicted = input_ids.shape[0] * (input_ids.shape[1] - 1)  # the first token of a block is never predicted
        total += loss.float().item() * predicted
        count += predicted
    model.train(was_training)
    return total / count


def _loss_curve(log_history: list[dict]) -> list[dict]:
    return [{"step": entry["step"], "loss": entry["loss"]} for entry in log_history if "loss" in entry]


def _resume_checkpoint(resume: bool | str, checkpoints: Path) -> str | None:
    if not resume:
        return None
    if resume is not True:
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"checkpoint {resume} does not exist")
        return str(resume)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is None:
        raise FileNotFoundError(f"nothing to resume: no checkpoint-* folder in {checkpoints}")
    return last


def finetune(
    *,
    model: str | Path,
    output: str | Path,
    data: str | Path | None = None,
    mode: str = "lora",
    steps: int = 200,
    block_size: int = 512,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    eval_fraction: float = 0.05,
    max_train_tokens: int | None = None,
    max_eval_tokens: int | None = 100_000,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    second_maps: str = "lora",
    gradient_checkpointing: bool = False,
    bf16: bool = False,
    save_steps: int = 100,
    log_every: int | None = None,
    resume: bool | str = False,
    merge: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    training_args: dict | None = None,
) -> dict:
    """Fine-tune a causal LM on code and write the model (or adapter), its tokenizer and `metrics.json` to `output`.

    Args:
        model: folder (or Hub id) of a DiffLlama or Llama checkpoint with its tokenizer.
        output: folder for the result; checkpoints go to `output/checkpoints`.
        data: folder of .py files; default: this Python's standard library.
        mode: "lora" (adapter from finetune.lora.lora_config, λ and head-norm gains trained in full) or "full".
        steps: optimizer steps.
        block_size: tokens per packed training block.
        batch_size: blocks per device batch.
        gradient_accumulation_steps: batches per optimizer step.
        learning_rate: peak learning rate; default 2e-4 for LoRA, 5e-5 for full fine-tuning.
        warmup_steps: linear warm-up before the cosine decay; default 5% of the steps.
        weight_decay: AdamW weight decay.
        eval_fraction: share of the files held out for perplexity, chosen by a hash of each path.
        max_train_tokens: training-token budget read from the files; default: what the steps consume, one epoch.
        max_eval_tokens: held-out token budget.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; default 2·rank.
        lora_dropout: LoRA dropout.
        second_maps: "lora" or "full": how a widened conversion's second-map projections train (finetune.lora).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        bf16: bfloat16 mixed precision.
        save_steps: checkpoint every this many steps (the last two are kept).
        log_every: log the training loss every this many steps; default steps/100, at least 1.
        resume: True to continue from the last checkpoint in output/checkpoints, or a checkpoint folder.
        merge: LoRA only: also write the merged plain model to output/merged.
        seed: seed for LoRA initialisation, data order and dropout.
        attn_implementation: "eager", "sdpa" or "flash_attention_2"; default: the model's.
        trust_remote_code: allow a checkpoint's own code for a model type this install does not know.
        training_args: extra `TrainingArguments` fields, overriding the recipe's.

    Returns the metrics written to `output/metrics.json`.
    """
    started = time.perf_counter()
    output = Path(output)
    data = default_data_dir() if data is None else Path(data)
    if steps < 1:
        raise ValueError(f"steps ({steps}) must be at least 1")
    if merge and mode != "lora":
        raise ValueError("merge applies to LoRA training only; full fine-tuning already writes a plain model")
    if Path(model).is_absolute() or str(model).startswith("."):
        if not Path(model).is_dir():  # said plainly, before the Hub client rejects it as a malformed repo id
            raise FileNotFoundError(f"model folder {model} does not exist")
    checkpoints = output / CHECKPOINTS_DIR
    resume_from = _resume_checkpoint(resume, checkpoints)
    if not resume and checkpoints.is_dir() and get_last_checkpoint(str(checkpoints)) is not None:
        # Their step numbers would interleave with this run's, and a later --resume could pick one of them.
        logger.warning(f"{checkpoints} holds checkpoints of an earlier run; pass resume=True to continue it")

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    # safetensors only: a pickled checkpoint is refused rather than unpickled
    load_kwargs = {"trust_remote_code": trust_remote_code, "dtype": torch.float32, "use_safetensors": True}
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    base = AutoModelForCausalLM.from_pretrained(model, **load_kwargs)
    if len(tokenizer) > base.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {base.config.vocab_size}"
        )
    base.config.use_cache = False  # a training forward pass has no use for a cache, and checkpointing refuses one

    # Seeded before the adapter exists: LoRA's A matrices are drawn when it is built.
    torch.manual_seed(seed)
    trained = prepare_model(
        base, mode=mode, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, second_maps=second_maps
    )
    parameters = count_parameters(trained)
    logger.info(f"{mode} fine-tuning of {model}: {parameters['trainable']:,} of {parameters['total']:,} parameters")

    tokens_per_step = batch_size * gradient_accumulation_steps * block_size
    corpus = build_corpus(
        data,
        tokenizer,
        block_size=block_size,
        eval_fraction=eval_fraction,
        max_train_tokens=steps * tokens_per_step if max_train_tokens is None else max_train_tokens,
        max_eval_tokens=max_eval_tokens,
    )

    args = TrainingArguments(
        **{
            "output_dir": str(checkpoints),
            "max_steps": steps,
            "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "learning_rate": learning_rate if learning_rate is not None else (2e-4 if mode == "lora" else 5e-5),
            "lr_scheduler_type": "cosine",
            "warmup_steps": max(1, steps // 20) if warmup_steps is None else warmup_steps,
            "weight_decay": weight_decay,
            "logging_steps": max(1, steps // 100) if log_every is None else log_every,
            "save_strategy": "steps",
            "save_steps": save_steps,
            "save_total_limit": 2,
            "activation_checkpointing": gradient_checkpointing,
            "bf16": bf16,
            "seed": seed,
            "report_to": "none",
            "dataloader_num_workers": 0,  # blocks are in memory already
            "dataloader_pin_memory": torch.cuda.is_available(),
            **(training_args or {}),
        }
    )
    trainer = Trainer(
        model=trained,
        args=args,
        train_dataset=corpus.train,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )

    # Measured on the model as loaded (a resumed run too), so "before" always means the starting checkpoint.
    loss_before = held_out_loss(trained, corpus.held_out, batch_size=batch_size)
    logger.info(f"held-out perplexity before training: {math.exp(loss_before):.3f}")
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    loss_after = held_out_loss(trained, corpus.held_out, batch_size=batch_size)
    logger.info(f"held-out perplexity after {trainer.state.global_step} steps: {math.exp(loss_after):.3f}")

    # Through the Trainer: it gathers FSDP-sharded weights first, and only the main process writes. A LoRA PeftModel
    # writes its adapter, a full model its weights and config; the tokenizer is the Trainer's processing_class.
    trainer.save_model(str(output))
    main_process = trainer.is_world_process_zero()
    if merge and main_process:
        merged = trained.merge_and_unload()
        merged.save_pretrained(output / MERGED_DIR)
        tokenizer.save_pretrained(output / MERGED_DIR)

    metrics = {
        "model": str(model),
        "model_type": base.config.model_type,
        "mode": mode,
        "data": str(data),
        "steps": trainer.state.global_step,
        "resumed_from": resume_from,
        "block_size": block_size,
        "tokens_per_step": tokens_per_step,
        "parameters": parameters,
        **corpus.summary(),
        "held_out_loss_before": loss_before,
        "held_out_perplexity_before": math.exp(loss_before),
        "held_out_loss_after": loss_after,
        "held_out_perplexity_after": math.exp(loss_after),
        "train_loss": train_output.training_loss,
        "loss_curve": _loss_curve(trainer.state.log_history),
        "runtime_s": time.perf_counter() - started,
    }
    if main_process:
        (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info(f"wrote {output / METRICS_FILE}")
    return metrics
