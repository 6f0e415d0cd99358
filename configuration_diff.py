"""Configuration of DiffLlama: a Llama with differential attention (arXiv 2410.05258 and its 2026 revision).

This file and `modeling_diff.py` are the code a Hub repository carries: they import only `torch`, `transformers`
and each other.
"""

import math
import re

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig
from transformers.integrations.hub_kernels import is_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

MODEL_TYPE = "diff_llama"

# Every Auto class a saved checkpoint names. A missing entry is not harmless: transformers would resolve that Auto
# class by our config's class name to its own, incompatible `diffllama` model.
AUTO_MAP = {
    "AutoConfig": "configuration_diff.DiffLlamaConfig",
    "AutoModel": "modeling_diff.DiffLlamaModel",
    "AutoModelForCausalLM": "modeling_diff.DiffLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_diff.DiffLlamaForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_diff.DiffLlamaForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_diff.DiffLlamaForQuestionAnswering",
}

# The class names a saved folder lists in `architectures`. Tools that pick a model class by that name look it up in
# `transformers` first (TRL's trainers and reference models, `transformers serve`, vLLM), and there
# `DiffLlamaForCausalLM` is the built-in, incompatible `diffllama`. Under a name transformers does not have, they fall
# back to `auto_map` (TRL, vLLM's Transformers backend) or find our vLLM plugin (`vllm_diffllama`), which registers
# it. The classes keep their names in Python; folders saved with the old names still load (by model type).
SAVED_ARCHITECTURES = {
    f"DiffLlama{head}": f"DifferentialLlama{head}"
    for head in ("Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
}

# What the model is tested with. Any other function registered with transformers' `AttentionInterface`, and any Hub
# kernel, is accepted too: the model calls it with standard shapes (queries, keys and values of equal width, 2h query
# heads over h_kv).
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def paper_lambda_init(layer_idx: int) -> float:
    """The paper's λ_init schedule, `0.8 − 0.6·exp(−0.3·l)` for the 0-based layer index l."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


@strict
class DiffLlamaConfig(LlamaConfig):
    r"""
    A [`LlamaConfig`] whose attention is differential. Every Llama field keeps its meaning, except the head fields
    below; the differential fields are new.

    Args:
        num_attention_heads (`int`, defaults to 32):
            h, the number of differential heads. Each has two query maps of width `head_dim`.
        num_key_value_heads (`int`, *optional*, defaults to `num_attention_heads`):
            h_kv, the number of key/value heads (GQA when smaller than h; h must be a multiple of it). Version 1: each
            has two key maps of width `head_dim` and a value of width `2·head_dim`. Version 2: one key and one value
            of width `head_dim`, as in Llama.
        head_dim (`int`, *optional*):
            d, the width of one softmax map's queries and keys. Defaults to `hidden_size // (2·num_attention_heads)`
            for version 1 (the paper's parameter matching) and `hidden_size // num_attention_heads` for version 2.
        diff_version (`int` or `"dex"`, defaults to 1):
            1: the paper, `(softmax(Q1 K1ᵀ/√d) − λ·softmax(Q2 K2ᵀ/√d)) V` per head with V of width 2d, a learned
            λ per layer, then a per-head RMS norm times `(1 − λ_init)`.
            2: the 2026 revision, two query heads per output head over Llama's own keys and values,
            `A1 V − sigmoid(lambda_proj(x))·A2 V`, no λ vectors and no head norm.
            "dex": DEX (arXiv 2505.16333), Llama's own attention (h heads of width d, Llama's projections) whose
            output is differenced on selected heads, `O − λ·f_D(O)`, f_D a d×d map per layer, λ a scheduled buffer.
        dex_heads (`list[list[int]]`, *optional*):
            DEX only. The heads whose output is differenced, one list per layer; `None` for every head of every layer.
        lambda_init (`float` or `list[float]`, *optional*):
            Version 1 only. λ_init, in [0, 1): `None` for the paper's schedule `0.8 − 0.6·exp(−0.3·l)` (layer index l
            from 0), one float for every layer, or a list with one value per layer.
        lambda_std_dev (`float`, defaults to 0.1):
            Version 1 only. Standard deviation of the normal initialisation of the four λ vectors.
        o_proj_bias (`bool`, *optional*):
            Whether `o_proj` has a bias. `None` follows `attention_bias`, as in Llama (biases on all four
            projections); models converted from Qwen2, whose biases sit on q/k/v only, set it to `False`.
        use_head_norm (`bool`, defaults to `True`):
            Version 1 only. The paper's per-head RMS norm (with a learnable gain) and the `(1 − λ_init)` scale after
            it. A conversion that must compute its source's function exactly at step 0 turns it off; the paper's
            ablation shows the norm matters for training from scratch, so leave it on otherwise.
    """

    model_type = MODEL_TYPE

    diff_version: int | str = 1
    dex_heads: list[list[int]] | None = None
    lambda_init: float | list[float] | None = None
    lambda_std_dev: float = 0.1
    use_head_norm: bool = True
    o_proj_bias: bool | None = None
    auto_map: dict[str, str] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            maps_per_head = 2 if self.diff_version == 1 else 1
            self.head_dim = self.hidden_size // (maps_per_head * self.num_attention_heads)
        if self.auto_map is None:  # `auto_map` arrives through kwargs when it was saved
            self.auto_map = {}
        self.auto_map = {**AUTO_MAP, **self.auto_map}
        self._check(kwargs.get("attn_implementation"))
        if "cache_head_dim" in kwargs:  # derived, not a field: a tool may have written it out
            written = kwargs.pop("cache_head_dim")
            if written != self.cache_head_dim:
                raise ValueError(
                    f"cache_head_dim is {written!r}, but it follows from diff_version ({self.diff_version!r}) and "
                    f"head_dim ({self.head_dim}): {self.cache_head_dim}. Remove it from config.json, or fix head_dim."
                )
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        """The config as saved, our classes listed in `architectures` under their saved names (`SAVED_ARCHITECTURES`)."""
        output = super().to_dict()
        if output.get("architectures"):
            output["architectures"] = [SAVED_ARCHITECTURES.get(name, name) for name in output["architectures"]]
        return output

    def _check(self, attn_implementation: str | None) -> None:
        """Refuse, with the numbers, what cannot build a working model (raised here, unwrapped, as ValueError)."""
        h, h_kv, d = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        if self.diff_version not in (1, 2, "dex"):
            raise ValueError(
                f"diff_version ({self.diff_version!r}) must be 1 (the paper), 2 (the 2026 revision) or 'dex' (DEX)."
            )
        self._check_dex_heads()
        if h <= 0 or h_kv <= 0 or h % h_kv:
            raise ValueError(
                f"num_attention_heads ({h}) must be a positive multiple of num_key_value_heads ({h_kv}): each "
                "differential head reads one key/value head."
            )
        if d <= 0 or d % 2:
            raise ValueError(
                f"head_dim ({d}) must be a positive even number (rotary embeddings rotate pairs of dimensions); "
                f"with hidden_size ({self.hidden_size}) and num_attention_heads ({h}) the default is too small, "
                "so set head_dim explicitly or use fewer heads."
            )
        if not math.isfinite(self.lambda_std_dev) or self.lambda_std_dev < 0:
            raise ValueError(f"lambda_std_dev ({self.lambda_std_dev}) must be a finite number >= 0, e.g. 0.1.")
        if isinstance(self.lambda_init, list) and len(self.lambda_init) != self.num_hidden_layers:
            raise ValueError(
                f"lambda_init has {len(self.lambda_init)} values but num_hidden_layers is {self.num_hidden_layers}: "
                "give one value per layer, a single float, or None for the paper's schedule."
            )
        for layer_idx in range(self.num_hidden_layers):
            value = self.lambda_init_for(layer_idx)
            if not 0.0 <= value < 1.0:
                raise ValueError(
                    f"lambda_init for layer {layer_idx} is {value}; it must lie in [0, 1) because the head output "
                    "is scaled by (1 - lambda_init)."
                )
        if attn_implementation is None:
            return
        if is_kernel(attn_implementation):  # a Hub kernel: transformers fetches it
            repo = re.split(r"[@:]", attn_implementation, maxsplit=1)[0]
            if not all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", part) and ".." not in part for part in repo.split("/")):
                raise ValueError(
                    f"attn_implementation {attn_implementation!r} looks like a Hub kernel (\"org/repo\"), but "
                    f"{repo!r} is not a Hub repository id (letters, digits, '-', '_', '.'; no '..'): check the name, "
                    f"or use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}."
                )
            return
        known = ("eager", *ALL_ATTENTION_FUNCTIONS.valid_keys())  # registered ones included, at the time of the call
        if attn_implementation.removeprefix("paged|") not in known:
            raise ValueError(
                f"attn_implementation {attn_implementation!r} is not supported by DiffLlama; use one of "
                f"{', '.join(ATTENTION_IMPLEMENTATIONS)}, a Hub kernel (\"org/repo\"), or register your own function "
                "under that name first with transformers.AttentionInterface.register."
            )

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Refuse a tensor-parallel size that would split a KV group across processes.

        Each process must hold whole KV groups: the h/h_kv differential heads that read one KV head, both maps of each,
        and that KV head's keys and value. Contiguous row blocks of `q_proj`, `k_proj`, `v_proj` (and version 2's
        `lambda_proj`) are exactly such groups when num_key_value_heads is divisible by the size.
        """
        h, h_kv = self.num_attention_heads, self.num_key_value_heads
        if tp_size > 1 and self.diff_version not in (1, 2):
            raise ValueError(
                f"tensor parallelism is implemented for diff_version 1 and 2, not {self.diff_version!r}; use "
                "FSDP/DDP instead."
            )
        if tp_size > 1 and h_kv % tp_size:
            raise ValueError(
                f"tensor parallelism over {tp_size} processes needs num_key_value_heads ({h_kv}) divisible by "
                f"{tp_size}: each process holds whole KV groups (a KV head, its keys and value, and the "
                f"{h // h_kv} differential heads that read it, both maps of each; num_attention_heads is {h}). "
                f"Use a tensor-parallel size that divides {h_kv}, or FSDP/DDP instead."
            )

    @property
    def cache_head_dim(self) -> int:
        """The width of one cached key or value head: 2·head_dim in version 1 (keys [K1 | K2], values 2d wide),
        head_dim in version 2. Every layer caches keys and values of shape (batch, num_key_value_heads, tokens,
        cache_head_dim); a tool that sizes a KV cache from head_dim must use this instead."""
        return 2 * self.head_dim if self.diff_version == 1 else self.head_dim

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor parallelism by KV group (see `check_tensor_parallel`): Llama's plan, whose colwise row blocks are
        whole KV groups in this layout, plus what differential attention adds. Version 1's λ vectors and head-norm
        gain are replicated, their gradients summed over the processes (each process's heads contribute a share);
        version 2's `lambda_proj` is sharded with its heads (its output rows are per head)."""
        attention = {}
        if self.diff_version == 1:
            attention["layers.*.self_attn.lambdas"] = "replicated_with_grad_allreduce"
            if self.use_head_norm:
                attention["layers.*.self_attn.head_norm"] = "replicated_with_grad_allreduce"
        elif self.diff_version == 2:
            attention["layers.*.self_attn.lambda_proj"] = "colwise"
        return {**LlamaConfig.base_model_tp_plan, **attention, **self.__dict__.get("base_model_tp_plan", {})}

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, plan: dict[str, str]) -> None:
        # transformers 5.16-5.19 (vLLM's pin) extend the plan of a config with tied embeddings by assignment; keep
        # what they add beside the plan computed above. Not serialised: transformers drops this key when saving.
        computed = type(self).base_model_tp_plan.fget(self)
        self.__dict__["base_model_tp_plan"] = {key: value for key, value in plan.items() if computed.get(key) != value}

    def _check_dex_heads(self) -> None:
        if self.dex_heads is None:
            return
        if self.diff_version != "dex":
            raise ValueError(f"dex_heads is set but diff_version is {self.diff_version!r}: it applies to 'dex' only.")
        if len(self.dex_heads) != self.num_hidden_layers:
            raise ValueError(
                f"dex_heads has {len(self.dex_heads)} lists but num_hidden_layers is {self.num_hidden_layers}: give "
                "one list of head indices per layer, or None for every head."
            )
        h = self.num_attention_heads
        for layer_idx, heads in enumerate(self.dex_heads):
            if len(set(heads)) != len(heads) or not all(0 <= head < h for head in heads):
                raise ValueError(
                    f"dex_heads of layer {layer_idx} is {heads}: head indices must be distinct and in [0, {h}) (an "
                    "empty list leaves the layer's attention as it is)."
                )

    def dex_heads_for(self, layer_idx: int) -> list[int]:
        """The heads DEX differences in one layer (sorted)."""
        if self.dex_heads is None:
            return list(range(self.num_attention_heads))
        return sorted(self.dex_heads[layer_idx])

    def validate_architecture(self):
        """Llama's check (hidden_size divisible by heads) does not apply: head_dim is set independently here."""

    def lambda_init_for(self, layer_idx: int) -> float:
        """λ_init of one layer (version 1)."""
        if self.lambda_init is None:
            return paper_lambda_init(layer_idx)
        if isinstance(self.lambda_init, list):
            return float(self.lambda_init[layer_idx])
        return float(self.lambda_init)


AutoConfig.register(MODEL_TYPE, DiffLlamaConfig, exist_ok=True)
DiffLlamaConfig.register_for_auto_class()

# Importing the config must already map it to our models: transformers resolves a config to a model by class name,
# and `DiffLlamaConfig` is also the name of its built-in, incompatible `diffllama`. When `modeling_diff` is the
# module being imported, this finds it half-built in `sys.modules` and does nothing (it registers itself when it
# finishes). The relative form also makes transformers copy `modeling_diff.py` next to this file from a Hub snapshot.
try:
    from .modeling_diff import __name__ as _modeling_module  # noqa: E402, F401
except ImportError:  # imported as a top-level module, not from a Hub snapshot
    import modeling_diff  # noqa: E402, F401
