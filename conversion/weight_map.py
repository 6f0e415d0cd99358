"""How each source tensor becomes DiffLlama tensors: target configs, the literal weight map, the attention rules.

Everything here works on real and on meta tensors alike, so the same code plans a conversion (shapes only, no
memory) and runs it, and a test can check the map at Llama-3-70B shapes for free.

Strategies, with H, H_kv, d the source's query heads, key/value heads and head width:

- `paired` (the paper's parameter matching): source heads (2i, 2i+1) become maps (Q1, Q2) of differential head i,
  KV heads (2g, 2g+1) become (K1, K2) of KV head g and together the 2d-wide value of KV head g. Under the layout
  contract of `modeling_diff` these are the source's `q_proj`, `k_proj`, `v_proj` and `o_proj` matrices unchanged;
  only the λ vectors and head norms are new. Needs even H and H_kv.
- `widened`: every source head stays a head, as map 1 of a differential head of width d; map 2 and the second half
  of each value are new, so q/k/v/o grow and any head count works.
- `v2` (the 2026 revision): source query heads become Q1, K, V and O are reused, Q2 and `lambda_proj` are new.
- `dex` (DEX, arXiv 2505.16333): q/k/v/o are copied unchanged; each layer gains f_D (a d×d map, zero) and λ (a
  buffer, zero) that difference the attention output of its heads, `O − λ·f_D(O)`. Every head of every layer is
  selected (`dex_heads=None`): the paper selects a layer-specific subset by a criterion it does not spell out in
  reproducible form, and with f_D = 0 and λ annealed from 0 training decides how much each head uses. Always exact.

`preserve` makes the converted model compute its source's function exactly at step 0 (see `AttentionRules`).
"""

import re
import zlib
from dataclasses import dataclass

import torch

try:
    from configuration_diff import DiffLlamaConfig
    from modeling_diff import DiffLlamaForCausalLM
except ImportError as error:  # the two model files live at the repository root, next to this package
    raise ImportError(
        "conversion needs `configuration_diff` and `modeling_diff` importable: install the project with "
        "`pip install -e .` or run from the repository root."
    ) from error

from .errors import ConversionError

STRATEGIES = ("widened", "paired", "v2", "dex")

# Source architecture -> its config's model_type. Each is Llama's decoder with at most biases on q/k/v added.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

# Every source key a supported checkpoint can hold -> (target key, rule). `{}` is the layer index. Rules:
# copy: unchanged; head: copied, or dropped when the embeddings are tied (the target re-ties them);
# query/key/value/output: the strategy's attention rule; drop: a buffer the model recomputes.
WEIGHT_MAP = {
    "model.embed_tokens.weight": ("model.embed_tokens.weight", "copy"),
    "model.norm.weight": ("model.norm.weight", "copy"),
    "lm_head.weight": ("lm_head.weight", "head"),
    "model.layers.{}.input_layernorm.weight": ("model.layers.{}.input_layernorm.weight", "copy"),
    "model.layers.{}.post_attention_layernorm.weight": ("model.layers.{}.post_attention_layernorm.weight", "copy"),
    "model.layers.{}.mlp.gate_proj.weight": ("model.layers.{}.mlp.gate_proj.weight", "copy"),
    "model.layers.{}.mlp.gate_proj.bias": ("model.layers.{}.mlp.gate_proj.bias", "copy"),
    "model.layers.{}.mlp.up_proj.weight": ("model.layers.{}.mlp.up_proj.weight", "copy"),
    "model.layers.{}.mlp.up_proj.bias": ("model.layers.{}.mlp.up_proj.bias", "copy"),
    "model.layers.{}.mlp.down_proj.weight": ("model.layers.{}.mlp.down_proj.weight", "copy"),
    "model.layers.{}.mlp.down_proj.bias": ("model.layers.{}.mlp.down_proj.bias", "copy"),
    "model.layers.{}.self_attn.q_proj.weight": ("model.layers.{}.self_attn.q_proj.weight", "query"),
    "model.layers.{}.self_attn.q_proj.bias": ("model.layers.{}.self_attn.q_proj.bias", "query"),
    "model.layers.{}.self_attn.k_proj.weight": ("model.layers.{}.self_attn.k_proj.weight", "key"),
    "model.layers.{}.self_attn.k_proj.bias": ("model.layers.{}.self_attn.k_proj.bias", "key"),
    "model.layers.{}.self_attn.v_proj.weight": ("model.layers.{}.self_attn.v_proj.weight", "value"),
    "model.layers.{}.self_attn.v_proj.bias": ("model.layers.{}.self_attn.v_proj.bias", "value"),
    "model.layers.{}.self_attn.o_proj.weight": ("model.layers.{}.self_attn.o_proj.weight", "output"),
    "model.layers.{}.self_attn.o_proj.bias": ("model.layers.{}.self_attn.o_proj.bias", "copy"),
    "model.layers.{}.self_attn.rotary_emb.inv_freq": (None, "drop"),
}

# Target keys no source tensor maps to, created for each layer right after its `q_proj.weight` (so they land in the
# same output shard) when the target model has them.
NEW_KEYS = {
    "model.layers.{}.self_attn.lambdas.lambda_q1": "lambda_q1",
    "model.layers.{}.self_attn.lambdas.lambda_k1": "lambda_k1",
    "model.layers.{}.self_attn.lambdas.lambda_q2": "lambda_q2",
    "model.layers.{}.self_attn.lambdas.lambda_k2": "lambda_k2",
    "model.layers.{}.self_attn.head_norm.weight": "head_norm",
    "model.layers.{}.self_attn.lambda_proj.weight": "lambda_proj",
    "model.layers.{}.self_attn.dex.weight": "dex",
    "model.layers.{}.self_attn.dex.lambda_": "dex",
}
NEW_KEYS_AFTER = "model.layers.{}.self_attn.q_proj.weight"

# How `widened` initialises map 2 (Q2, K2) and the new value half (V_new, read through o_proj's new columns O_new).
# Every option keeps `preserve` exact, because either λ = 0 or O_new = 0 hides the new parts at step 0.
#   copy:       Q2 = Q1, K2 = K1, V_new = V, O_new = 0
#   random:     Q2, K2, V_new ~ N(0, std of the source matrix), O_new = 0
#   random-out: Q2, K2 ~ N(0, std of the source matrix), V_new = 0, O_new ~ N(0, std of o_proj)
# Measured by benchmarks/convert_init.py (SmolLM2, widened --preserve, 8 AdamW steps on stdlib code, results in
# benchmarks/results/convert_init.json): held-out loss 2.979 -> copy 2.851, random-out 2.850, random 2.914 (the
# unconverted source, same recipe: 2.849). copy and random-out tie within noise and random trails; copy is the
# default because with random-out's V_new = 0 the new o_proj columns get no gradient at step 0.
WIDENED_INITS = ("copy", "random", "random-out")
DEFAULT_WIDENED_INIT = "copy"

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def split_layer_key(key: str) -> tuple[str, int | None]:
    """`model.layers.7.mlp.up_proj.weight` -> (`model.layers.{}.mlp.up_proj.weight`, 7); other keys -> (key, None)."""
    match = _LAYER_KEY.match(key)
    if match is None:
        return key, None
    return f"model.layers.{{}}.{match.group(2)}", int(match.group(1))


def architecture_of(config) -> str:
    """The source's architecture, from `architectures` or (GGUF configs have none) from its model_type."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return architectures[0]
    by_type = {model_type: name for name, model_type in SUPPORTED_ARCHITECTURES.items()}
    return by_type.get(getattr(config, "model_type", None), f"model_type {getattr(config, 'model_type', None)!r}")


def check_supported(config) -> str:
    architecture = architecture_of(config)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"unsupported source architecture {architecture}: conversion supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family decoders)."
        )
    model_type = getattr(config, "model_type", None)
    if model_type != SUPPORTED_ARCHITECTURES[architecture]:
        raise ConversionError(
            f"the source's config has model_type {model_type!r} but architectures {architecture} (model_type "
            f"{SUPPORTED_ARCHITECTURES[architecture]!r}): its fields were read as a {model_type} config. Correct "
            "whichever of the two is wrong in config.json."
        )
    return architecture


@dataclass(frozen=True)
class SourceHeads:
    """The source attention's geometry."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "SourceHeads":
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, heads, kv_heads, head_dim)


def can_preserve(strategy: str) -> bool:
    """Whether a strategy can start as exactly its source's function (`preserve`): all but `paired`."""
    return strategy != "paired"


def check_strategy(config, *, strategy: str, preserve: bool) -> None:
    """Refuse a strategy the source cannot take, with the fix."""
    if strategy not in STRATEGIES:
        raise ConversionError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    if strategy == "dex" and not preserve:
        raise ConversionError(
            "strategy 'dex' always starts as exactly its source (f_D = 0 and λ = 0; λ grows during training): "
            "drop --no-preserve."
        )
    if strategy != "paired":
        return
    source = SourceHeads.of(config)
    if source.heads % 2 or source.kv_heads % 2:
        raise ConversionError(
            f"strategy 'paired' needs even head counts, but the source has {source.heads} query heads and "
            f"{source.kv_heads} key/value heads: use --strategy widened (or v2), which works for any head count."
        )
    if preserve:
        raise ConversionError(
            "strategy 'paired' cannot preserve the source's function: one differential head cannot compute two "
            "independent softmax heads. Use --strategy widened --preserve (or v2 --preserve)."
        )


def has_attention_bias(config) -> bool:
    """Qwen2 always has q/k/v biases; Llama has them on q/k/v/o when `attention_bias` is set; Mistral never."""
    return bool(getattr(config, "attention_bias", False)) or getattr(config, "model_type", None) == "qwen2"


def target_config(config, *, strategy: str, preserve: bool, dtype: torch.dtype | None = None) -> DiffLlamaConfig:
    """The DiffLlama config of the converted model, derived field by field from the source config.

    Everything but the attention geometry carries over (vocab, widths, depth, RoPE parameters including `llama3`
    scaling, norm eps, tied embeddings, special token ids). `preserve` with `widened` sets λ_init = 0 and turns the
    head norm off: a per-token RMS norm of each head cannot equal the source's unnormalised head, and λ = 0 hides
    map 2 at step 0. The paper's defaults (λ_init schedule, head norm on) are kept otherwise.
    """
    check_strategy(config, strategy=strategy, preserve=preserve)
    source = SourceHeads.of(config)
    if strategy == "paired":
        geometry = dict(num_attention_heads=source.heads // 2, num_key_value_heads=source.kv_heads // 2)
    else:
        geometry = dict(num_attention_heads=source.heads, num_key_value_heads=source.kv_heads)
    differential = dict(diff_version={"v2": 2, "dex": "dex"}.get(strategy, 1))
    if strategy == "widened" and preserve:
        differential.update(lambda_init=0.0, use_head_norm=False)
    if dtype is None and getattr(config, "dtype", None) is not None:
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype))
    return DiffLlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        head_dim=source.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=getattr(config, "use_cache", True),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
        rope_parameters=dict(config.rope_parameters) if getattr(config, "rope_parameters", None) else None,
        attention_bias=has_attention_bias(config),
        o_proj_bias=False if getattr(config, "model_type", None) == "qwen2" else None,  # Qwen2: q/k/v biases only
        attention_dropout=getattr(config, "attention_dropout", 0.0),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        architectures=["DiffLlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        **geometry,
        **differential,
    )


def target_shapes(config: DiffLlamaConfig) -> dict[str, torch.Size]:
    """Every tensor the converted checkpoint must hold, with its shape, read off a model built on the meta device."""
    with torch.device("meta"):
        model = DiffLlamaForCausalLM(config)
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # saved once, as the embedding; loading re-ties it
    return shapes


def _generator(seed: int, key: str) -> torch.Generator:
    # One generator per target key: a tensor's values do not depend on shard order or on which keys came first.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))


class AttentionRules:
    """The strategy's rule for each attention tensor, and the initial values of the new ones.

    `preserve` designs, each exact in floating point, each leaving gradients on λ and the new parameters:

    - widened: λ_init = 0, no head norm, and λ vectors with λ_q1 = λ_q2 and λ_k1 = λ_k2, so
      λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) is exactly 0 while ∂λ/∂λ_q1 = exp(·)·λ_k1 ≠ 0. Head i then outputs
      A1·[V | V_new] and o_proj's columns for V_new are zero (or V_new is zero), which is the source head.
    - v2: Q2 = Q1 and `lambda_proj` = 0 make head i `A1 V − sigmoid(0)·A1 V = ½·A1 V` (exact: halving is exact
      and the two maps are bit-identical), and o_proj doubled restores it (exact too). λ's gradient is
      −σ'(0)·⟨∂L/∂head, A2 V⟩·x and Q2's is −½ times Q1's map gradient, both nonzero.
    """

    def __init__(
        self,
        *,
        strategy: str,
        source: SourceHeads,
        target: DiffLlamaConfig,
        preserve: bool,
        seed: int,
        widened_init: str,
    ):
        if widened_init not in WIDENED_INITS:
            raise ConversionError(f"unknown init {widened_init!r}: use one of {', '.join(WIDENED_INITS)}.")
        self.strategy = strategy
        self.source = source
        self.target = target
        self.preserve = preserve
        self.seed = seed
        self.widened_init = widened_init

    def _normal_like(self, tensor: torch.Tensor, key: str, shape, std: float | None = None) -> torch.Tensor:
        """N(0, std²) of `shape`; std defaults to the source tensor's own, so new maps start at the source's scale."""
        if tensor.device.type == "meta":
            return torch.empty(shape, dtype=tensor.dtype, device="meta")
        if std is None:
            std = tensor.float().std().item() if tensor.numel() > 1 else 0.0
        values = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=_generator(self.seed, key))
        return values.to(tensor.dtype)

    def query(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """q_proj (weight or bias): (H·d, ...) -> (2h·d, ...), map-heads (2i, 2i+1) = (Q1, Q2) of head i."""
        if self.strategy in ("paired", "dex"):
            return tensor  # paired: source heads (2i, 2i+1) already sit where Q1, Q2 of head i go; dex: Llama's
        heads, d = self.source.heads, self.source.head_dim
        q1 = tensor.reshape(heads, 1, d, *tensor.shape[1:])  # (H, 1, d, hidden) or (H, 1, d)
        if self.strategy == "v2":
            q2 = q1 if self.preserve else self._new_map(key, tensor, q1.shape, is_bias=tensor.dim() == 1)
        else:
            q2 = self._widened_map(key, tensor, q1)
        return torch.cat((q1, q2), dim=1).reshape(2 * heads * d, *tensor.shape[1:])  # (2H·d, ...)

    def key(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """k_proj: paired and v2 reuse it; widened interleaves new K2 maps, (H_kv·d, ...) -> (2H_kv·d, ...)."""
        if self.strategy != "widened":
            return tensor
        kv_heads, d = self.source.kv_heads, self.source.head_dim
        k1 = tensor.reshape(kv_heads, 1, d, *tensor.shape[1:])  # (H_kv, 1, d, ...)
        k2 = self._widened_map(key, tensor, k1)
        return torch.cat((k1, k2), dim=1).reshape(2 * kv_heads * d, *tensor.shape[1:])

    def value(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """v_proj: widened appends a new d-wide half to each KV head's value, (H_kv·d, ...) -> (H_kv·2d, ...)."""
        if self.strategy != "widened":
            return tensor
        kv_heads, d = self.source.kv_heads, self.source.head_dim
        v = tensor.reshape(kv_heads, d, *tensor.shape[1:])  # (H_kv, d, ...)
        if self.widened_init == "copy":
            v_new = v
        elif self.widened_init == "random" and tensor.dim() == 2:
            v_new = self._normal_like(tensor, key + "#new", v.shape)
        else:  # random-out, and every bias: the new half starts at zero
            v_new = torch.zeros_like(v)
        return torch.cat((v, v_new), dim=1).reshape(kv_heads * 2 * d, *tensor.shape[1:])

    def output(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """o_proj weight: widened adds columns for each head's new value half; v2 --preserve doubles it."""
        if self.strategy in ("paired", "dex"):
            return tensor
        if self.strategy == "v2":
            return tensor * 2 if self.preserve else tensor  # ×2 is exact in every float format
        heads, d = self.source.heads, self.source.head_dim
        o = tensor.reshape(tensor.shape[0], heads, d)  # (hidden, H, d)
        if self.widened_init == "random-out":
            o_new = self._normal_like(tensor, key + "#new", o.shape)
        else:
            o_new = torch.zeros_like(o)
        return torch.cat((o, o_new), dim=2).reshape(tensor.shape[0], heads * 2 * d)  # (hidden, H·2d)

    def _widened_map(self, key: str, tensor: torch.Tensor, map_1: torch.Tensor) -> torch.Tensor:
        """Map 2 of widened heads (Q2 or K2), shaped like map 1."""
        if self.widened_init == "copy":
            return map_1
        return self._new_map(key, tensor, map_1.shape, is_bias=tensor.dim() == 1)

    def _new_map(self, key: str, tensor: torch.Tensor, shape, *, is_bias: bool) -> torch.Tensor:
        # New biases start at zero, as nn.Linear biases in transformers do; new weights at the source's scale.
        if is_bias:
            return torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        return self._normal_like(tensor, key + "#new", shape)

    def new_tensor(self, role: str, key: str, shape, like: torch.Tensor) -> torch.Tensor:
        """A target tensor with no source (see NEW_KEYS), dtype and device of `like`."""
        layer_key = key.rsplit(".", 1)[0]  # λ_q1 and λ_q2 share a generator under `preserve`
        if role == "head_norm":
            return torch.ones(shape, dtype=like.dtype, device=like.device)
        if role == "dex":  # f_D = 0 and λ = 0: the source's attention output exactly
            return torch.zeros(shape, dtype=like.dtype, device=like.device)
        if role == "lambda_proj":
            if self.preserve:
                return torch.zeros(shape, dtype=like.dtype, device=like.device)
            return self._normal_like(like, key, shape, std=self.target.initializer_range)
        std = self.target.lambda_std_dev
        if self.preserve:  # λ_q1 = λ_q2 and λ_k1 = λ_k2: λ is exactly λ_init = 0
            return self._normal_like(like, f"{layer_key}.lambda_{role[-2]}", shape, std=std)
        return self._normal_like(like, key, shape, std=std)


class WeightMap:
    """Maps each source tensor to its target tensors and checks every target key is produced once, shape asserted."""

    def __init__(
        self,
        *,
        source_config,
        source_keys,
        strategy: str,
        preserve: bool,
        dtype: torch.dtype | None,
        seed: int = 0,
        widened_init: str = DEFAULT_WIDENED_INIT,
    ):
        check_supported(source_config)
        self.target_config = target_config(source_config, strategy=strategy, preserve=preserve, dtype=dtype)
        self.source = SourceHeads.of(source_config)
        self.strategy = strategy
        self.dtype = dtype
        self.rules = AttentionRules(
            strategy=strategy,
            source=self.source,
            target=self.target_config,
            preserve=preserve,
            seed=seed,
            widened_init=widened_init,
        )
        self.expected = target_shapes(self.target_config)
        self.source_keys = set(source_keys)
        self.produced: set[str] = set()
        for key in self.source_keys:
            self._lookup(key)  # an unmapped key fails before anything is written

    def _lookup(self, key: str) -> tuple[str | None, str, int | None]:
        template, layer = split_layer_key(key)
        if template not in WEIGHT_MAP:
            raise ConversionError(
                f"source tensor {key!r} has no place in a DiffLlama: the checkpoint is not a plain "
                f"{'/'.join(SUPPORTED_ARCHITECTURES)} one (adapters or extra heads must be merged or removed first)."
            )
        target, rule = WEIGHT_MAP[template]
        if layer is not None and layer >= self.target_config.num_hidden_layers:
            raise ConversionError(
                f"source tensor {key!r} is for layer {layer}, but the config has "
                f"{self.target_config.num_hidden_layers} layers: the checkpoint and its config.json disagree."
            )
        return (None if target is None else target.format(layer)), rule, layer

    def convert(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The target tensors of one source tensor (on meta too): its mapped tensor, and after a layer's
        `q_proj.weight` that layer's new tensors. Each is checked against the target model's shape."""
        target, rule, layer = self._lookup(key)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        if rule == "drop" or (rule == "head" and self.target_config.tie_word_embeddings):
            return []
        if rule in ("copy", "head"):
            out = [(target, tensor)]
        else:
            out = [(target, getattr(self.rules, rule)(target, tensor))]
        template, _ = split_layer_key(key)
        if template == NEW_KEYS_AFTER:
            for new_template, role in NEW_KEYS.items():
                new_key = new_template.format(layer)
                source_key = next((s for s, (t, _) in WEIGHT_MAP.items() if t == new_template), None)
                if new_key not in self.expected or (source_key and source_key.format(layer) in self.source_keys):
                    continue
                out.append((new_key, self.rules.new_tensor(role, new_key, self.expected[new_key], tensor)))
        for name, value in out:
            self._check(name, value)
        return [(name, value.contiguous()) for name, value in out]

    def _check(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.expected:
            raise ConversionError(f"conversion produced {key!r}, which a {self.strategy} DiffLlama does not have.")
        if key in self.produced:
            raise ConversionError(f"{key!r} was produced twice: the source holds duplicate tensors.")
        if tensor.shape != self.expected[key]:
            raise ConversionError(
                f"{key!r} has shape {tuple(tensor.shape)} but the converted model expects "
                f"{tuple(self.expected[key])}: the source's config.json does not match its weights."
            )
        self.produced.add(key)

    def check_complete(self) -> None:
        """Every target key was produced; call once all source tensors went through `convert`."""
        missing = sorted(set(self.expected) - self.produced)
        if missing:
            raise ConversionError(
                f"the source lacks tensors for {len(missing)} target keys (first: {missing[0]!r}): the checkpoint "
                "is incomplete; re-download it."
            )

    def reset(self) -> None:
        """Forget what was produced, to run the same map again (plan on meta, then convert for real)."""
        self.produced.clear()
