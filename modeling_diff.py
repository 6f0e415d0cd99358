"""DiffLlama: Llama with differential attention (arXiv 2410.05258, and its 2026 revision "DIFF V2").

Everything but the attention is Llama's own code (embeddings, RMSNorm, rotary embedding, MLP, decoder layer
forward, model forward, heads), so module names, state-dict keys outside `self_attn` and every generation and
training feature carry over unchanged.

Weight layout (a contract that conversion and interop rely on), with h = num_attention_heads,
h_kv = num_key_value_heads, d = head_dim and g = i // (h // h_kv) the key/value head of differential head i:

Version 1 (the paper): `q_proj` hidden → 2h·d, map-head 2i+s is Q_{s+1} of head i; `k_proj` hidden → 2h_kv·d,
map-head 2g+s is K_{s+1} of KV head g; `v_proj` hidden → h_kv·2d; `o_proj` h·2d → hidden; λ vectors
`lambdas.lambda_{q1,k1,q2,k2}` of size d; `head_norm` an RMS norm with gain over 2d.

Version 2: `q_proj` hidden → 2h·d as above; `k_proj`, `v_proj` hidden → h_kv·d and `o_proj` h·d → hidden, as in
Llama; `lambda_proj` hidden → h, no bias.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers import initialization as init
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

try:
    from .configuration_diff import DiffLlamaConfig
except ImportError:  # imported as a top-level module, not from a Hub snapshot
    from configuration_diff import DiffLlamaConfig


class DiffLlamaLambda(nn.Module):
    """The learned scalar λ of one version-1 layer, `exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init`.

    A module of its own (not four loose parameters on the attention) so that PEFT can train and save it through
    `modules_to_save`.
    """

    def __init__(self, head_dim: int, lambda_init: float):
        super().__init__()
        self.lambda_init = lambda_init
        self.lambda_q1 = nn.Parameter(torch.zeros(head_dim))
        self.lambda_k1 = nn.Parameter(torch.zeros(head_dim))
        self.lambda_q2 = nn.Parameter(torch.zeros(head_dim))
        self.lambda_k2 = nn.Parameter(torch.zeros(head_dim))

    def forward(self) -> torch.Tensor:
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dtype=torch.float32))
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dtype=torch.float32))
        return lambda_1 - lambda_2 + self.lambda_init

    def extra_repr(self) -> str:
        return f"head_dim={self.lambda_q1.shape[0]}, lambda_init={self.lambda_init:.4f}"


class DiffLlamaAttention(nn.Module):
    r"""Differential attention.

    Version 1, per differential head i with map width d (arXiv 2410.05258, eq. 1–3):

        head_i = (softmax(Q1 K1ᵀ/√d) − λ·softmax(Q2 K2ᵀ/√d)) V,     V of width 2d
        λ      = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init
        out_i  = (1 − λ_init)·RMSNorm(head_i)

    Version 2 (the 2026 revision), per output head i over Llama-sized keys and values:

        head_i = softmax(Q1 K_gᵀ/√d) V_g − sigmoid(W_λ x)_i·softmax(Q2 K_gᵀ/√d) V_g

    Each softmax map is one call of the configured attention function (eager, SDPA, FlashAttention-2), so the
    kernels, masks and GQA handling are transformers' own; this class only builds the maps and subtracts them.
    """

    def __init__(self, config: DiffLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.version = config.diff_version
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        self.scaling = d**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h, h_kv, bias = self.num_heads, self.num_key_value_heads, config.attention_bias

        self.q_proj = nn.Linear(config.hidden_size, 2 * h * d, bias=bias)
        if self.version == 1:
            # Each softmax call pairs h query maps with h_kv key maps.
            self.num_key_value_groups = h // h_kv
            self.k_proj = nn.Linear(config.hidden_size, 2 * h_kv * d, bias=bias)
            self.v_proj = nn.Linear(config.hidden_size, h_kv * 2 * d, bias=bias)
            self.o_proj = nn.Linear(h * 2 * d, config.hidden_size, bias=bias)
            self.lambda_init = config.lambda_init_for(layer_idx)
            self.lambdas = DiffLlamaLambda(d, self.lambda_init)
            self.head_norm = LlamaRMSNorm(2 * d, eps=config.rms_norm_eps) if config.use_head_norm else None
        else:
            # One call with the 2h map-heads: adjacent pairs (2i, 2i+1) fall in the same group of 2h // h_kv.
            self.num_key_value_groups = 2 * h // h_kv
            self.k_proj = nn.Linear(config.hidden_size, h_kv * d, bias=bias)
            self.v_proj = nn.Linear(config.hidden_size, h_kv * d, bias=bias)
            self.o_proj = nn.Linear(h * d, config.hidden_size, bias=bias)
            self.lambda_proj = nn.Linear(config.hidden_size, h, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, _ = hidden_states.shape
        cache = kwargs.pop("past_key_values", cache)  # the argument's name before transformers 5.x renamed it
        # (B, T, 2h·d) -> (B, 2h, T, d): map-head 2i+s is query map s of head i
        query = self.q_proj(hidden_states).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        # version 1: (B, 2h_kv, T, d), map-head 2g+s is key map s of KV head g; version 2: (B, h_kv, T, d)
        key = self.k_proj(hidden_states).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        # version 1: (B, h_kv, T, 2d); version 2: (B, h_kv, T, d)
        value = self.v_proj(hidden_states).view(batch, seq_len, self.num_key_value_heads, -1).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if self.version == 1:
            # (B, 2h_kv, T, d) -> (B, h_kv, T, 2d) = [K1 | K2]: the cache then holds h_kv heads for keys and
            # values alike, which static caches require.
            key = key.view(batch, self.num_key_value_heads, 2, seq_len, self.head_dim).transpose(2, 3)
            key = key.reshape(batch, self.num_key_value_heads, seq_len, 2 * self.head_dim)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attend_kwargs = dict(dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs)
        if self.version == 1:
            output, weights = self._differential_v1(attend, query, key, value, attention_mask, attend_kwargs)
        else:
            output, weights = self._differential_v2(
                attend, query, key, value, attention_mask, attend_kwargs, hidden_states
            )
        output = self.o_proj(output.reshape(batch, seq_len, -1))
        return output, weights

    def _differential_v1(self, attend, query, key, value, attention_mask, attend_kwargs):
        batch, _, seq_len, d = query.shape
        # (B, 2h, T, d) -> two (B, h, T, d) views: Q1 and Q2
        query = query.view(batch, self.num_heads, 2, seq_len, d)
        # (B, h_kv, S, 2d) -> K1 and K2, each (B, h_kv, S, d)
        key_1, key_2 = key[..., :d], key[..., d:]

        lambda_full = self.lambdas()
        # Each map: (B, T, h, 2d) = softmax(Q_s K_sᵀ/√d) V
        out_1, map_1 = self._attend_wide_value(attend, query[:, :, 0], key_1, value, attention_mask, attend_kwargs)
        out_2, map_2 = self._attend_wide_value(attend, query[:, :, 1], key_2, value, attention_mask, attend_kwargs)
        output = out_1 - lambda_full.to(out_2.dtype) * out_2  # (B, T, h, 2d)
        if self.head_norm is not None:
            output = self.head_norm(output) * (1.0 - self.lambda_init)
        weights = None if map_1 is None else map_1 - lambda_full.to(map_2.dtype) * map_2  # (B, h, T, S)
        return output, weights

    def _attend_wide_value(self, attend, query, key, value, attention_mask, attend_kwargs):
        """One softmax map applied to a value twice as wide as the query.

        CPU SDPA's fast kernel and FlashAttention-2 need equal query and value widths: with a 2d-wide value CPU SDPA
        falls back to its math kernel (measured 5.4x slower than a plain call), while two calls over the value's
        halves cost 1.96x. Eager handles any width in one pass, and CUDA SDPA's memory-efficient and cuDNN kernels
        accept the wider value, so there one call computes each map once.
        """
        implementation = self.config._attn_implementation
        if implementation in (None, "eager") or (implementation == "sdpa" and query.device.type == "cuda"):
            return attend(self, query, key, value, attention_mask, **attend_kwargs)
        d = self.head_dim
        out_a, weights = attend(self, query, key, value[..., :d], attention_mask, **attend_kwargs)
        out_b, _ = attend(self, query, key, value[..., d:], attention_mask, **attend_kwargs)
        return torch.cat((out_a, out_b), dim=-1), weights

    def _differential_v2(self, attend, query, key, value, attention_mask, attend_kwargs, hidden_states):
        batch, _, seq_len, d = query.shape
        # One call over all 2h map-heads: (B, T, 2h, d), and (B, 2h, T, S) maps for eager
        output, maps = attend(self, query, key, value, attention_mask, **attend_kwargs)
        output = output.view(batch, seq_len, self.num_heads, 2, d)  # (B, T, h, 2, d)
        lambda_full = torch.sigmoid(self.lambda_proj(hidden_states)).unsqueeze(-1)  # (B, T, h, 1)
        output = output[..., 0, :] - lambda_full * output[..., 1, :]  # (B, T, h, d)
        weights = None
        if maps is not None:
            maps = maps.view(batch, self.num_heads, 2, seq_len, -1)  # (B, h, 2, T, S)
            weights = maps[:, :, 0] - lambda_full.transpose(1, 2).to(maps.dtype) * maps[:, :, 1]
        return output, weights


class DiffLlamaDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (norms, MLP, residuals and forward) around differential attention."""

    def __init__(self, config: DiffLlamaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # not LlamaDecoderLayer's: it would build a Llama attention
        self.hidden_size = config.hidden_size
        self.self_attn = DiffLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DiffLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = DiffLlamaConfig
    config: DiffLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiffLlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False  # a 2d-wide value and the λ combination are untested there
    _supports_attention_backend = False  # only the implementations in configuration_diff.ATTENTION_IMPLEMENTATIONS
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": DiffLlamaDecoderLayer, "attentions": DiffLlamaAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DiffLlamaLambda):
            for vector in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                init.normal_(vector, mean=0.0, std=self.config.lambda_std_dev)


class DiffLlamaModel(DiffLlamaPreTrainedModel, LlamaModel):
    """Llama's decoder stack (its `forward` included) built from differential decoder layers."""

    def __init__(self, config: DiffLlamaConfig):
        PreTrainedModel.__init__(self, config)  # not LlamaModel's: it would build Llama layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DiffLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DiffLlamaForCausalLM(DiffLlamaPreTrainedModel, LlamaForCausalLM):
    """Llama's causal-LM head (its `forward`, tied embeddings and generation) on a `DiffLlamaModel`."""

    def __init__(self, config: DiffLlamaConfig):
        PreTrainedModel.__init__(self, config)  # not LlamaForCausalLM's: it would build a LlamaModel
        self.model = DiffLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class DiffLlamaForSequenceClassification(GenericForSequenceClassification, DiffLlamaPreTrainedModel): ...


class DiffLlamaForTokenClassification(GenericForTokenClassification, DiffLlamaPreTrainedModel): ...


class DiffLlamaForQuestionAnswering(GenericForQuestionAnswering, DiffLlamaPreTrainedModel): ...


AUTO_CLASSES = {
    AutoModel: DiffLlamaModel,
    AutoModelForCausalLM: DiffLlamaForCausalLM,
    AutoModelForSequenceClassification: DiffLlamaForSequenceClassification,
    AutoModelForTokenClassification: DiffLlamaForTokenClassification,
    AutoModelForQuestionAnswering: DiffLlamaForQuestionAnswering,
}
for _auto_class, _model_class in AUTO_CLASSES.items():
    # exist_ok: transformers keys its own `diffllama` by the same class name; registration is by class object,
    # so its model still loads its own checkpoints.
    _auto_class.register(DiffLlamaConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)

__all__ = [
    "DiffLlamaLambda",
    "DiffLlamaAttention",
    "DiffLlamaDecoderLayer",
    "DiffLlamaPreTrainedModel",
    "DiffLlamaModel",
    "DiffLlamaForCausalLM",
    "DiffLlamaForSequenceClassification",
    "DiffLlamaForTokenClassification",
    "DiffLlamaForQuestionAnswering",
]
