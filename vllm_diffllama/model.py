"""DiffLlama in vLLM: vLLM's Llama with differential attention, loading our checkpoints' weights as they are.

Everything but the attention is vLLM's Llama (`vllm/model_executor/models/llama.py`): its decoder layer, model,
head, weight loading (q/k/v stacked into `qkv_proj`, gate/up into `gate_up_proj`) and LoRA mapping. The attention is
built from vLLM's parallel layers and its `Attention`, so tensor parallelism, paged and prefix-cached KV, chunked
prefill, quantisation and CUDA graphs apply as to its Llama. Shapes are per token, N tokens in a batch; h, h_kv and
d as in `modeling_diff`, counted on this tensor-parallel rank:

- version 2: 2h query maps of width d over h_kv Llama-sized keys and values, one `Attention` call with 2h query
  heads, then A1 V − sigmoid(lambda_proj(x))·A2 V per head;
- version 1: each KV head caches [K1 | K2] and a 2d-wide value; query map s is widened to 2d with zeros over the
  other key map, so one `Attention` call of width 2d gives A1 V and A2 V (as `modeling_diff` does for its kernels);
  then A1 V − λ·A2 V, the per-head RMS norm and (1 − λ_init);
- DEX: Llama's attention, then O_i − λ·f_D(O_i) on the selected heads before `o_proj`.

Tensor parallelism splits heads in contiguous blocks; with num_key_value_heads divisible by the size, every block
is whole KV groups (a KV head, and both maps of each head that reads it), as `DiffLlamaConfig.check_tensor_parallel`
requires.
"""

from functools import partial

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from configuration_diff import MODEL_TYPE, DiffLlamaConfig
from modeling_diff import DiffLlamaDex, DiffLlamaLambda


class DiffLlamaAttention(nn.Module):
    r"""Differential attention of versions 1 and 2 (the formulas: `modeling_diff.DiffLlamaAttention`).

    Built by vLLM's `LlamaDecoderLayer` with the arguments it gives its own attention.
    """

    def __init__(
        self,
        config: DiffLlamaConfig,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        config.check_tensor_parallel(tp_size)
        self.version = config.diff_version
        self.num_heads = h = num_heads // tp_size
        self.head_dim = d = config.head_dim
        self.width = w = config.cache_head_dim  # one cached key or value head: 2d ([K1 | K2]) or d
        self.q_size = 2 * h * d
        self.kv_size = num_kv_heads // tp_size * w
        # q_proj's rows are the 2h maps of width d, k_proj's and v_proj's the h_kv KV heads of width w. Version 1
        # reads them as h query "heads" of width 2d ([Q1 | Q2] of a head), so both layouts stack into QKVParallelLinear
        # with one head width, and its contiguous shards are whole KV groups.
        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden_size,
            head_size=w,
            total_num_heads=2 * num_heads * d // w,
            total_num_kv_heads=num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            input_size=num_heads * w,
            output_size=hidden_size,
            bias=bias_o_proj if config.o_proj_bias is None else config.o_proj_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        # Llama's rotary embedding on every d-wide map of queries and keys
        self.rotary_emb = get_rope(
            d, max_position=max_position_embeddings, rope_parameters=config.rope_parameters, is_neox_style=True
        )
        self.attn = Attention(
            2 * h,
            w,
            d**-0.5,  # the width of one map, also when version 1 pads its queries to 2d
            num_kv_heads=num_kv_heads // tp_size,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_type=attn_type,
        )
        if self.version == 1:
            layer_idx = extract_layer_index(prefix)
            self.lambda_init = config.lambda_init_for(layer_idx)
            self.lambdas = DiffLlamaLambda(d, self.lambda_init)  # replicated: one scalar for the layer
            self.head_norm = RMSNorm(w, eps=config.rms_norm_eps) if config.use_head_norm else None
        else:  # one gate per head, its rows sharded with the heads
            self.lambda_proj = ColumnParallelLinear(
                hidden_size, num_heads, bias=False, quant_config=quant_config, prefix=f"{prefix}.lambda_proj"
            )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)  # (N, 2h·d), (N, h_kv·w) twice
        q, k = self.rotary_emb(positions, q, k)
        if self.version == 1:
            q = self._select_key_maps(q)  # (N, 2h·2d)
        output = self.attn(q, k, v).view(-1, self.num_heads, 2, self.width)  # (N, h, 2, w): A1 V and A2 V
        if self.version == 1:
            lambda_ = self.lambdas().to(output.dtype)  # a scalar
        else:
            lambda_ = torch.sigmoid(self.lambda_proj(hidden_states)[0]).unsqueeze(-1)  # (N, h, 1)
        output = output[:, :, 0] - lambda_ * output[:, :, 1]  # (N, h, w)
        if self.version == 1 and self.head_norm is not None:
            output = self.head_norm(output.reshape(-1, self.width)) * (1.0 - self.lambda_init)  # (N·h, 2d)
        output, _ = self.o_proj(output.reshape(-1, self.num_heads * self.width))
        return output

    def _select_key_maps(self, q: torch.Tensor) -> torch.Tensor:
        """(N, 2h·d) -> (N, 2h·2d): map s of each head padded with zeros where the other key map sits."""
        d = self.head_dim
        maps = q.view(-1, self.num_heads, 2, d)
        padded = q.new_zeros(maps.shape[0], self.num_heads, 2, 2, d)  # (N, h, map, key half, d)
        padded[:, :, 0, 0] = maps[:, :, 0]  # [Q1 | 0]
        padded[:, :, 1, 1] = maps[:, :, 1]  # [0 | Q2]
        return padded.view(-1, self.q_size * 2)


class DiffLlamaDexAttention(LlamaAttention):
    """vLLM's Llama attention with DEX's differencing of the selected heads' output before `o_proj`."""

    def __init__(self, config: DiffLlamaConfig, *args, prefix: str = "", bias: bool = False, **kwargs) -> None:
        if config.o_proj_bias is not None:  # Qwen2 sources: biases on q/k/v only
            kwargs["bias_o_proj"] = config.o_proj_bias
        super().__init__(config, *args, prefix=prefix, bias=bias, **kwargs)
        # The selected heads that live on this rank, numbered from its first head; a rank may hold none.
        first = get_tensor_model_parallel_rank() * self.num_heads
        heads = config.dex_heads_for(extract_layer_index(prefix))
        local = [head - first for head in heads if first <= head < first + self.num_heads]
        self.dex = DiffLlamaDex(self.head_dim, local)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output = self.attn(q, k, v).view(1, -1, self.num_heads, self.head_dim)  # (1, N, h, d)
        if self.dex.heads:
            output = self.dex(output)
        output, _ = self.o_proj(output.view(-1, self.num_heads * self.head_dim))
        return output


class DiffLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama causal LM with differential attention in every layer."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if config.model_type != MODEL_TYPE:
            raise ValueError(
                f"this checkpoint is transformers' built-in `{config.model_type}` model, whose class shares our name "
                "but not our weight layout, and vLLM cannot run it. Convert it to this project's layout first: load "
                "it with transformers' DiffLlamaForCausalLM, pass it to conversion.interop.from_builtin_diffllama, "
                "save_pretrained the result and serve that folder."
            )
        attention = DiffLlamaDexAttention if config.diff_version == "dex" else DiffLlamaAttention
        layer = partial(LlamaDecoderLayer, attn_layer_type=attention)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)
