"""Causal-LM fine-tuning on code with the Hugging Face `Trainer`: LoRA or full, with held-out perplexity.

One recipe for DiffLlama checkpoints and plain Llama ones (both load through `AutoModelForCausalLM`), so a
converted model and its source are trained and measured the same way.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator
from transformers.utils import logging

from configuration_diff import AUTO_MAP
from conversion import output as outputs
from conversion.errors import ConversionError
from conversion.output import Manifest, files_under, inside

# Registers `diff_llama` with the Auto classes, so our checkpoints load without trust_remote_code.
import modeling_diff  # noqa: F401

from . import instruct
from .data import PackedBlocks, build_corpus, default_data_dir
from .dex import dex_callbacks
from .lora import lora_config

logger = logging.get_logger(__name__)

MODES = ("lora", "full")
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
MERGED_DIR = "merged"
# How `finetune` recognises its own earlier output: the Trainer's checkpoints count as its own as they are written.
# Where the final model (and the merged one) is written before it is moved into the output, its files recorded first.
STAGING_DIR = ".saving"
RUN_MANIFEST = Manifest("finetune_run.json", "diffllama finetune",
                        also_ours=rf"({CHECKPOINTS_DIR}/checkpoint-\d+|{re.escape(STAGING_DIR)})/.+")
# Where a replacement run (`overwrite`) is built, beside the output; the same name in every process of a run.
REPLACEMENT_MARK = ".finetune-replacement"
# The files a Trainer checkpoint must hold to continue a run where it stopped (trainer_state.json included).
RESUME_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


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
    with warnings.catch_warnings():  # PEFT still reads the attribute transformers 5 renamed to is_activation_...
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def held_out_loss(model, blocks: PackedBlocks, *, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token loss over every predicted token of the held-out blocks (exp of it is the perplexity).

    Summed per batch and divided once, so a smaller last batch weighs by its tokens, not as a whole batch.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for start in logging.tqdm(starts, desc="Scoring held-out blocks", unit="batch", disable=not progress):
        input_ids = blocks.blocks[start : start + batch_size].to(device)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        predicted = input_ids.shape[0] * (input_ids.shape[1] - 1)  # the first token of a block is never predicted
        total += loss.float().item() * predicted
        count += predicted
    model.train(was_training)
    return total / count


def _loss_curve(log_history: list[dict]) -> list[dict]:
    return [{"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
            for entry in log_history if "loss" in entry]


def _missing_state(checkpoint: Path) -> list[str]:
    """What `checkpoint` lacks to continue a run where it stopped (a kill during its save leaves it incomplete)."""
    missing = [name for name in RESUME_FILES if not (checkpoint / name).is_file()]
    if not missing:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        except (ValueError, KeyError, TypeError):
            missing = ["a readable trainer_state.json"]
    return missing


def _checkpoints_newest_first(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    found = [path for path in checkpoints.glob("checkpoint-*") if path.is_dir() and path.name[11:].isdigit()]
    return sorted(found, key=lambda path: int(path.name[11:]), reverse=True)


def newest_complete_checkpoint(checkpoints: Path) -> Path | None:
    return next((path for path in _checkpoints_newest_first(checkpoints) if not _missing_state(path)), None)


def _resume_checkpoint(resume: bool | str, checkpoints: Path) -> str | None:
    """The checkpoint to continue from: the one given, or the newest complete one in `checkpoints` (a newer one that
    a kill left incomplete is skipped, with a warning). Refused unless it holds the state that makes it a
    continuation."""
    if not resume:
        return None
    if resume is not True:
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"checkpoint {resume} does not exist")
        missing = _missing_state(Path(resume))
        if missing:
            newest = newest_complete_checkpoint(Path(resume).parent)
            instead = f"resume from {newest} instead, or " if newest is not None else ""
            raise FileNotFoundError(
                f"checkpoint {resume} lacks {', '.join(missing)}: resuming would silently restart the optimizer or the "
                f"learning-rate schedule; {instead}start a new run"
            )
        return str(resume)
    newest = _checkpoints_newest_first(checkpoints)
    if not newest:
        raise FileNotFoundError(f"nothing to resume: no checkpoint-* folder in {checkpoints}")
    missing = {path: _missing_state(path) for path in newest}
    complete = next((path for path in newest if not missing[path]), None)
    if complete is None:
        raise FileNotFoundError(
            f"nothing to resume: no checkpoint in {checkpoints} is complete ({newest[0].name} lacks "
            f"{', '.join(missing[newest[0]])}); start a new run with --overwrite"
        )
    for skipped in newest[: newest.index(complete)]:
        logger.warning(f"{skipped.name} is incomplete (it lacks {', '.join(missing[skipped])}, as when a run "
                       f"is killed while saving): resuming from {complete.name}")
    return str(complete)


def _disk_full(error: BaseException) -> bool:
    """Whether `error` is a write that failed for lack of space: an OSError, or torch.save's RuntimeError (its zip
    writer reports a short write as "unexpected pos ...")."""
    if isinstance(error, OSError):
        return outputs.disk_full(error)
    text = str(error)
    return "unexpected pos" in text or "No space left" in text or "file write failed" in text


def _check_resumed_run(output: Path, facts: dict) -> None:
    """Refuse to continue an earlier run with another model, mode or objective: its checkpoint would be loaded onto
    a model it was not trained for (or fail inside the optimizer)."""
    recorded = RUN_MANIFEST.read(output) or {}
    differing = [f"{name}: the run has {recorded[name]!r}, this command {facts[name]!r}"
                 for name in ("model", "mode", "dpo") if name in recorded and recorded[name] != facts[name]]
    if differing:
        raise ValueError(
            f"--resume continues the run in {output}, which differs from this command ({'; '.join(differing)}): "
            "pass the run's own options, or start a new run in another --output"
        )


def resolve_model(model: str | Path) -> str:
    """An absolute folder path, or a Hub id already in the local cache (downloaded when online), for `model`.

    An adapter records its base model by this name, so the path must resolve from any working folder; and a name
    that is neither a folder nor a known Hub id is refused at once, not after the Hub client's retries.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.is_file():
        raise FileNotFoundError(f"model {model} is a file: pass the folder that holds the model's config.json")
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot_download(repo_id=text, local_files_only=True)
            return text
        except LocalEntryNotFoundError:
            if not _hub_offline():
                return text  # transformers downloads it
        except ValueError:
            pass
    raise FileNotFoundError(
        f"model folder {model} does not exist"
        + (" and is not a Hub id in the local cache" if looks_like_hub_id else "")
        + ": pass the folder a conversion wrote (e.g. out/SmolLM2-135M-Instruct-v2) or a downloaded model"
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_output(output: Path, *, model: str, resume: bool | str, overwrite: bool) -> bool:
    """Refuse an output that would overwrite the model, the current folder or files `finetune` did not write.

    An earlier run's output is continued with `resume`, or replaced with `overwrite` (a new run built beside it,
    `replacement_folder`, and swapped in when complete); returns whether it is to be replaced. Nothing is changed
    here, so every process of a multi-process run can check first.
    """
    real = output.resolve()
    if Path(model).is_dir():
        model_folder = Path(model).resolve()
        for relation, holds in (("is", real == model_folder), ("lies inside", inside(real, model_folder)),
                                ("contains", inside(model_folder, real))):
            if holds:
                raise ValueError(
                    f"output {output} {relation} the model folder {model}: the run would write over the model it "
                    "trains; choose a separate folder, e.g. runs/NAME"
                )
    if inside(Path.cwd().resolve(), real):
        raise ValueError(f"output {output} is the current folder or one above it: choose a new folder, e.g. runs/NAME")
    if not real.is_dir() or not any(real.iterdir()):
        return False
    foreign = RUN_MANIFEST.foreign_files(real)
    if foreign is None or foreign:
        names = [p.relative_to(real).as_posix() for p in sorted(real.iterdir())] if foreign is None else foreign
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(
            f"output {output} holds files finetune did not write ({listed}): choose a new or empty folder; "
            "nothing was changed"
        )
    if resume:
        return False
    if not overwrite:
        raise ValueError(
            f"output {output} holds an earlier run: pass --resume to continue it or --overwrite to replace it"
        )
    return True


def replacement_folder(output: Path) -> Path:
    """Where a run that replaces `output` is built: beside it, swapped in by `outputs.move_into_place` when complete."""
    return output.parent / f".{output.name}{REPLACEMENT_MARK}"


def clear_unfinished_replacement(folder: Path) -> None:
    """Remove what an interrupted replacement run left in `folder` (only if all of it is finetune's own)."""
    if not folder.exists():
        return
    foreign = RUN_MANIFEST.foreign_files(folder)
    if foreign is None:  # not started writing: at most the empty folders the Trainer made
        foreign = files_under(folder)
    if foreign:
        raise ValueError(
            f"{folder}, where a replacement run is built, holds files finetune did not write: move them and run again"
        )
    logger.warning(f"removing {folder}, an unfinished replacement run")
    shutil.rmtree(folder)


class WarmupAboveZero:
    """A Trainer mixin: warm-up step s of W runs at (s + 1)/(W + 1) of the peak rate, then the cosine decay to zero.
    transformers' warm-up starts at 0, so its first step would change nothing."""

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.args.lr_scheduler_type != "cosine":  # another schedule asked for through training_args
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                progress = (step - warmup) / max(1, num_training_steps - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True  # as the Trainer's own: rebuilt if train() is called again
        return self.lr_scheduler


class RecipeTrainer(WarmupAboveZero, Trainer):
    """The Trainer of the code recipe; datasets train on TRL's trainers with the same mixin (`instruct.trl_trainer`)."""


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name.replace('_', '-')} ({value}) must be at least 1")


def finetune(
    *,
    model: str | Path,
    output: str | Path,
    data: str | Path | None = None,
    mode: str = "lora",
    dpo: bool = False,
    dpo_beta: float = 0.1,
    packing: bool = False,
    steps: int = 200,
    block_size: int = 512,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    eval_fraction: float = 0.05,
    max_train_tokens: int | None = None,
    eval_tokens: int = 20_480,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    second_maps: str = "lora",
    gradient_checkpointing: bool = False,
    bf16: bool = False,
    save_steps: int = 100,
    log_every: int | None = None,
    resume: bool | str = False,
    overwrite: bool = False,
    merge: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    training_args: dict | None = None,
) -> dict:
    """Fine-tune a causal LM on code and write the model (or adapter), its tokenizer and `metrics.json` to `output`.

    Args:
        model: folder (or Hub id in the local cache) of a DiffLlama or Llama checkpoint with its tokenizer.
        output: folder for the result, new or empty (or an earlier run's, with resume or overwrite); checkpoints
            go to `output/checkpoints`.
        data: folder of .py files, or a dataset (JSON, JSONL or Parquet file, save_to_disk folder, Hub id) with
            text, messages, prompt + completion, or prompt + chosen + rejected columns, trained through TRL with the
            loss on the answers only (finetune.instruct); default: this Python's standard library.
        mode: "lora" (adapter from finetune.lora.lora_config, λ and head-norm gains trained in full) or "full".
        dpo: preference tuning (TRL's DPO) on a prompt/chosen/rejected dataset; the reference model is the model
            as loaded (LoRA: the base with the adapter disabled).
        dpo_beta: DPO's β, how far the policy may move from the reference.
        packing: datasets: pack examples into blocks of block_size, each attending only to itself (code is always
            packed).
        steps: optimizer steps.
        block_size: tokens per packed training block (datasets: the longest example, longer ones truncated).
        batch_size: blocks (or examples) per device batch.
        gradient_accumulation_steps: batches per optimizer step.
        learning_rate: peak learning rate; default 2e-4 for LoRA, 5e-5 for full fine-tuning.
        warmup_steps: linear warm-up (its first step at 1/(W+1) of the peak) before the cosine decay; default 5% of the steps.
        weight_decay: AdamW weight decay.
        eval_fraction: share of the files held out for perplexity, chosen by a hash of each path.
        max_train_tokens: training-token budget read from the files; default: what the steps consume, one epoch.
            Code folders only.
        eval_tokens: held-out tokens scored before and after training (default 20,480, 40 blocks of 512); datasets:
            at most eval_tokens // block_size held-out examples.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; default 2·rank.
        lora_dropout: LoRA dropout.
        second_maps: "lora" or "full": how a widened conversion's second-map projections train (finetune.lora).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        bf16: bfloat16 mixed precision.
        save_steps: checkpoint every this many steps (the last two are kept).
        log_every: log the training loss every this many steps; default steps/100, at least 1.
        resume: True to continue from the last checkpoint in output/checkpoints, or a checkpoint folder.
        overwrite: replace an earlier run's output in `output` (only the files that run wrote).
        merge: LoRA only: also write the merged plain model to output/merged.
        seed: seed for LoRA initialisation, data order and dropout.
        attn_implementation: "eager", "sdpa" or "flash_attention_2"; default: the model's.
        trust_remote_code: allow a checkpoint's own code for a model type this install does not know.
        training_args: extra `TrainingArguments` fields, overriding the recipe's.

    Returns the metrics written to `output/metrics.json`.
    """
    started = time.perf_counter()
    phases = {}  # seconds per phase, logged as each ends and kept in the metrics

    def phase_done(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 2)
        logger.info(f"{name.replace('_', ' ')}: {phases[name]:.1f} s")
        return now

    output = Path(output).expanduser().absolute()
    data = default_data_dir() if data is None else Path(data)
    _check_positive(
        steps=steps,
        batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        eval_tokens=eval_tokens,
        max_train_tokens=max_train_tokens,
        lora_r=lora_r,
        save_steps=save_steps,
        log_every=log_every,
    )
    _check_positive(lora_alpha=lora_alpha)
    if warmup_steps is not None and warmup_steps < 0:
        raise ValueError(f"warmup-steps ({warmup_steps}) must be 0 or more")
    if block_size < 2:
        raise ValueError(f"block-size ({block_size}) must be at least 2: a block predicts each token from the last")
    if eval_tokens < block_size:
        raise ValueError(f"eval-tokens ({eval_tokens}) must be at least one block (block-size {block_size})")
    if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning-rate ({learning_rate}) must be a positive number, e.g. 2e-4")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora-dropout ({lora_dropout}) must lie in [0, 1)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight-decay ({weight_decay}) must be a number >= 0, e.g. 0.01")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval-fraction ({eval_fraction}) must lie strictly between 0 and 1, e.g. 0.05")
    if merge and mode != "lora":
        raise ValueError("merge applies to LoRA training only; full fine-tuning already writes a plain model")
    uses_dataset = instruct.is_dataset(data)
    for flag, given in (("--dpo", dpo), ("--packing", packing)):
        if given and not uses_dataset:
            raise ValueError(f"{flag} applies to a dataset (a JSON, JSONL or Parquet file or a saved dataset), not to "
                             f"the folder of .py files {data}")
    if dpo and packing:
        raise ValueError("--packing applies to instruction data, not to --dpo's preference pairs")
    if not (math.isfinite(dpo_beta) and dpo_beta > 0):
        raise ValueError(f"dpo-beta ({dpo_beta}) must be a positive number, e.g. 0.1")
    model = resolve_model(model)
    outputs.recover(output)  # an earlier replacement killed between its two renames
    replacing = check_output(output, model=model, resume=resume, overwrite=overwrite)
    final_output = output
    if replacing:  # the earlier run stays untouched until the new one is complete
        output = replacement_folder(final_output)
    checkpoints = output / CHECKPOINTS_DIR
    facts = {"model": model, "mode": mode, "dpo": dpo, "data": str(data), "steps": steps, "block_size": block_size,
             "seed": seed}
    if resume:
        _check_resumed_run(output, facts)
    resume_from = _resume_checkpoint(resume, checkpoints)
    # One run writes an output at a time (the main process of a multi-process run holds it for all).
    holds_output = int(os.environ.get("RANK", "0")) == 0
    if holds_output:
        final_output.parent.mkdir(parents=True, exist_ok=True)
        try:
            outputs.claim(final_output, "finetune")
        except ConversionError as held:
            raise ValueError(str(held)) from None
    try:

        since = time.perf_counter()
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
        refused = _foreign_code(model) if not trust_remote_code else []
        if refused:
            names = "; ".join(refused)
            logger.warning(f"{model} names its own code ({names}); it was not run: the installed classes were used")

        # Seeded before the adapter exists: LoRA's A matrices are drawn when it is built.
        torch.manual_seed(seed)
        trained = prepare_model(
            base, mode=mode, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, second_maps=second_maps
        )
        parameters = count_parameters(trained)
        logger.info(f"{mode} fine-tuning of {model}: {parameters['trainable']:,} of {parameters['total']:,} parameters")
        since = phase_done("loading_the_model", since)

        arguments = {
            "output_dir": str(checkpoints),
            "max_steps": steps,
            "per_device_train_batch_size": batch_size,
            "per_device_eval_batch_size": batch_size,
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
            "ddp_find_unused_parameters": False,  # every trained parameter takes part in every step
        }
        callbacks = dex_callbacks(trained)  # DEX's λ schedule; none for other models
        if uses_dataset:
            trainer_class, config_class = instruct.trl_trainer(dpo=dpo, schedule=WarmupAboveZero)
            arguments["max_length"] = block_size
            arguments.update({"beta": dpo_beta} if dpo else {"packing": packing, "eval_packing": False})
            args = config_class(**{**arguments, **(training_args or {})})
            dataset = instruct.build_instruction_data(
                data, eval_fraction=eval_fraction, max_eval_examples=max(1, eval_tokens // block_size), preference=dpo,
                has_chat_template=bool(tokenizer.chat_template),
            )
            examples_per_step = batch_size * gradient_accumulation_steps * args.world_size
            data_summary = {**dataset.summary(), "examples_per_step": examples_per_step}
            trainer = trainer_class(model=trained, args=args, train_dataset=dataset.train,
                                    eval_dataset=dataset.held_out, processing_class=tokenizer, callbacks=callbacks)
        else:
            args = TrainingArguments(**{**arguments, **(training_args or {})})
            # A step consumes a batch on every process: the default budget is one epoch over all of them.
            tokens_per_step = batch_size * gradient_accumulation_steps * block_size * args.world_size
            corpus = build_corpus(
                data,
                tokenizer,
                block_size=block_size,
                eval_fraction=eval_fraction,
                max_train_tokens=steps * tokens_per_step if max_train_tokens is None else max_train_tokens,
                max_eval_tokens=eval_tokens,
            )
            data_summary = {**corpus.summary(), "tokens_per_step": tokens_per_step}
            trainer = RecipeTrainer(model=trained, args=args, train_dataset=corpus.train,
                                    data_collator=default_data_collator, processing_class=tokenizer,
                                    callbacks=callbacks)
        since = phase_done("reading_the_data", since)
        main_process = trainer.is_world_process_zero()
        if main_process:
            if replacing:
                clear_unfinished_replacement(output)
            output.mkdir(parents=True, exist_ok=True)
            RUN_MANIFEST.write(output, facts, files=[])  # from here on the folder is this run's, checkpoints included

        # Measured on the model as loaded (a resumed run too), so "before" always means the starting checkpoint.
        progress = logging.is_progress_bar_enabled() and not args.disable_tqdm

        def held_out() -> dict:
            """The held-out score: next-token loss (of the answers, for instruction data), or DPO's loss and
            accuracy."""
            if not uses_dataset:
                return {"loss": held_out_loss(trained, corpus.held_out, batch_size=batch_size, progress=progress)}
            scores = trainer.evaluate()
            if dpo:
                return {"dpo_loss": scores["eval_loss"], "reward_accuracy": scores["eval_rewards/accuracies"]}
            return {"loss": scores["eval_loss"]}

        def report(scores: dict, when: str) -> None:
            if dpo:
                logger.info(f"held-out DPO loss {when}: {scores['dpo_loss']:.4f}, "
                            f"reward accuracy {scores['reward_accuracy']:.3f}")
            else:
                logger.info(f"held-out perplexity {when}: {math.exp(scores['loss']):.3f}")

        before = held_out()
        report(before, "before training")
        since = phase_done("scoring_before", since)
        try:
            train_output = trainer.train(resume_from_checkpoint=resume_from)
        except KeyboardInterrupt:
            if replacing:
                raise KeyboardInterrupt(
                    f"interrupted: the earlier run in {final_output} is unchanged; the unfinished replacement in {output} "
                    "is removed by the next --overwrite"
                ) from None
            kept = newest_complete_checkpoint(checkpoints)
            raise KeyboardInterrupt(
                f"interrupted at step {trainer.state.global_step}: {kept} is the newest complete checkpoint; continue "
                "with --resume" if kept is not None else
                f"interrupted at step {trainer.state.global_step}, before a complete checkpoint: start again with "
                "--overwrite"
            ) from None
        except (OSError, RuntimeError) as error:
            if not _disk_full(error):
                raise
            partial = checkpoints / f"checkpoint-{trainer.state.global_step}"
            if partial.is_dir() and partial != newest_complete_checkpoint(checkpoints) and main_process:
                shutil.rmtree(partial, ignore_errors=True)  # the checkpoint being written when the disk filled
            kept = newest_complete_checkpoint(checkpoints)
            raise OSError(
                errno.ENOSPC,
                f"no space left on the disk of {output} while saving step {trainer.state.global_step}'s checkpoint "
                f"(the partial one was removed); free space, then continue from {kept} with --resume" if kept else
                f"no space left on the disk of {output} while saving the first checkpoint (the partial one was "
                "removed); free space and start again with --overwrite",
            ) from error
        since = phase_done("training", since)
        after = held_out()
        report(after, f"after {trainer.state.global_step} steps")
        since = phase_done("scoring_after", since)

        # Through the Trainer: it gathers FSDP-sharded weights first, and only the main process writes. A LoRA PeftModel
        # writes its adapter, a full model its weights and config; the tokenizer is the Trainer's processing_class.
        # Written to a staging folder the manifest claims, then recorded and moved up: a run killed at any point of
        # its save leaves only files the manifest covers, so --resume and --overwrite still accept the folder.
        staging = output / STAGING_DIR
        trainer.save_model(str(staging))
        if merge and main_process:
            merged = trained.merge_and_unload()
            _drop_foreign_code(merged.config)
            merged.save_pretrained(staging / MERGED_DIR)
            tokenizer.save_pretrained(staging / MERGED_DIR)
        if main_process:
            saved = files_under(staging)
            RUN_MANIFEST.write(output, facts, files=[*saved, METRICS_FILE, "README.md"])
            for name in saved:
                (output / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, output / name)
            shutil.rmtree(staging)
            if merge:
                logger.info(f"wrote the merged model (adapter folded into the weights) to {final_output / MERGED_DIR}")
        since = phase_done("saving", since)

        metrics = {
            "model": str(model),
            "model_type": base.config.model_type,
            "mode": mode,
            "data": str(data),
            "steps": trainer.state.global_step,
            "resumed_from": resume_from,
            "block_size": block_size,
            "parameters": parameters,
            **data_summary,
            **{f"held_out_{name}_{when}": value for when, scores in (("before", before), ("after", after))
               for name, value in scores.items()},
            **({} if dpo else {"held_out_perplexity_before": math.exp(before["loss"]),
                               "held_out_perplexity_after": math.exp(after["loss"])}),
            **({"dpo_beta": dpo_beta, "reference_model": _reference_model(trainer)} if dpo else {}),
            "train_loss": train_output.training_loss,
            "loss_curve": _loss_curve(trainer.state.log_history),
            "phase_seconds": phases,
            "runtime_s": time.perf_counter() - started,
        }
        if main_process:
            (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
            (output / "README.md").write_text(run_card(metrics, merged=merge))  # in place of PEFT's empty template
            written = [name for name in files_under(output) if not name.startswith(f"{CHECKPOINTS_DIR}/")]
            RUN_MANIFEST.write(output, facts, files=written)
            if replacing:
                try:
                    outputs.move_into_place(output, final_output, manifest=RUN_MANIFEST)
                except ConversionError as changed:
                    raise ValueError(f"{changed} The new run is complete in {output}.") from None
                logger.info(f"replaced the earlier run in {final_output}")
            logger.info(f"wrote {final_output / METRICS_FILE}")
    finally:
        if holds_output:
            outputs.release(final_output)
    return metrics


def held_out_summary(metrics: dict) -> str:
    """The held-out result in words: perplexity before and after, or DPO's loss and reward accuracy."""
    if "held_out_dpo_loss_before" in metrics:
        return (f"Held-out DPO loss: {metrics['held_out_dpo_loss_before']:.4f} before, "
                f"{metrics['held_out_dpo_loss_after']:.4f} after; reward accuracy "
                f"{metrics['held_out_reward_accuracy_after']:.3f} after")
    answers = " of the answers" if metrics.get("data_kind") in ("prompt-completion", "messages") else ""
    return (f"Held-out perplexity{answers}: {metrics['held_out_perplexity_before']:.3f} before, "
            f"{metrics['held_out_perplexity_after']:.3f} after")


def _what_was_read(metrics: dict) -> str:
    if "data_kind" in metrics:
        return f"{metrics['train_examples']:,} {metrics['data_kind']} examples"
    return f"{metrics['train_tokens']:,} training tokens in blocks of {metrics['block_size']}"


def _reference_model(trainer) -> str:
    """What DPO compared against: TRL's reference model's class, or the PEFT base with the adapter disabled."""
    reference = trainer.ref_model
    if reference is None:
        return "the base model with the adapter disabled"
    return f"{type(reference).__module__}.{type(reference).__name__}"


def run_card(metrics: dict, *, merged: bool) -> str:
    """The run folder's README.md: what was trained on what, the held-out result, and how to load it."""
    lora = metrics["mode"] == "lora"
    diff = metrics["model_type"] == modeling_diff.DiffLlamaConfig.model_type
    what = "A LoRA adapter" if lora else "A fully fine-tuned model"
    load = "AutoPeftModelForCausalLM" if lora else "AutoModelForCausalLM"
    lines = [
        "---",
        "library_name: peft" if lora else "library_name: transformers",
        "tags:",
        "- diffllama-finetune",
        *(["- differential-attention"] if diff else []),
        "---",
        "",
        f"# {what} trained by `python -m finetune`",
        "",
        f"- Base model: `{metrics['model']}` (model type `{metrics['model_type']}`)",
        f"- Data: `{metrics['data']}`, {_what_was_read(metrics)}, {metrics['steps']} steps",
        f"- {held_out_summary(metrics)} (`metrics.json` has the loss curve and the timings)",
        "",
        "```python",
        *(["import modeling_diff  # our model type; without this package pass trust_remote_code=True"] if diff else []),
        f"from {'peft' if lora else 'transformers'} import {load}",
        "",
        f'model = {load}.from_pretrained("THIS_FOLDER")',
        "```",
    ]
    if lora:
        lines += ["", "The adapter also holds what differential attention adds, trained in full (λ, head-norm gains, "
                  "`lambda_proj` or DEX's f_D), as `modules_to_save`."
                  + (" `merged/` holds the adapter folded into the base model." if merged else "")]
    if lora and diff:
        lines += ["", f"Load it onto `{metrics['model']}`, the differential model, not onto the Llama it was "
                  "converted from: PEFT puts an adapter on any model whose layer names match, and where the shapes "
                  "match too (DEX, version 1 `paired`) it drops what the Llama lacks (λ, f_D) without an error."]
    return "\n".join(lines) + "\n"


def _foreign_code(model: str) -> list[str]:
    """The `auto_map` entries of a model folder's config that point at code other than this project's."""
    path = Path(model) / "config.json"
    try:
        auto_map = json.loads(path.read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return []
    return [f"{key} -> {value}" for key, value in auto_map.items() if AUTO_MAP.get(key) != value]


def _drop_foreign_code(config) -> None:
    """Give the merged model's config our own `auto_map` (a DiffLlama) or none (a Llama).

    An input's foreign entries must not carry over: `trust_remote_code=True` on the merged model would run code
    this project did not write.
    """
    if config.model_type == modeling_diff.DiffLlamaConfig.model_type:
        config.auto_map = dict(AUTO_MAP)
    elif getattr(config, "auto_map", None):
        delattr(config, "auto_map")
