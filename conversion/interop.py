"""Moving weights between our layout and two others that express the same version-1 model.

transformers' built-in `diffllama` (model type `diffllama`) computes the same function with another bookkeeping:

| | ours | built-in |
|---|---|---|
| heads | h differential heads, each with 2 maps | H = 2h sub-heads |
| pairing | adjacent: map-heads (2i, 2i+1) are Q1, Q2 of head i | halves: sub-heads i and i + H/2 |
| keys | map-heads (2g, 2g+1) are K1, K2 of KV head g | KV heads g and g + H_kv/2 |
| value of KV head g | one 2d-wide head | KV heads g and g + H_kv/2, concatenated |
| head norm | RMS norm with a learnable gain (switchable) | RMS norm without gain |
| λ_init | configurable | the paper's schedule only |
| refuses | — | odd KV-head counts, attention dropout |

So a model of ours maps onto the built-in one when its head-norm gains are all one, it uses the paper's λ_init
schedule and no attention dropout; version-2 models have no built-in counterpart. Anything else is refused, with the
reason, rather than silently changed. The built-in's own refusal of odd KV-head counts never bites here: its
H_kv = 2·h_kv is even by construction.

The paper's released code (`multihead_diffattn.py`) pairs heads adjacently like we do, and names the output
projection `out_proj` and the head norm `subln`; its λ vectors sit directly on the attention module. It applies
*interleaved* (GPT-J style) rotary embeddings, rotating dimension pairs (2j, 2j+1), while Llama and this model rotate
(j, j + d/2). Converted weights therefore permute the rows of every d-wide query and key map so that each rotated
pair lands where the other convention expects it; the dot products, and so the model's function, are unchanged,
but weights copied without the permutation would compute a different (wrong) attention pattern.
"""

import torch
from transformers import DiffLlamaConfig as BuiltinDiffLlamaConfig
from transformers.models.diffllama.modeling_diffllama import DiffLlamaForCausalLM as BuiltinDiffLlamaForCausalLM

from configuration_diff import DiffLlamaConfig, paper_lambda_init
from modeling_diff import DiffLlamaForCausalLM

SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "head_dim",
    "lambda_std_dev",
)


class InteropError(ValueError):
    """A model that the other layout cannot express."""


def adjacent_to_halves(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ordered (head, map, d) -> (map, head, d): our adjacent pairing to the built-in's halves."""
    return tensor.unflatten(0, (heads, 2, -1)).transpose(0, 1).flatten(0, 2)


def halves_to_adjacent(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ordered (map, head, d) -> (head, map, d)."""
    return tensor.unflatten(0, (2, heads, -1)).transpose(0, 1).flatten(0, 2)


def _check_builtin_expressible(model: DiffLlamaForCausalLM) -> None:
    config = model.config
    if config.diff_version != 1:
        raise InteropError("transformers' diffllama has no counterpart of diff_version=2; keep this model's layout.")
    if not config.use_head_norm:
        raise InteropError("use_head_norm=False has no counterpart in transformers' diffllama, which always norms.")
    if config.o_proj_bias is not None and config.o_proj_bias != config.attention_bias:
        raise InteropError(
            f"o_proj_bias ({config.o_proj_bias}) differs from attention_bias ({config.attention_bias}); transformers' "
            "diffllama gives all four projections a bias or none."
        )
    if config.attention_dropout:
        raise InteropError(f"transformers' diffllama refuses attention_dropout ({config.attention_dropout}); set it to 0.")
    for layer_idx, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        if abs(attention.lambda_init - paper_lambda_init(layer_idx)) > 1e-12:
            raise InteropError(
                f"layer {layer_idx} has lambda_init {attention.lambda_init}; transformers' diffllama only knows the "
                f"paper's schedule ({paper_lambda_init(layer_idx):.6f} there)."
            )
        gain = attention.head_norm.weight
        if not torch.equal(gain, torch.ones_like(gain)):
            raise InteropError(
                f"layer {layer_idx} has a trained head-norm gain; transformers' diffllama has no gain to hold it. "
                "Keep this model's layout (the Auto classes load it with trust_remote_code=True)."
            )


def to_builtin_diffllama(model: DiffLlamaForCausalLM) -> BuiltinDiffLlamaForCausalLM:
    """A transformers `diffllama` model computing the same function, or `InteropError` saying why it cannot."""
    _check_builtin_expressible(model)
    config = model.config
    h, h_kv = config.num_attention_heads, config.num_key_value_heads
    builtin_config = BuiltinDiffLlamaConfig(
        num_attention_heads=2 * h, num_key_value_heads=2 * h_kv, **{f: getattr(config, f) for f in SHARED_FIELDS}
    )
    state = {}
    for key, tensor in model.state_dict().items():
        if ".self_attn." not in key:
            state[key] = tensor
        elif key.endswith("head_norm.weight"):
            continue  # all ones, checked above
        elif ".lambdas." in key:
            state[key.replace(".lambdas.", ".")] = tensor
        elif ".q_proj." in key:
            state[key] = adjacent_to_halves(tensor, h)
        elif ".k_proj." in key or ".v_proj." in key:
            state[key] = adjacent_to_halves(tensor, h_kv)
        else:  # o_proj: both layouts order its inputs by differential head, 2d each
            state[key] = tensor
    builtin = BuiltinDiffLlamaForCausalLM(builtin_config)
    _load_exactly(builtin, state)
    return builtin.to(next(model.parameters()).dtype)


def from_builtin_diffllama(model: BuiltinDiffLlamaForCausalLM) -> DiffLlamaForCausalLM:
    """Our model computing the same function as a transformers `diffllama` model (head-norm gains set to one)."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % 2 or kv_heads % 2:
        raise InteropError(
            f"num_attention_heads ({heads}) and num_key_value_heads ({kv_heads}) of a diffllama model must be even: "
            "its sub-heads pair up into differential heads."
        )
    h, h_kv = heads // 2, kv_heads // 2
    ours_config = DiffLlamaConfig(
        num_attention_heads=h, num_key_value_heads=h_kv, **{f: getattr(config, f) for f in SHARED_FIELDS}
    )
    state = {}
    for key, tensor in model.state_dict().items():
        if ".self_attn." not in key:
            state[key] = tensor
        elif key.split(".")[-1].startswith("lambda_"):
            state[key.replace(".self_attn.", ".self_attn.lambdas.")] = tensor
        elif ".q_proj." in key:
            state[key] = halves_to_adjacent(tensor, h)
        elif ".k_proj." in key or ".v_proj." in key:
            state[key] = halves_to_adjacent(tensor, h_kv)
        else:
            state[key] = tensor
    ours = DiffLlamaForCausalLM(ours_config)
    for layer in ours.model.layers:
        prefix = f"model.layers.{layer.self_attn.layer_idx}.self_attn.head_norm.weight"
        state[prefix] = torch.ones_like(layer.self_attn.head_norm.weight)
    _load_exactly(ours, state)
    return ours.to(next(model.parameters()).dtype)


def rotate_half_to_interleaved(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each d-wide map from Llama's rotary order (j, j + d/2) to the interleaved order (2j, 2j+1)."""
    return tensor.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)


def interleaved_to_rotate_half(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    return tensor.unflatten(0, (-1, head_dim // 2, 2)).transpose(1, 2).flatten(0, 2)


PAPER_NAMES = {  # our attention names -> the paper's released code
    "o_proj.": "out_proj.",
    "head_norm.": "subln.",
    "lambdas.": "",
}


def to_paper_state_dict(model: DiffLlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict with each attention layer in the paper's released layout (interleaved rotary order).

    Keys outside attention keep their names; inside, `o_proj` becomes `out_proj`, `head_norm` becomes `subln`, the λ
    vectors sit on the attention module, and query and key rows follow the interleaved rotary convention.
    """
    if model.config.diff_version != 1 or not model.config.use_head_norm:
        raise InteropError("the paper's released code has version-1 attention with its subln head norm only.")
    d = model.config.head_dim
    state = {}
    for key, tensor in model.state_dict().items():
        if ".self_attn." in key:
            if ".q_proj." in key or ".k_proj." in key:
                tensor = rotate_half_to_interleaved(tensor, d)
            for ours, paper in PAPER_NAMES.items():
                key = key.replace(f".self_attn.{ours}", f".self_attn.{paper}")
        state[key] = tensor.clone()
    return state


def from_paper_state_dict(state: dict[str, torch.Tensor], config: DiffLlamaConfig) -> DiffLlamaForCausalLM:
    """Our model from a state dict in the paper's layout (the inverse of `to_paper_state_dict`)."""
    d = config.head_dim
    ours = {}
    for key, tensor in state.items():
        if ".self_attn." in key:
            if ".q_proj." in key or ".k_proj." in key:
                tensor = interleaved_to_rotate_half(tensor, d)
            name = key.split(".self_attn.")[1]
            if name.startswith("lambda_"):
                key = key.replace(".self_attn.", ".self_attn.lambdas.")
            for mine, paper in PAPER_NAMES.items():
                if paper and name.startswith(paper):
                    key = key.replace(f".self_attn.{paper}", f".self_attn.{mine}")
        ours[key] = tensor
    model = DiffLlamaForCausalLM(config)
    _load_exactly(model, ours)
    return model


def _load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every key with its exact shape; a tied lm_head may be absent."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise InteropError(f"{key} has no place in {type(model).__name__}")
        if tensor.shape != expected[key].shape:
            raise InteropError(f"{key}: shape {tuple(tensor.shape)} where {tuple(expected[key].shape)} is expected")
    missing = set(expected) - set(state)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise InteropError(f"no weights for {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
