"""Numerical robustness: long inputs in half precision, fully masked rows, properties over random configs."""

import copy
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import tiny_config
import chunked_attention
from modeling_diff import DiffLlamaAttention, DiffLlamaForCausalLM


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_4096_tokens_stays_finite(version, dtype, monkeypatch):
    # the chunks too, though half precision takes the kernel by default
    monkeypatch.setattr(DiffLlamaAttention, "chunked_dtypes", (torch.float32, dtype))
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version, max_position_embeddings=4096)).to(dtype)
    ids = torch.randint(1, 128, (1, 4096))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():  # the chunked inference path agrees with the kernel's
        inference = model(ids).logits
    assert torch.isfinite(inference).all()
    torch.testing.assert_close(inference.float(), out.logits.float(), atol=0.02, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_fully_masked_by_left_padding_give_no_nan(version, implementation, dtype):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version, attn_implementation=implementation)).to(dtype)
    ids = torch.randint(1, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # the first six query rows of sample 0 see no key at all
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), output_hidden_states=True)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_same_seed_same_model_same_output():
    def run():
        torch.manual_seed(1234)
        model = DiffLlamaForCausalLM(tiny_config()).eval()
        ids = torch.randint(1, 128, (2, 12))
        return model(ids).logits

    assert torch.equal(run(), run())


@st.composite
def configs(draw):
    version = draw(st.sampled_from([1, 2]))
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([8, 16, 24, 64, 128]))
    lambda_init = draw(st.one_of(st.none(), st.floats(0.0, 0.95), st.lists(st.floats(0.0, 0.95), min_size=2, max_size=2)))
    return tiny_config(
        diff_version=version,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=32,
        intermediate_size=48,
        lambda_init=lambda_init,
        use_head_norm=draw(st.booleans()),
        attn_implementation="eager",
    )


PROPERTY_SETTINGS = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY_SETTINGS
@given(config=configs(), seq_len=st.integers(2, 9), pad=st.integers(1, 4))
def test_properties_over_random_configs(config, seq_len, pad):
    torch.manual_seed(0)
    eager = DiffLlamaForCausalLM(config).eval()
    sdpa = copy.deepcopy(eager)
    sdpa.config._attn_implementation = "sdpa"
    ids = torch.randint(1, 128, (1, seq_len))
    full = eager(ids).logits

    torch.testing.assert_close(sdpa(ids).logits, full, atol=1e-5, rtol=1e-5)  # eager equals SDPA
    with torch.no_grad(), mock.patch.object(chunked_attention, "CHUNK_ROW_BYTES", 1):  # and its chunks of one token
        torch.testing.assert_close(sdpa(ids).logits, full, atol=1e-5, rtol=1e-5)

    prefix = eager(ids[:, :-1], use_cache=True)  # cached decoding equals the full forward
    step = eager(ids[:, -1:], cache=prefix.cache).logits[:, -1]
    torch.testing.assert_close(step, full[:, -1], atol=1e-5, rtol=1e-5)

    padded_ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)  # padded equals unpadded
    mask = (padded_ids != 0).long()
    mask[:, pad:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for model in (eager, sdpa):
        padded = model(padded_ids, attention_mask=mask, position_ids=positions).logits[:, pad:]
        torch.testing.assert_close(padded, full, atol=1e-5, rtol=1e-5)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs())
def test_save_reload_is_bit_exact_over_random_configs(tmp_path_factory, config):
    folder = tmp_path_factory.mktemp("model")
    model = DiffLlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.randint(1, 128, (1, 6))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
