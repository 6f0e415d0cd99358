"""The differentiable chunked attention: gradients against eager, the plain float64 reference and finite differences;
gradient checkpointing; where the model uses it."""

import copy
from types import SimpleNamespace

import pytest
import torch

import chunked_attention
from conftest import tiny_config
from modeling_diff import DiffLlamaAttention, DiffLlamaForCausalLM
from reference import reference_v1, reference_v2

LAYOUTS = {"mha": (4, 4, 8), "gqa": (4, 2, 8), "odd-gqa": (9, 3, 16)}  # (h, h_kv, head_dim)


@pytest.fixture(autouse=True)
def _both_versions_chunked(monkeypatch):
    """Version 2 takes its one SDPA call on CPU by default (`DiffLlamaAttention.chunked_versions`); its chunks are
    supported all the same, and tested here beside version 1's."""
    monkeypatch.setattr(DiffLlamaAttention, "chunked_versions", (1, 2))


def _model(version, h, h_kv, d, implementation="sdpa", **overrides):
    config = tiny_config(
        diff_version=version, num_attention_heads=h, num_key_value_heads=h_kv, head_dim=d,
        attn_implementation=implementation, **overrides,
    )
    torch.manual_seed(0)
    model = DiffLlamaForCausalLM(config).double().train()
    with torch.no_grad():  # λ and the gains away from their init, so that every term of the gradient matters
        for name, p in model.named_parameters():
            if "lambda" in name or "head_norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _gradients(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 64])
def test_training_gradients_equal_eager(layout, version, chunk_tokens, monkeypatch, chunk_calls):
    """Every parameter's gradient (λ vectors, lambda_proj and head-norm gains included) through the chunked path, in
    chunks of 1, 3 (not dividing 11) or all tokens, equals eager's. Eager takes its softmax in float32 (as Llama's
    eager attention does) even for a float64 model, hence fp32's tolerance here and float64's against the reference
    below."""
    sdpa = _model(version, *LAYOUTS[layout])
    eager = copy.deepcopy(sdpa)
    eager.config._attn_implementation = "eager"
    per_token = sdpa.model.layers[0].self_attn.num_key_value_groups // (2 if version == 1 else 1)
    monkeypatch.setattr(chunked_attention, "CHUNK_ROW_BYTES", 8 * per_token * chunk_tokens)
    ids = torch.randint(1, 128, (2, 11))
    chunked = _gradients(sdpa, ids)
    assert chunk_calls, "the chunked path did not run"
    expected = _gradients(eager, ids)
    assert chunked.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(chunked[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    lambdas = [name for name in chunked if "lambda" in name]
    assert lambdas and all(chunked[name].abs().sum() > 0 for name in lambdas), "λ must receive gradients"


def _rotary_in_float64(seq_len, d, theta):
    """(cos, sin) as Llama's rotary embedding makes them, but in float64 (Llama's own computes them in float32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[None]  # (1, T, d)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 64])
def test_gradients_equal_plain_reference_in_float64(layout, version, chunk_tokens, monkeypatch, chunk_calls):
    """The layer's output and its gradients with respect to the input and every parameter of the layer equal those
    of the float64 reference, differentiated by autograd through its loops over heads. Version 1 without its head
    norm: that is Llama's RMSNorm, which computes in float32 (eager's comparison above covers it)."""
    model = _model(version, *LAYOUTS[layout], **({"use_head_norm": False} if version == 1 else {}))
    attention = model.model.layers[1].self_attn
    per_token = attention.num_key_value_groups // (2 if version == 1 else 1)
    monkeypatch.setattr(chunked_attention, "CHUNK_ROW_BYTES", 8 * per_token * chunk_tokens)
    theta = model.config.rope_parameters["rope_theta"]
    x = torch.randn(2, 11, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 11, model.config.hidden_size, dtype=torch.float64)
    inputs = (x, *attention.parameters())

    output, _ = attention(x, position_embeddings=_rotary_in_float64(11, attention.head_dim, theta), attention_mask=None)
    grads = torch.autograd.grad((output * weights).sum(), inputs)
    assert chunk_calls, "the chunked path did not run"
    if version == 1:
        expected = reference_v1(attention, x, theta, model.config.rms_norm_eps, differentiable=True)
    else:
        expected = reference_v2(attention, x, theta, differentiable=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=1e-10)
    names = ["input"] + [name for name, _ in attention.named_parameters()]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("version", [1, 2])
def test_gradients_pass_a_finite_difference_check(version, monkeypatch):
    """torch.autograd.gradcheck on the function itself (GQA, chunks of a few tokens, a key longer than the queries as
    from a static cache): its backward pass against numerical derivatives of its forward pass."""
    monkeypatch.setattr(chunked_attention, "CHUNK_ROW_BYTES", 8 * 2 * 3)  # 3 tokens a chunk (version 1), 1 (version 2)
    h, h_kv, d = 4, 2, 4
    key_maps, width = (2, 2 * d) if version == 1 else (1, d)
    module = SimpleNamespace(version=version, scaling=d**-0.5)
    r = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    query, key, value = r(1, 5, 2 * h, d), r(1, h_kv, 6, key_maps * d), r(1, h_kv, 6, width)
    lambda_ = r(()) if version == 1 else torch.rand(1, 5, h, 1, dtype=torch.float64, requires_grad=True)

    def run(*inputs):
        return chunked_attention.chunked_attention(module, *inputs[:3], None, inputs[3])[0]

    assert torch.autograd.gradcheck(run, (query, key, value, lambda_))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_through_the_chunks(version, use_reentrant, chunk_calls):
    """Checkpointed layers give the gradients of a plain backward pass, the chunked path running again in the
    recomputation (reentrant: the first forward runs without autograd, the recomputation with it)."""
    model = _model(version, 4, 2, 8)
    ids = torch.randint(1, 128, (2, 10))
    plain = _gradients(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    chunk_calls.clear()
    checkpointed = _gradients(model, ids)
    layers = model.config.num_hidden_layers
    assert len(chunk_calls) == 2 * layers, "each layer's attention runs forward, then again in the backward pass"
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("version", [1, 2])
def test_bf16_training_step_follows_fp32(version, chunk_calls, monkeypatch):
    """In bf16 (chunks there when `chunked_dtypes` names it) the chunks accumulate key and value gradients over
    chunks in fp32: the gradients stay near fp32's."""
    monkeypatch.setattr(DiffLlamaAttention, "chunked_dtypes", (torch.float32, torch.bfloat16))
    model = _model(version, 4, 2, 16).float()
    ids = torch.randint(1, 128, (2, 48))
    reference = _gradients(model, ids)
    half = _gradients(model.to(torch.bfloat16), ids)
    assert chunk_calls
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        error = (half[name].float() - reference[name]).norm() / reference[name].norm()
        assert error < 0.05, (name, error.item())


@pytest.mark.parametrize("version", [1, 2])
def test_padded_training_takes_the_kernel_with_eager_gradients(version, chunk_calls):
    """Outside its case (a padding mask) training takes the one-kernel path, whose gradients equal eager's too."""
    sdpa = _model(version, 4, 2, 8)
    eager = copy.deepcopy(sdpa)
    eager.config._attn_implementation = "eager"
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding: no query row without a key to see
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (sdpa, eager):
        model.zero_grad(set_to_none=True)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert not chunk_calls
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
