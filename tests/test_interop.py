"""Import from and export to transformers' built-in `diffllama` and the paper's released layout."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.diffllama.modeling_diffllama import DiffLlamaForCausalLM as BuiltinDiffLlama

from conftest import tiny_config
from conversion.interop import (
    InteropError,
    from_builtin_diffllama,
    from_paper_state_dict,
    to_builtin_diffllama,
    to_paper_state_dict,
)
from modeling_diff import DiffLlamaForCausalLM
from reference import reference_paper_layout


def _randomise_lambdas(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (3, 3), (3, 1)])
def test_export_to_builtin_gives_the_same_logits_and_round_trips(tmp_path, heads, kv_heads):
    ours = _randomise_lambdas(DiffLlamaForCausalLM(tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads)))
    ours.eval()
    builtin = to_builtin_diffllama(ours).eval()
    assert type(builtin) is BuiltinDiffLlama
    assert builtin.config.num_attention_heads == 2 * heads and builtin.config.num_key_value_heads == 2 * kv_heads
    ids = torch.randint(1, 128, (2, 11))
    expected = ours(ids).logits
    torch.testing.assert_close(builtin(ids).logits, expected, atol=1e-5, rtol=1e-5)

    builtin.save_pretrained(tmp_path)  # a real diffllama checkpoint, loaded by transformers' own class
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is BuiltinDiffLlama
    back = from_builtin_diffllama(reloaded).eval()
    torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=1e-5)
    for (key, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=key)


def test_import_from_a_builtin_model():
    from transformers import DiffLlamaConfig as BuiltinConfig

    builtin = BuiltinDiffLlama(
        BuiltinConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    ).eval()
    ours = from_builtin_diffllama(builtin).eval()
    assert ours.config.num_attention_heads == 4 and ours.config.num_key_value_heads == 2
    ids = torch.randint(1, 128, (1, 9))
    torch.testing.assert_close(ours(ids).logits, builtin(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(diff_version=2), "no counterpart of diff_version=2"),
        (dict(use_head_norm=False), "use_head_norm=False"),
        (dict(lambda_init=0.5), "layer 0 has lambda_init 0.5"),
        (dict(attention_dropout=0.1), r"refuses attention_dropout \(0.1\)"),
        (dict(attention_bias=True, o_proj_bias=False), r"o_proj_bias \(False\) differs from attention_bias"),
    ],
)
def test_what_the_builtin_cannot_express_is_refused(overrides, message):
    with pytest.raises(InteropError, match=message):
        to_builtin_diffllama(DiffLlamaForCausalLM(tiny_config(**overrides)))


def test_a_trained_head_norm_gain_is_refused_not_dropped():
    model = DiffLlamaForCausalLM(tiny_config())
    with torch.no_grad():
        model.model.layers[1].self_attn.head_norm.weight[0] = 1.5
    with pytest.raises(InteropError, match="layer 1 has a trained head-norm gain"):
        to_builtin_diffllama(model)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (3, 3)])
def test_paper_layout_export_matches_an_interleaved_rope_reference_and_round_trips(heads, kv_heads):
    config = tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8)
    model = _randomise_lambdas(DiffLlamaForCausalLM(config)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.head_norm.weight.add_(0.2 * torch.randn_like(layer.self_attn.head_norm.weight))
    state = to_paper_state_dict(model)
    attention = model.model.layers[1].self_attn
    assert "model.layers.1.self_attn.out_proj.weight" in state and "model.layers.1.self_attn.subln.weight" in state
    assert "model.layers.1.self_attn.lambda_q1" in state

    x = torch.randn(2, 9, config.hidden_size)
    theta = config.rope_parameters["rope_theta"]
    expected = reference_paper_layout(
        state, "model.layers.1.self_attn.", heads, kv_heads, 8, attention.lambda_init, x, theta, config.rms_norm_eps
    )
    embeddings = model.model.rotary_emb(x, torch.arange(9)[None])
    ours, _ = attention(x, position_embeddings=embeddings, attention_mask=None)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)
    # the same weights without the rotary permutation compute something else
    assert not torch.allclose(model.model.layers[1].self_attn.q_proj.weight, state["model.layers.1.self_attn.q_proj.weight"])

    back = from_paper_state_dict(state, config).eval()
    for (key, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), key
