"""LoRA defaults for DiffLlama: which modules get adapters and which are trained and saved whole.

PEFT knows Llama's module names, and ours are Llama's, but two things a converted DiffLlama must learn are
invisible to it:

- the parameters differential attention adds, which no LoRA target covers: version 1's λ vectors
  (`self_attn.lambdas`) and head-norm gains (`self_attn.head_norm`), version 2's `self_attn.lambda_proj`. Left to
  PEFT's defaults they stay frozen at their conversion values and are missing from the adapter, so a reloaded
  adapter would silently run with the base model's λ. Here they go into `modules_to_save`: trained in full (they
  are tiny) and written to, and restored from, `adapter_model.safetensors`.
- the second softmax map of a widened conversion. Its query and key rows (and, in version 1, the second value
  half) are rows of `q_proj`, `k_proj` and `v_proj`, not modules of their own. By default (`second_maps="lora"`)
  all four attention projections carry LoRA adapters, so the second map's rows get their own rows of `lora_B`
  and move independently of the first map's, at LoRA's cost. `second_maps="full"` trains the projections the
  widening changed (version 1: `q_proj`, `k_proj`, `v_proj`, `o_proj`; version 2: `q_proj`) in full through
  `modules_to_save` instead, for second maps that start random and need more than a rank-r update; the adapter
  then holds those projections whole.

Importing this module registers `diff_llama` in PEFT's own default-target mappings, so `LoraConfig()` without
`target_modules` works on a DiffLlama; only `lora_config` (or `modules_to_save=diff_modules_to_save(config)`)
also trains and saves the differential parameters, because PEFT has no per-model default for `modules_to_save`.
"""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig
from peft.utils import constants as peft_constants
from transformers import PretrainedConfig, PreTrainedModel

MODEL_TYPE = "diff_llama"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SECOND_MAP_MODES = ("lora", "full")

# Module names (suffixes, as PEFT matches them) that a widened conversion changed the shape of, per version.
_WIDENED_PROJECTIONS = {1: ("q_proj", "k_proj", "v_proj", "o_proj"), 2: ("q_proj",)}


def register_peft_defaults() -> None:
    """Register `diff_llama` in PEFT's model-type → default-target mappings (idempotent).

    Every PEFT method that has a Llama default gets it (the module names are Llama's); LoRA gets all four attention
    projections instead of Llama's `q_proj`, `v_proj`, because the second map's key rows live in `k_proj` and
    version 1's second value half is read through `o_proj`.
    """
    for name in dir(peft_constants):
        mapping = getattr(peft_constants, name)
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(mapping, dict) and "llama" in mapping:
            mapping.setdefault(MODEL_TYPE, mapping["llama"])
    # The mapping LoRA (and PEFT's mixed models) read at adapter-injection time; the other LoRA-like methods hold
    # copies made at import, which keep Llama's default.
    peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[MODEL_TYPE] = list(ATTENTION_PROJECTIONS)


def _config_of(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    return model_or_config if isinstance(model_or_config, PretrainedConfig) else model_or_config.config


def _check_second_maps(config: PretrainedConfig, second_maps: str) -> None:
    if second_maps not in SECOND_MAP_MODES:
        raise ValueError(f"second_maps must be one of {', '.join(SECOND_MAP_MODES)}, not {second_maps!r}.")
    if second_maps == "full" and config.model_type != MODEL_TYPE:
        raise ValueError(
            f"second_maps='full' needs a {MODEL_TYPE} model; a {config.model_type!r} model has no second maps."
        )
    if second_maps == "full" and config.diff_version == "dex":
        raise ValueError("second_maps='full' does not apply to a DEX model: it keeps Llama's maps and has no second ones.")


def diff_modules_to_save(
    model_or_config: PreTrainedModel | PretrainedConfig, *, second_maps: Literal["lora", "full"] = "lora"
) -> list[str]:
    """Modules a LoRA adapter must train in full and save for this model: `modules_to_save` for `LoraConfig`.

    Version 1: `lambdas` (the four λ vectors of each layer) and `head_norm` (its gains; only when the config has
    `use_head_norm`). Version 2: `lambda_proj`. DEX: `dex` (f_D, and its λ buffer). With `second_maps="full"`, also the projections a widened
    conversion changed. Empty for a model that is not a DiffLlama (a Llama baseline).
    """
    config = _config_of(model_or_config)
    _check_second_maps(config, second_maps)
    if config.model_type != MODEL_TYPE:
        return []
    if config.diff_version == 1:
        modules = ["lambdas"] + (["head_norm"] if config.use_head_norm else [])
    elif config.diff_version == "dex":
        modules = ["dex"]  # f_D and λ of each layer
    else:
        modules = ["lambda_proj"]
    if second_maps == "full":
        modules += list(_WIDENED_PROJECTIONS[config.diff_version])
    return modules


def default_target_modules(
    model_or_config: PreTrainedModel | PretrainedConfig, *, second_maps: Literal["lora", "full"] = "lora"
) -> list[str]:
    """LoRA target modules: the four attention projections, the same for a DiffLlama and a Llama baseline.

    With `second_maps="full"` the projections trained in full leave the list and the MLP projections join it, so
    the adapter still adapts every layer (version 1 widens all four attention projections).
    """
    config = _config_of(model_or_config)
    _check_second_maps(config, second_maps)
    if second_maps == "lora":
        return list(ATTENTION_PROJECTIONS)
    widened = _WIDENED_PROJECTIONS[config.diff_version]
    return [name for name in ATTENTION_PROJECTIONS if name not in widened] + list(MLP_PROJECTIONS)


def lora_config(
    model_or_config: PreTrainedModel | PretrainedConfig,
    *,
    r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
    second_maps: Literal["lora", "full"] = "lora",
    modules_to_save: list[str] | None = None,
    **kwargs,
) -> LoraConfig:
    """A causal-LM `LoraConfig` that trains and saves everything a converted DiffLlama needs to learn.

    Args:
        model_or_config: the model to adapt, or its config (a DiffLlama's or, for a baseline, a Llama's).
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator; defaults to `2·r`.
        lora_dropout: dropout on the LoRA branch.
        target_modules: LoRA targets; defaults to `default_target_modules(...)`. A list or PEFT's `"all-linear"`.
        second_maps: `"lora"` (default) adapts the second map's rows with LoRA like every other row; `"full"`
            trains the widened projections in full (see the module docstring).
        modules_to_save: extra modules to train in full and save, on top of `diff_modules_to_save(...)`.
        **kwargs: passed to `LoraConfig` (for example `rank_pattern`, `use_rslora`).
    """
    to_save = diff_modules_to_save(model_or_config, second_maps=second_maps) + list(modules_to_save or [])
    if target_modules is None:
        target_modules = default_target_modules(model_or_config, second_maps=second_maps)
    elif not isinstance(target_modules, str):
        target_modules = [name for name in target_modules if name not in to_save]
    if to_save:
        # A module wrapped by LoRA and by `modules_to_save` at once would be trained twice and saved ambiguously;
        # "all-linear" would otherwise also put an adapter on version 2's `lambda_proj`, a Linear.
        kwargs["exclude_modules"] = sorted(set(to_save) | set(kwargs.get("exclude_modules") or []))
    return LoraConfig(
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=to_save or None,
        **kwargs,
    )


register_peft_defaults()
