import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import TINY, tiny_config
import chunked_attention
from modeling_diff import DiffLlamaAttention, DiffLlamaForCausalLM
from reference import reference_v1, reference_v2

HEAD_LAYOUTS = {  # (h, h_kv, head_dim): MHA, GQA, odd head counts
    "mha": (4, 4, 8),
    "gqa": (4, 2, 8),
    "odd": (3, 3, 8),
    "odd-gqa": (9, 3, 16),
}


def _attention(version, h, h_kv, d, layer_idx=1, **overrides):
    config = tiny_config(
        diff_version=version, num_attention_heads=h, num_key_value_heads=h_kv, head_dim=d, **overrides
    )
    model = DiffLlamaForCausalLM(config)
    attention = model.model.layers[layer_idx].self_attn
    with torch.no_grad():  # move λ and the gains away from their init so that every term matters
        for name, p in attention.named_parameters():
            if "lambdas" in name or "head_norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model, attention


def _run_attention(model, attention, x):
    """The layer alone, with the causal mask in the form each implementation takes (SDPA: `is_causal`)."""
    seq_len = x.shape[1]
    embeddings = model.model.rotary_emb(x, torch.arange(seq_len)[None])
    mask = None
    if model.config._attn_implementation == "eager":
        future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(diagonal=1)
        mask = torch.zeros(1, 1, seq_len, seq_len).masked_fill(future, torch.finfo(torch.float32).min)
    output, _ = attention(x, position_embeddings=embeddings, attention_mask=mask)
    return output


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_v1_matches_plain_reference(layout, implementation):
    model, attention = _attention(1, *HEAD_LAYOUTS[layout], attn_implementation=implementation)
    x = torch.randn(2, 11, model.config.hidden_size)
    expected = reference_v1(attention, x, model.config.rope_parameters["rope_theta"], model.config.rms_norm_eps)
    torch.testing.assert_close(_run_attention(model, attention, x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_v2_matches_plain_reference(layout, implementation):
    model, attention = _attention(2, *HEAD_LAYOUTS[layout], attn_implementation=implementation)
    x = torch.randn(2, 11, model.config.hidden_size)
    expected = reference_v2(attention, x, model.config.rope_parameters["rope_theta"])
    torch.testing.assert_close(_run_attention(model, attention, x).double(), expected, atol=1e-5, rtol=1e-5)


def _maps_per_key_map(attention):
    groups = attention.num_heads // attention.num_key_value_heads
    return groups if attention.version == 1 else 2 * groups


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 64])
def test_chunked_inference_path_matches_plain_reference(layout, version, chunk_tokens, monkeypatch, chunk_calls):
    """CPU SDPA inference without a mask runs `chunked_attention` (for version 2 when `chunked_versions` says so), in
    chunks of 1, 3 (not dividing 11) or all tokens."""
    model, attention = _attention(version, *HEAD_LAYOUTS[layout], attn_implementation="sdpa")
    monkeypatch.setattr(chunked_attention, "CHUNK_ROW_BYTES", 4 * _maps_per_key_map(attention) * chunk_tokens)
    monkeypatch.setattr(DiffLlamaAttention, "chunked_versions", (1, 2))  # version 2's chunks, though not its default
    x = torch.randn(2, 11, model.config.hidden_size)
    if version == 1:
        expected = reference_v1(attention, x, model.config.rope_parameters["rope_theta"], model.config.rms_norm_eps)
    else:
        expected = reference_v2(attention, x, model.config.rope_parameters["rope_theta"])
    with torch.no_grad():
        output = _run_attention(model, attention, x)
    assert chunk_calls, "the chunked path did not run"
    torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_chunked_path_only_where_it_applies(version, chunk_calls, monkeypatch):
    """Chunks for version 1 in fp32 on CPU SDPA over a plain causal mask, with autograd too, and for version 2 when
    `chunked_versions` names it (by default its one SDPA call); the kernel for padding, eager, one token and
    attention dropout in training."""
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version)).eval()
    if version == 2:
        assert DiffLlamaAttention.chunked_versions == (1,)
        with torch.no_grad():
            model(torch.randint(1, 128, (2, 8)))
        assert not chunk_calls, "version 2 takes its SDPA call by default"
        monkeypatch.setattr(DiffLlamaAttention, "chunked_versions", (1, 2))
    ids = torch.randint(1, 128, (2, 8))
    padded = torch.ones_like(ids)
    padded[0, :3] = 0

    def chunks_used(**kwargs) -> bool:
        chunk_calls.clear()
        model(ids, **kwargs)
        return bool(chunk_calls)

    with torch.inference_mode():
        assert chunks_used() is True
    with torch.no_grad():
        assert chunks_used() is True
        assert chunks_used(attention_mask=padded) is False
        model.to(torch.bfloat16)
        assert DiffLlamaAttention.chunked_dtypes == (torch.float32, torch.float64)
        assert chunks_used() is False, "half precision takes the kernel by default"
        model.float()
        cache = model(ids, use_cache=True).cache
        chunk_calls.clear()
        model(ids[:, :1], cache=cache)
        assert not chunk_calls, "a single new token takes the packed kernel"
        model.config._attn_implementation = "eager"
        assert chunks_used() is False
        model.config._attn_implementation = "sdpa"
    assert chunks_used() is True  # autograd on: the differentiable chunks
    model.train()
    assert chunks_used() is True
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    assert chunks_used() is False  # dropout on the maps: the kernel


def test_v1_without_head_norm_matches_reference():
    model, attention = _attention(1, 4, 2, 8, use_head_norm=False, lambda_init=0.3)
    assert attention.head_norm is None
    x = torch.randn(1, 7, model.config.hidden_size)
    expected = reference_v1(attention, x, model.config.rope_parameters["rope_theta"], model.config.rms_norm_eps)
    torch.testing.assert_close(_run_attention(model, attention, x).double(), expected, atol=1e-5, rtol=1e-5)


def test_lambda_init_follows_the_paper_schedule():
    model = DiffLlamaForCausalLM(tiny_config(num_hidden_layers=4))
    inits = [layer.self_attn.lambda_init for layer in model.model.layers]
    assert inits == pytest.approx([0.2, 0.8 - 0.6 * 0.7408182, 0.8 - 0.6 * 0.5488116, 0.8 - 0.6 * 0.4065697])
    lambdas = model.model.layers[0].self_attn.lambdas
    assert lambdas.lambda_q1.std() > 0.01, "λ vectors must be initialised N(0, lambda_std_dev), not left at zero"


@pytest.mark.parametrize("version", [1, 2])
def test_eager_returns_the_differential_map(version):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version, attn_implementation="eager"))
    out = model(torch.randint(1, 128, (1, 6)), output_attentions=True)
    maps = out.attentions[0]
    assert maps.shape == (1, 4, 6, 6)
    # A1 − λ·A2: rows sum to 1 − λ (version 1, one λ per layer) and are causal
    assert torch.all(maps.triu(diagonal=1) == 0)
    if version == 1:
        lam = model.model.layers[0].self_attn.lambdas().item()
        torch.testing.assert_close(maps.sum(-1), torch.full((1, 4, 6), 1 - lam), atol=1e-5, rtol=0)


def _pair(version, padded, **overrides):
    torch.manual_seed(0)
    eager = DiffLlamaForCausalLM(tiny_config(diff_version=version, attn_implementation="eager", **overrides))
    sdpa = copy.deepcopy(eager)
    sdpa.config._attn_implementation = "sdpa"
    ids = torch.randint(1, 128, (3, 12))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
        mask[1, :2] = 0
    return eager, sdpa, ids, mask


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_matches_eager(version, padded):
    eager, sdpa, ids, mask = _pair(version, padded)
    keep = mask.bool()
    torch.testing.assert_close(
        sdpa(ids, attention_mask=mask).logits[keep], eager(ids, attention_mask=mask).logits[keep], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("layout", ["gqa", "odd-gqa"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_inference_prefill_and_decode_steps_match_eager(layout, version, padded):
    """Without autograd: the chunked prefill (unpadded) or kernel (padded), three tokens onto the cache, then
    single-token steps through the packed kernel, with and without a padding mask, equal eager at every step."""
    h, h_kv, d = HEAD_LAYOUTS[layout]
    eager, sdpa, ids, mask = _pair(version, padded, num_attention_heads=h, num_key_value_heads=h_kv, head_dim=d)
    with torch.no_grad():
        results = []
        for model in (eager, sdpa):
            out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
            logits = [out.logits[:, -1]]
            out = model(ids[:, 6:9], attention_mask=mask[:, :9], cache=out.cache)  # three tokens onto a cache
            logits.append(out.logits[:, -1])
            for t in range(9, ids.shape[1]):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache)
                logits.append(out.logits[:, -1])
            results.append(torch.stack(logits))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padded_equals_unpadded(version, implementation):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version, attn_implementation=implementation)).eval()
    ids = torch.randint(1, 128, (1, 9))
    alone = model(ids).logits
    padded_ids = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(padded_ids, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, 4:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_cached_generation_equals_uncached(version, implementation):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version, attn_implementation=implementation)).eval()
    ids = torch.randint(1, 128, (1, 7))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    # and the cached logits of the last step equal a full forward pass
    full = model(cached[:, :-1]).logits[:, -1]
    step = model(cached[:, :-2], use_cache=True)
    incremental = model(cached[:, -2:-1], cache=step.cache).logits[:, -1]
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_batched_left_padded_generation_equals_one_by_one(version):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version)).eval()
    prompts = [torch.randint(1, 128, (n,)) for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)[:, len(prompt) :]
        assert torch.equal(batched[row], alone[0]), f"prompt {row} differs when batched"


@pytest.mark.parametrize("version", [1, 2])
def test_static_cache_generation(version):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version)).eval()
    ids = torch.randint(1, 128, (2, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)


def test_static_cache_with_torch_compile():
    model = DiffLlamaForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    ids = torch.randint(1, 128, (1, 5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    eager = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, dynamic=False, fullgraph=True)  # _can_compile_fullgraph = True
    compiled = model.generate(ids, **kwargs)
    assert torch.equal(eager, compiled)


def test_kv_cache_holds_llama_sized_entries():
    """Per token and layer, version 1 in the paired layout and version 2 cache as many numbers as the Llama."""
    llama = LlamaForCausalLM(LlamaConfig(**_llama_fields()))
    paired = DiffLlamaForCausalLM(tiny_config(num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    v2 = DiffLlamaForCausalLM(tiny_config(diff_version=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    ids = torch.randint(1, 128, (1, 5))

    def numbers_per_token(model):
        cache = model(ids, use_cache=True).cache
        return sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) / ids.shape[1]

    assert numbers_per_token(paired) == numbers_per_token(llama) == numbers_per_token(v2)


def _llama_fields(**overrides):
    return {**TINY, "head_dim": 16, **overrides}


def test_paired_layout_has_llama_parameter_count_plus_6d_per_layer():
    llama = LlamaForCausalLM(LlamaConfig(**_llama_fields()))
    diff = DiffLlamaForCausalLM(tiny_config(num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shape = getattr(diff.model.layers[0].self_attn, name).weight.shape
        assert shape == getattr(llama.model.layers[0].self_attn, name).weight.shape, name
    extra = sum(p.numel() for p in diff.parameters()) - sum(p.numel() for p in llama.parameters())
    assert extra == 6 * 16 * 2


def _llama_and_diff(**diff_overrides):
    """A tiny Llama (4 heads of 16 over 2 KV heads) and a DiffLlama sharing every weight outside attention."""
    llama = LlamaForCausalLM(LlamaConfig(**_llama_fields())).eval()
    diff = DiffLlamaForCausalLM(tiny_config(head_dim=16, **diff_overrides)).eval()
    _copy_shared_weights(llama, diff)
    return llama, diff


def _copy_shared_weights(llama, diff):
    """Everything outside attention is Llama's own module, under Llama's own names."""
    state = {k: v for k, v in llama.state_dict().items() if ".self_attn." not in k}
    missing, unexpected = diff.load_state_dict(state, strict=False)
    assert not unexpected and all(".self_attn." in k for k in missing)


def test_v1_reduces_to_llama_when_the_second_map_is_silenced():
    """λ = 0 exactly, no head norm, V = [V_llama | 0]: the model must compute the Llama's function."""
    h, h_kv, d = 4, 2, 16
    llama, diff = _llama_and_diff(use_head_norm=False, lambda_init=0.0)
    with torch.no_grad():
        for src, dst in zip(llama.model.layers, diff.model.layers):
            a, b = src.self_attn, dst.self_attn
            b.q_proj.weight.view(h, 2, d, -1)[:, 0] = a.q_proj.weight.view(h, d, -1)
            b.k_proj.weight.view(h_kv, 2, d, -1)[:, 0] = a.k_proj.weight.view(h_kv, d, -1)
            b.v_proj.weight.view(h_kv, 2, d, -1)[:, 0] = a.v_proj.weight.view(h_kv, d, -1)
            b.v_proj.weight.view(h_kv, 2, d, -1)[:, 1] = 0
            b.o_proj.weight.view(-1, h, 2, d)[:, :, 0] = a.o_proj.weight.view(-1, h, d)
            b.lambdas.lambda_q2.copy_(b.lambdas.lambda_q1)
            b.lambdas.lambda_k2.copy_(b.lambdas.lambda_k1)
    ids = torch.randint(1, 128, (2, 10))
    assert dst.self_attn.lambdas().item() == 0.0
    torch.testing.assert_close(diff(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)


def test_v2_reduces_to_llama_with_equal_maps_and_zero_gate():
    """Q2 = Q1 and lambda_proj = 0 give (1 − ½)·A1 V per head, which o_proj doubled restores."""
    h, d = 4, 16
    llama, diff = _llama_and_diff(diff_version=2)
    with torch.no_grad():
        for src, dst in zip(llama.model.layers, diff.model.layers):
            a, b = src.self_attn, dst.self_attn
            b.q_proj.weight.view(h, 2, d, -1)[:, 0] = a.q_proj.weight.view(h, d, -1)
            b.q_proj.weight.view(h, 2, d, -1)[:, 1] = a.q_proj.weight.view(h, d, -1)
            b.k_proj.weight.copy_(a.k_proj.weight)
            b.v_proj.weight.copy_(a.v_proj.weight)
            b.o_proj.weight.copy_(2 * a.o_proj.weight)
            b.lambda_proj.weight.zero_()
    ids = torch.randint(1, 128, (2, 10))
    torch.testing.assert_close(diff(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(version):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version))
    ids = torch.randint(1, 128, (2, 10))

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    lambda_grads = [g for n, g in plain.items() if "lambda" in n]
    assert lambda_grads and all(g.abs().sum() > 0 for g in lambda_grads), "λ must receive gradients"


@pytest.mark.parametrize("version", [1, 2])
def test_bf16_forward_and_backward(version):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version))
    ids = torch.randint(1, 128, (2, 16))
    reference = model(ids).logits
    model = model.to(torch.bfloat16)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.logits.float(), reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("version", [1, 2])
def test_save_and_reload_is_bit_exact(tmp_path, version):
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version)).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DiffLlamaForCausalLM
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(1, 128, (2, 9))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_attention_dropout_only_in_training():
    model = DiffLlamaForCausalLM(tiny_config(attention_dropout=0.5))
    ids = torch.randint(1, 128, (1, 8))
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_attention_class_is_used_in_every_layer():
    model = DiffLlamaForCausalLM(tiny_config(num_hidden_layers=3))
    assert all(isinstance(layer.self_attn, DiffLlamaAttention) for layer in model.model.layers)
    assert set(model._no_split_modules) == {"DiffLlamaDecoderLayer"}
