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

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
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
    from .chunked_attention import chunked_attention
    from .configuration_diff import DiffLlamaConfig
except ImportError:  # imported as a top-level module, not from a Hub snapshot
    from chunked_attention import chunked_attention
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
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)  # fp32 for half-precision vectors
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dtype=dtype))
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dtype=dtype))
        return lambda_1 - lambda_2 + self.lambda_init

    def extra_repr(self) -> str:
        return f"head_dim={self.lambda_q1.shape[0]}, lambda_init={self.lambda_init:.4f}"


def check_cache_width(cache, layer_idx: int, key: torch.Tensor) -> None:
    """Refuse a cache layer built ahead for keys narrower than these (a tool that sized it from head_dim, not from
    `config.cache_head_dim`: version 1 caches [K1 | K2]), instead of failing inside the cache's index_copy_."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or not getattr(layers[layer_idx], "is_initialized", False):
        return
    keys = getattr(layers[layer_idx], "keys", None)
    if keys is not None and keys.dim() == 4 and keys.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"the cache of layer {layer_idx} was built for keys {keys.shape[-1]} wide, but this model caches keys and "
            f"values {key.shape[-1]} wide (config.cache_head_dim; version 1 caches [K1 | K2] and a 2·head_dim "
            "value): size the cache from config.cache_head_dim, not head_dim."
        )


def eager_differential_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    lambda_: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The readable reference: both softmax maps of every head, A1 − λ·A2, then one product with the value.

    query (B, T, 2h, d) after rotary, map-head 2i+s being map s of head i; key (B, h_kv, S, 2d) = [K1 | K2] (version
    1) or (B, h_kv, S, d) (version 2); value (B, h_kv, S, w); attention_mask additive, (B, 1, T, S), or None;
    lambda\_ a scalar (version 1) or (B, T, h, 1) (version 2). Returns the output (B, T, h, w) and the differential
    maps (B, h, T, S). The output is computed from the returned maps, so they carry its gradient (attribution,
    `retain_grad`).
    """
    batch, seq_len, maps, d = query.shape
    h_kv, length = key.shape[1], key.shape[2]
    groups = maps // 2 // h_kv  # differential heads per KV head
    query = query.view(batch, seq_len, h_kv, groups, 2, d).permute(0, 2, 4, 3, 1, 5)  # (B, h_kv, 2, G, T, d)
    if module.version == 1:  # map s reads key map s of its KV head, (B, h_kv, 2, 1, S, d)
        key = key.view(batch, h_kv, length, 2, d).permute(0, 1, 3, 2, 4).unsqueeze(3)
    else:  # version 2: both maps read the group's one key, (B, h_kv, 1, 1, S, d)
        key = key[:, :, None, None]
    scores = torch.matmul(query, key.transpose(-1, -2)) * module.scaling  # (B, h_kv, 2, G, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, None]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=module.attention_dropout, training=module.training)
    if module.version == 2:  # λ per token and head: (B, T, h, 1) -> (B, h_kv, G, T, 1)
        lambda_ = lambda_.view(batch, seq_len, h_kv, groups, 1).permute(0, 2, 3, 1, 4)
    # A1 − λ·A2, (B, h, T, S): the tensor returned is the one the output is computed from, not a copy beside it
    maps = (probs[:, :, 0] - lambda_ * probs[:, :, 1]).view(batch, h_kv * groups, seq_len, length)
    output = torch.matmul(maps.view(batch, h_kv, groups, seq_len, length), value.unsqueeze(2))  # (B, h_kv, G, T, w)
    return output.permute(0, 3, 1, 2, 4).reshape(batch, seq_len, h_kv * groups, -1), maps


class DiffLlamaAttention(nn.Module):
    r"""Differential attention.

    Version 1, per differential head i with map width d (arXiv 2410.05258, eq. 1–3):

        head_i = (softmax(Q1 K1ᵀ/√d) − λ·softmax(Q2 K2ᵀ/√d)) V,     V of width 2d
        λ      = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init
        out_i  = (1 − λ_init)·RMSNorm(head_i)

    Version 2 (the 2026 revision), per output head i over Llama-sized keys and values:

        head_i = softmax(Q1 K_gᵀ/√d) V_g − sigmoid(W_λ x)_i·softmax(Q2 K_gᵀ/√d) V_g

    Both versions run as a single call of the configured attention function (eager, SDPA, FlashAttention-2) with
    the 2h query maps as query heads, adjacent pairs (2i, 2i+1) in the same GQA group; the two maps of each head
    are then subtracted. Masks, GQA and kernels are therefore transformers' own.

    Version 1 needs one trick to fit that call: each KV head caches its two key maps side by side, [K1 | K2] of
    width 2d, and query map s is widened to 2d with zeros over the other key map, so its dot product with that key
    is exactly Q_s·K_sᵀ and both maps read the 2d-wide value in the same pass. Query, key and value widths are then
    equal, which CPU SDPA's fast kernel, CUDA flash SDPA and FlashAttention-2 require, and no key is copied; the
    price is multiplying zeros in QKᵀ (1.7–1.8× a Llama's attention kernel on CPU, against 1.7–2.2× for four
    calls over the value's halves and 2.4–7.7× for SDPA with the wider value, `benchmarks/attention_paths.py`).

    With SDPA, two cases take a faster route to the same result:
    - version 1 in full precision on CPU over a plain causal mask (no padding, no attention dropout),
      `chunked_attention`: maps as matrix products per chunk of queries, combined before the value product, no
      zeros multiplied; differentiable, its backward pass recomputes each chunk's maps instead of keeping them
      (`chunked_versions`, `chunked_dtypes`);
    - a single new token: each KV group's query maps become that group's query rows in one SDPA call, instead of the
      `enable_gqa` call transformers would make (about 3× faster in fp32 and 10× in bf16 on CPU, 2,048 cached).
    """

    def __init__(self, config: DiffLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.version = config.diff_version
        self.num_heads = h = config.num_attention_heads
        self.num_key_value_heads = h_kv = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        self.num_key_value_groups = 2 * h // h_kv  # query maps per KV head
        self.scaling = d**-0.5  # the width of one map, also when version 1 pads queries to 2d
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        value_width = 2 * d if self.version == 1 else d
        key_maps = 2 if self.version == 1 else 1

        self.q_proj = nn.Linear(config.hidden_size, 2 * h * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, key_maps * h_kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, h_kv * value_width, bias=config.attention_bias)
        o_proj_bias = config.attention_bias if config.o_proj_bias is None else config.o_proj_bias
        self.o_proj = nn.Linear(h * value_width, config.hidden_size, bias=o_proj_bias)
        if self.version == 1:
            self.lambda_init = config.lambda_init_for(layer_idx)
            self.lambdas = DiffLlamaLambda(d, self.lambda_init)
            self.head_norm = LlamaRMSNorm(2 * d, eps=config.rms_norm_eps) if config.use_head_norm else None
        else:
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
        d = self.head_dim

        # Rotary embeddings act on every d-wide map: queries (B, T, 2h, d), keys (B, T, 2h_kv or h_kv, d). Head counts
        # come from the projections' widths, not the config: a tensor-parallel rank holds only its share of the heads.
        query = self.q_proj(hidden_states).view(batch, seq_len, -1, d)
        key = self.k_proj(hidden_states).view(batch, seq_len, -1, d)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)
        # Version 1: (B, h_kv, T, 2d) = [K1 | K2] of each KV head; version 2: (B, h_kv, T, d)
        key = key.reshape(batch, seq_len, -1, self.config.cache_head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq_len, key.shape[1], -1).transpose(1, 2)  # (B, h_kv, T, w)
        if cache is not None:
            check_cache_width(cache, self.layer_idx, key)
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        if self.version == 1:
            lambda_ = self.lambdas().to(query.dtype)  # one scalar for the layer
        else:
            lambda_ = torch.sigmoid(self.lambda_proj(hidden_states)).unsqueeze(-1)  # (B, T, h, 1): per token and head

        maps = None
        if self.config._attn_implementation == "eager":  # the maps combined, then one product with the value
            output, maps = eager_differential_attention(self, query, key, value, attention_mask, lambda_)
        elif self._runs_in_chunks(query, attention_mask):
            output, _ = chunked_attention(self, query, key, value, attention_mask, lambda_)  # (B, T, h, w)
        else:
            output = self._kernel_attention(query, key, value, attention_mask, **kwargs)
            output = output.view(batch, seq_len, -1, 2, value.shape[-1])  # the two maps of each head side by side
            output = torch.addcmul(output[..., 0, :], lambda_, output[..., 1, :], value=-1)  # A1 V − λ·A2 V
        if self.version == 1 and self.head_norm is not None:
            output = self.head_norm(output).mul_(1.0 - self.lambda_init)
        output = self.o_proj(output.reshape(batch, seq_len, -1))
        return output, maps

    def _kernel_attention(self, query, key, value, attention_mask, **kwargs) -> torch.Tensor:
        """Both maps of every head in one call of the configured attention function: (B, T, 2h, w)."""
        if self.version == 1:
            query = self._select_key_maps(query)  # (B, T, 2h, 2d)
        dropout = self.attention_dropout if self.training else 0.0
        batch, seq_len, maps, width = query.shape
        shared_mask = attention_mask is None or attention_mask.shape[1] == 1
        # (not under torch.export: its decomposition of SDPA returns strides this view cannot take)
        one_token = seq_len == 1 and not torch.compiler.is_exporting()
        if one_token and self.config._attn_implementation == "sdpa" and shared_mask:
            # One new token: the query maps of each KV group become that group's query rows, (B, h_kv, 2h/h_kv, w).
            # transformers would run SDPA with enable_gqa here, about 3× (fp32) to 10× (bf16) slower on CPU.
            rows = query.view(batch, key.shape[1], -1, width)
            output = nn.functional.scaled_dot_product_attention(
                rows, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=self.scaling
            )
            return output.view(batch, 1, maps, width)
        # get_interface, as transformers' models call it: its set_attn_implementation looks for this call
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attend(
            self, query.transpose(1, 2), key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )
        return output

    # The versions and dtypes whose CPU calls over a plain causal mask take `chunked_attention`. Version 2's chunks
    # compute the same (tested) but cost more than its one SDPA call with 2h query heads, which needs no padded
    # queries; version 1's single call would multiply zeros. In bf16 on a CPU with AMX tiles the fused kernel is
    # faster even with the zeros (prefill 1.19× a Llama's against 1.42× in chunks, training 1.07× against 1.12×);
    # on one without, chunks measured 0.75× a Llama's attention against 1.7× (docs/performance.md).
    chunked_versions = (1,)
    chunked_dtypes = (torch.float32, torch.float64)

    def _runs_in_chunks(self, query, attention_mask) -> bool:
        """Whether `chunked_attention` computes this call: CPU SDPA over a causal mask, without attention dropout
        in training, not compiled."""
        return (
            self.version in self.chunked_versions
            and query.dtype in self.chunked_dtypes
            and self.config._attn_implementation == "sdpa"
            and query.device.type == "cpu"
            and attention_mask is None
            and query.shape[1] > 1  # a single token is faster through the kernel
            and not (self.training and self.attention_dropout > 0)
            and not torch.compiler.is_compiling()
        )

    def _select_key_maps(self, query: torch.Tensor) -> torch.Tensor:
        """(B, T, 2h, d) -> (B, T, 2h, 2d): map s of each head padded with zeros where the other key map sits."""
        d = self.head_dim
        query = query.unflatten(2, (-1, 2))  # (B, T, h, 2, d)
        first = nn.functional.pad(query[..., 0, :], (0, d))  # [Q1 | 0]
        second = nn.functional.pad(query[..., 1, :], (d, 0))  # [0 | Q2]
        return torch.stack((first, second), dim=3).flatten(2, 3)


class DiffLlamaDex(nn.Module):
    """DEX's differencing of one layer's attention output: O_i ← O_i − λ·f_D(O_i) on the layer's selected heads.

    `weight` is f_D, one d×d map shared by the selected heads (zero at initialisation); `lambda_` is λ, a buffer
    set by a schedule during training (`finetune.dex.DexLambdaCallback`), not learned, and saved with the weights.
    A module of its own so that PEFT can train and save it through `modules_to_save`.
    """

    def __init__(self, head_dim: int, heads: list[int]):
        super().__init__()
        self.heads = heads
        self.weight = nn.Parameter(torch.zeros(head_dim, head_dim))
        self.register_buffer("lambda_", torch.zeros(()))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        """(B, T, h, d) -> (B, T, h, d), the selected heads differenced, the others unchanged."""
        if not self.heads:  # a layer DEX leaves as it is
            return output
        every_head = self.heads == list(range(output.shape[2]))
        selected = output if every_head else output[:, :, self.heads]  # (B, T, S, d)
        correction = nn.functional.linear(selected, self.weight) * self.lambda_.to(output.dtype)  # λ·f_D(O)
        if every_head:  # no indexing (torch.onnx exports an index_add over every index wrongly)
            return output - correction
        index = torch.tensor(self.heads, dtype=torch.long, device=output.device)
        return output.index_add(2, index, correction, alpha=-1)

    def extra_repr(self) -> str:
        return f"head_dim={self.weight.shape[0]}, heads={self.heads}"


class DiffLlamaDexAttention(LlamaAttention):
    r"""Llama's softmax attention with DEX (arXiv 2505.16333): the pretrained maps are kept, and on selected heads
    the attention output is differenced before the output projection,

        O_i = softmax(Q_i K_gᵀ/√d) V_g
        O_i ← O_i − λ·f_D(O_i)      for the heads i of `config.dex_heads_for(layer)`

    with f_D a learned d×d map initialised to zero and λ annealed from 0 while training, so a converted model is
    exactly its source at step 0. q/k/v/o are Llama's own projections, and so are the KV cache and the kernels.
    """

    def __init__(self, config: DiffLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        o_proj_bias = config.attention_bias if config.o_proj_bias is None else config.o_proj_bias
        if o_proj_bias != config.attention_bias:  # Qwen2 sources: biases on q/k/v only
            self.o_proj = nn.Linear(self.o_proj.in_features, config.hidden_size, bias=o_proj_bias)
        self.dex = DiffLlamaDex(self.head_dim, config.dex_heads_for(layer_idx))

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
        shape = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, h, T, d)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, h_kv, T, d)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)  # (B, h_kv, T, d)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        dropout = self.attention_dropout if self.training else 0.0
        output, maps = attend(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        output = self.dex(output)  # (B, T, h, d)
        return self.o_proj(output.reshape(batch, seq_len, -1)), maps


class DiffLlamaDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (norms, MLP, residuals and forward) around differential attention."""

    def __init__(self, config: DiffLlamaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # not LlamaDecoderLayer's: it would build a Llama attention
        self.hidden_size = config.hidden_size
        attention = DiffLlamaDexAttention if config.diff_version == "dex" else DiffLlamaAttention
        self.self_attn = attention(config=config, layer_idx=layer_idx)
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
    _supports_flex_attn = False  # not tested with the padded queries and the λ combination
    # Functions registered with AttentionInterface get standard shapes: 2h query maps over h_kv KV heads, equal widths
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": DiffLlamaDecoderLayer,
        "attentions": [DiffLlamaAttention, DiffLlamaDexAttention],  # a layer has one or the other
    }

    def save_pretrained(self, *args, **kwargs):
        # torch's composable wrappers (FSDP2's fully_shard, replicate) swap a module's class for a generated subclass
        # defined in torch, e.g. FSDPDiffLlamaForCausalLM. transformers' remote-code export would write that class
        # into auto_map and copy torch's FSDP sources next to ours: save as the class it was generated from.
        wrapped = type(self)
        original = next(cls for cls in wrapped.__mro__ if not cls.__module__.startswith("torch."))
        if original is wrapped:
            return super().save_pretrained(*args, **kwargs)
        self.__class__ = original
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = wrapped

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        # Before anything is sharded or loaded: a tensor-parallel size that splits a KV group cannot work.
        if distributed_config is not None and mesh_manager is not None:
            model.config.check_tensor_parallel(distributed_config.tp_size)
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DiffLlamaLambda):
            for vector in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                init.normal_(vector, mean=0.0, std=self.config.lambda_std_dev)
        if isinstance(module, DiffLlamaDex):  # exactly Llama's attention until training moves f_D and λ
            init.zeros_(module.weight)
            init.zeros_(module.lambda_)


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


class DiffLlamaForCausalLM(DiffLlamaPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    """Llama's causal-LM head (its `forward`, tied embeddings and generation) on a `DiffLlamaModel`."""

    def __init__(self, config: DiffLlamaConfig):
        PreTrainedModel.__init__(self, config)  # not LlamaForCausalLM's: it would build a LlamaModel
        self.model = DiffLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _get_static_cache_init_shape(self):
        # generate() builds a static cache ahead of the first call (chunked prefill) from head_dim; version 1 caches
        # keys and values 2·head_dim wide, as `config.cache_head_dim` says.
        shape = super()._get_static_cache_init_shape()
        return None if shape is None else (shape[0], self.config.cache_head_dim)

    def init_continuous_batching(self, *args, **kwargs):
        # The paged cache of continuous batching (generate_batch, transformers serve) takes its width from head_dim,
        # with no way to be told otherwise; version 1 would fail inside the batching thread on its first request.
        if self.config.diff_version == 1:
            raise ValueError(
                "continuous batching (generate_batch, init_continuous_batching) sizes its paged KV cache from head_dim "
                f"({self.config.head_dim}), but version 1 caches keys and values {self.config.cache_head_dim} wide "
                "(config.cache_head_dim: [K1 | K2] and the 2·head_dim value). Use generate(), with any cache class, "
                "or a version-2 model."
            )
        return super().init_continuous_batching(*args, **kwargs)


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
    "eager_differential_attention",
    "DiffLlamaAttention",
    "DiffLlamaDex",
    "DiffLlamaDexAttention",
    "DiffLlamaDecoderLayer",
    "DiffLlamaPreTrainedModel",
    "DiffLlamaModel",
    "DiffLlamaForCausalLM",
    "DiffLlamaForSequenceClassification",
    "DiffLlamaForTokenClassification",
    "DiffLlamaForQuestionAnswering",
]
