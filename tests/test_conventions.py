"""What transformers' own model testers check of a Llama (ModelTesterMixin, GenerationTesterMixin and CausalLMModelTest,
transformers 5.24), written for both versions on tiny configs.

docs/tests.md maps every check of those testers that applies to a Llama to the test of ours that
would fail the same way: here, or in test_modeling, test_generation, test_numerics, test_auto and
test_tensor_parallel. The checks that do not apply are listed at the end of this file, each with the reason.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoModelForSequenceClassification,
    ContinuousBatchingConfig,
    DataCollatorWithFlattening,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LlamaConfig,
    LlamaForCausalLM,
    StaticCache,
)
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from conftest import TINY, tiny_config
from modeling_diff import (
    DiffLlamaForCausalLM,
    DiffLlamaForQuestionAnswering,
    DiffLlamaForSequenceClassification,
    DiffLlamaForTokenClassification,
    DiffLlamaModel,
)

VERSIONS = pytest.mark.parametrize("version", [1, 2])
ALL_CLASSES = [
    DiffLlamaModel,
    DiffLlamaForCausalLM,
    DiffLlamaForSequenceClassification,
    DiffLlamaForTokenClassification,
    DiffLlamaForQuestionAnswering,
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # a few units in the last place


def _model(version: int, model_class=DiffLlamaForCausalLM, **overrides):
    torch.manual_seed(0)
    return model_class(tiny_config(diff_version=version, **overrides)).eval()


def _ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length))  # no pad (0), BOS (1) or EOS (2) token


# ---------------------------------------------------------------------------------------------------------------
# The classes


def test_causal_lm_inherits_generation_mixin_directly():
    """transformers requires it of every generative model (PreTrainedModel will stop providing `generate`)."""
    assert GenerationMixin in DiffLlamaForCausalLM.__bases__
    assert DiffLlamaForCausalLM.can_generate() and not DiffLlamaModel.can_generate()


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_main_input_name_and_embeddings(model_class):
    model = _model(1, model_class)
    forward = list(__import__("inspect").signature(model_class.forward).parameters)
    assert forward[1] == model_class.main_input_name == "input_ids"
    assert model.get_input_embeddings() is model.base_model.embed_tokens
    replacement = torch.nn.Embedding(10, 64)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement
    output = model.get_output_embeddings()
    assert output is None or isinstance(output, torch.nn.Linear)


@VERSIONS
def test_builds_on_the_meta_device(version):
    with torch.device("meta"):
        model = DiffLlamaForCausalLM(tiny_config(diff_version=version))
    assert {p.device.type for p in model.parameters()} == {"meta"}


@VERSIONS
def test_zero_width_initialisation_gives_zero_or_one_means(version):
    """transformers' `test_initialization`: with every `_std`/`_range` field near zero, each parameter is zeros or
    ones, so nothing (the λ vectors included) escapes `_init_weights`."""
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version, initializer_range=1e-10, lambda_std_dev=1e-10))
    for name, param in model.named_parameters():
        assert round(param.mean().item(), 9) in (0.0, 1.0), name


@VERSIONS
def test_weights_missing_from_a_checkpoint_are_reported_and_initialised(version, tmp_path):
    """A checkpoint without what differential attention adds (λ vectors, head-norm gains, lambda_proj) loads with
    them named as missing and initialised as `_init_weights` does, not left as uninitialised memory."""
    _model(version).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    added = {k for k in weights if "lambda" in k or "head_norm" in k}
    save_file({k: v for k, v in weights.items() if k not in added}, tmp_path / "model.safetensors", {"format": "pt"})
    model, info = DiffLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == added
    params = dict(model.named_parameters())
    for name in added:
        if "head_norm" in name:
            assert torch.equal(params[name], torch.ones_like(params[name])), name
        elif "lambdas" in name:  # N(0, lambda_std_dev = 0.1)
            assert 0.02 < params[name].std() < 0.3, name
        else:  # lambda_proj: N(0, initializer_range = 0.02)
            assert 0.005 < params[name].std() < 0.05, name
    assert torch.isfinite(model(_ids()).logits).all()


@VERSIONS
def test_head_weights_missing_from_a_base_checkpoint_are_reported(version, tmp_path):
    model = _model(version)
    model.model.save_pretrained(tmp_path)
    _, info = DiffLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}


@VERSIONS
def test_from_pretrained_with_a_state_dict_and_no_checkpoint(version):
    model = _model(version)
    rebuilt = DiffLlamaForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), rebuilt.parameters()))


@VERSIONS
def test_save_writes_the_config_and_the_generation_config(version, tmp_path):
    _model(version).save_pretrained(tmp_path / "lm")
    _model(version, DiffLlamaModel).save_pretrained(tmp_path / "base")
    assert (tmp_path / "lm" / "config.json").exists() and (tmp_path / "lm" / "generation_config.json").exists()
    assert not (tmp_path / "base" / "generation_config.json").exists()  # it cannot generate


@VERSIONS
def test_tied_embeddings_stay_tied_through_resize_save_and_reload(version, tmp_path):
    model = _model(version, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.resize_token_embeddings(140)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape[0] == 140
    model.save_pretrained(tmp_path)
    reloaded, info = DiffLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = _ids()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


@VERSIONS
def test_resizing_untied_embeddings_keeps_the_old_rows(version):
    model = _model(version)
    embeddings, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    model.resize_token_embeddings(138)
    assert model.config.vocab_size == 138 and model.lm_head.weight.shape == (138, 64)
    assert torch.equal(model.model.embed_tokens.weight[:128], embeddings)
    assert torch.equal(model.lm_head.weight[:128], head)
    assert model(_ids()).logits.shape[-1] == 138
    model.resize_token_embeddings(113)
    assert model(_ids().clamp(max=112)).logits.shape[-1] == 113
    assert torch.equal(model.model.embed_tokens.weight, embeddings[:113])


@VERSIONS
def test_classification_problem_types_and_mismatched_heads(version, tmp_path):
    ids = _ids()
    for problem, labels in [
        ("single_label_classification", torch.tensor([0, 2])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
        ("regression", torch.tensor([[0.5], [1.5]])),
    ]:
        num_labels = labels.shape[-1] if problem == "regression" else 3
        model = _model(version, DiffLlamaForSequenceClassification, num_labels=num_labels, problem_type=problem)
        model.train()
        out = model(ids, labels=labels)
        assert out.logits.shape == (2, num_labels) and torch.isfinite(out.loss)
        out.loss.backward()
    _model(version, DiffLlamaForSequenceClassification, num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=42)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=42, ignore_mismatched_sizes=True)
    assert model(ids).logits.shape == (2, 42)


@VERSIONS
def test_token_classification_and_question_answering_heads(version):
    ids = _ids()
    tagger = _model(version, DiffLlamaForTokenClassification, num_labels=3)
    out = tagger(ids, labels=torch.randint(0, 3, (2, 7)))
    assert out.logits.shape == (2, 7, 3) and torch.isfinite(out.loss)
    reader = _model(version, DiffLlamaForQuestionAnswering)
    out = reader(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4]))
    assert out.start_logits.shape == out.end_logits.shape == (2, 7) and torch.isfinite(out.loss)


@VERSIONS
@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rope_scaling_from_the_config(version, rope_type):
    """CausalLMModelTest's RoPE check: scaling changes long inputs (past max_position_embeddings = 256), and short
    ones too except for dynamic NTK, which only rescales once an input is longer than the original maximum."""
    short, long = torch.randint(3, 128, (1, 10)), torch.randint(3, 128, (1, 384))
    plain = _model(version, DiffLlamaModel)
    rope = {"rope_type": rope_type, "factor": 10.0, "rope_theta": 1e4}
    scaled = _model(version, DiffLlamaModel, rope_parameters=rope)
    with torch.no_grad():
        outputs = [(m(short).last_hidden_state, m(long).last_hidden_state) for m in (plain, scaled)]
    (plain_short, plain_long), (scaled_short, scaled_long) = outputs
    if rope_type == "dynamic":
        torch.testing.assert_close(scaled_short, plain_short, atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(scaled_short, plain_short, atol=1e-5)
    assert not torch.allclose(scaled_long, plain_long, atol=1e-5)


@VERSIONS
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_enable_disable_and_reentrant_variants(version, reentrant):
    model = _model(version)
    ids = _ids()
    model.train()
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    layers = list(model.model.layers)
    assert model.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in layers)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and not any(layer.gradient_checkpointing for layer in layers)


# ---------------------------------------------------------------------------------------------------------------
# Outputs


@VERSIONS
def test_attention_and_hidden_state_outputs_by_argument_and_by_config(version):
    """One map per layer, (B, h, T, S) with h the differential heads; L + 1 hidden states of (B, T, hidden)."""
    ids = _ids()
    for model, kwargs in [
        (_model(version, attn_implementation="eager"), dict(output_attentions=True, output_hidden_states=True)),
        (_model(version, attn_implementation="eager", output_attentions=True, output_hidden_states=True), {}),
    ]:
        out = model(ids, **kwargs)
        assert [a.shape for a in out.attentions] == [(2, 4, 7, 7)] * 2
        assert [h.shape for h in out.hidden_states] == [(2, 7, 64)] * 3
        assert out.to_tuple()[-1] is out.attentions  # attentions last, after the hidden states


@VERSIONS
def test_attention_maps_and_hidden_states_retain_grad(version):
    """transformers' `test_retain_grad_hidden_states_attentions`: the returned A1 − λ·A2 is the tensor the output is
    computed from, so attribution methods get its gradient."""
    model = _model(version, attn_implementation="eager", output_attentions=True, output_hidden_states=True)
    out = model(_ids())
    maps, hidden = out.attentions[0], out.hidden_states[0]
    maps.retain_grad()
    hidden.retain_grad()
    out.logits.flatten()[0].backward(retain_graph=True)
    assert hidden.grad is not None and maps.grad is not None
    assert maps.grad[0].abs().sum() > 0 and maps.grad[1].abs().sum() == 0  # only sample 0 reaches that logit


@VERSIONS
def test_tuple_and_dict_outputs_are_equal(version):
    model = _model(version, attn_implementation="eager")
    ids = _ids()
    for extra in ({}, {"labels": ids}, {"output_hidden_states": True}, {"output_attentions": True, "labels": ids}):
        as_tuple = model(ids, return_dict=False, use_cache=False, **extra)
        as_dict = model(ids, return_dict=True, use_cache=False, **extra).to_tuple()
        flat = [torch.cat([t.flatten() for t in x]) if isinstance(x, tuple) else x.flatten() for x in as_tuple]
        expected = [torch.cat([t.flatten() for t in x]) if isinstance(x, tuple) else x.flatten() for x in as_dict]
        assert len(flat) == len(expected)
        for a, b in zip(flat, expected):
            torch.testing.assert_close(a, b)


@VERSIONS
def test_inputs_embeds_equal_input_ids(version):
    model = _model(version)
    ids = _ids()
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(ids).logits)
    base = _model(version, DiffLlamaModel)
    torch.testing.assert_close(
        base(inputs_embeds=base.embed_tokens(ids)).last_hidden_state, base(ids).last_hidden_state
    )


@VERSIONS
def test_batched_rows_equal_single_rows(version):
    model = _model(version)
    ids = _ids(batch=4)
    with torch.no_grad():
        batched = model(ids, output_hidden_states=True)
        single = model(ids[:1], output_hidden_states=True)
    torch.testing.assert_close(batched.logits[:1], single.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(batched.hidden_states, single.hidden_states):
        torch.testing.assert_close(a[:1], b, atol=1e-5, rtol=1e-5)


@VERSIONS
def test_logits_to_keep(version):
    model = _model(version)
    ids = _ids()
    every = model(ids, logits_to_keep=0).logits
    last = model(ids, logits_to_keep=1).logits
    assert every.shape == (2, 7, 128) and last.shape == (2, 1, 128)
    torch.testing.assert_close(last, every[:, -1:], atol=1e-5, rtol=1e-5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, logits_to_keep=0, **kwargs), model.generate(ids, **kwargs))


@VERSIONS
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_custom_4d_attention_mask_shares_a_prefix(version, implementation):
    """Three sequences that share three tokens, as one row with a 4D mask in which the last three tokens do not see
    each other, give the three sequences' last logits."""
    model = _model(version, attn_implementation=implementation)
    ids = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 14], [10, 11, 12, 15]])
    shared = torch.tensor([[10, 11, 12, 13, 14, 15]])
    sees = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]] + [[1, 1, 1, 0, 0, 0]] * 3)
    sees[3:, 3:] = torch.eye(3, dtype=sees.dtype)
    mask = (sees == 0).float()[None, None] * torch.finfo(torch.float32).min
    separate = model(ids, position_ids=torch.arange(4).expand(3, 4)).logits[:, -1]
    together = model(shared, attention_mask=mask, position_ids=torch.tensor([[0, 1, 2, 3, 3, 3]])).logits[0, -3:]
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)


@VERSIONS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_eager_matches_sdpa_inference(version, dtype, padding):
    eager = _model(version, attn_implementation="eager").to(dtype)
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    ids = _ids(batch=7, length=9)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[-1, :2] = 0
    elif padding == "right":
        mask[-1, -2:] = 0
    kwargs = dict(attention_mask=mask if padding else None, output_hidden_states=True)
    with torch.no_grad():
        expected, got = (m(ids, **kwargs).hidden_states[-1] for m in (eager, sdpa))
    keep = mask.bool()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got[keep], expected[keep], atol=tolerance, rtol=tolerance)


@VERSIONS
def test_attention_implementation_is_chosen_and_switched(version, tmp_path):
    _model(version).save_pretrained(tmp_path)
    assert DiffLlamaForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    model = DiffLlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    ids = _ids()
    eager = model(ids, output_attentions=True)
    assert len(eager.attentions) == 2
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, eager.logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Attention functions registered by the user, and packed (padding-free) sequences


@pytest.fixture
def counting_sdpa():
    """An attention function registered under a new name: transformers' SDPA, counting its calls."""
    calls = []

    def attend(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("counting_sdpa", attend)
    AttentionMaskInterface.register("counting_sdpa", sdpa_mask)
    yield calls
    for interface in (AttentionInterface, AttentionMaskInterface):
        interface._global_mapping.pop("counting_sdpa", None)


@VERSIONS
def test_a_registered_attention_function_is_used_by_name(version, counting_sdpa):
    model = _model(version, attn_implementation="eager")
    custom = _model(version, attn_implementation="counting_sdpa")
    custom.load_state_dict(model.state_dict())
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        keep = kwargs.get("attention_mask", mask * 0 + 1).bool()
        counting_sdpa.clear()
        torch.testing.assert_close(custom(ids, **kwargs).logits[keep], model(ids, **kwargs).logits[keep])
        # One call per layer with standard shapes: 2h query maps, widths equal to the keys' (2d in version 1)
        width = model.config.cache_head_dim
        assert counting_sdpa == [(2, 8, 7, width)] * 2
    custom.train()
    custom(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in custom.parameters())


def test_config_accepts_registered_attention_names_and_refuses_unknown_ones(counting_sdpa):
    assert tiny_config(attn_implementation="counting_sdpa")._attn_implementation == "counting_sdpa"
    # A Hub kernel's name is left to transformers, which fetches and registers it when the model is built
    assert tiny_config(attn_implementation="kernels-community/flash-attn")._attn_implementation is not None
    with pytest.raises(ValueError, match="'no_such_attention'.*register your own"):
        tiny_config(attn_implementation="no_such_attention")


@VERSIONS
@pytest.mark.parametrize("implementation", ["eager", "sdpa", "counting_sdpa"])
def test_packed_sequences_equal_separate_sequences(version, implementation, counting_sdpa):
    """Padding-free training batches (DataCollatorWithFlattening: sequences end to end in one row, positions
    restarting at 0) give each sequence's own logits, and the loss of the padded batch."""
    model = _model(version, attn_implementation=implementation)
    sequences = [torch.randint(3, 128, (n,)) for n in (5, 3, 6)]
    packed = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in sequences])
    assert packed["position_ids"].tolist() == [list(range(5)) + list(range(3)) + list(range(6))]
    out = model(packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"], use_cache=False)
    starts = [0, 5, 8, 14]
    for sequence, start, stop in zip(sequences, starts, starts[1:]):
        alone = model(sequence[None], use_cache=False).logits[0]
        torch.testing.assert_close(out.logits[0, start:stop], alone, atol=1e-5, rtol=1e-5)
    padded = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    padded_loss = model(padded, attention_mask=mask, labels=padded.masked_fill(mask == 0, -100)).loss
    torch.testing.assert_close(out.loss, padded_loss, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Generation


def _check_generation_outputs(out, model, prompt, batch, use_cache):
    """transformers' `_check_outputs`: scores, logits, per-step maps and hidden states, and the cache's geometry."""
    config = model.config
    steps = out.sequences.shape[1] - prompt
    assert len(out.scores) == len(out.logits) == steps
    assert all(s.shape == (batch, config.vocab_size) for s in out.scores + out.logits)
    for step, (maps, hidden) in enumerate(zip(out.attentions, out.hidden_states)):
        keys = prompt + step
        queries = 1 if use_cache and step > 0 else keys
        assert [m.shape for m in maps] == [(batch, config.num_attention_heads, queries, keys)] * 2
        assert [h.shape for h in hidden] == [(batch, queries, config.hidden_size)] * 3
    if use_cache:
        # (B, h_kv, tokens, cache_head_dim): version 1 caches [K1 | K2] and the 2d-wide value
        expected = (batch, config.num_key_value_heads, out.sequences.shape[1] - 1, config.cache_head_dim)
        assert [layer.keys.shape for layer in out.past_key_values.layers] == [expected] * 2
        assert [layer.values.shape for layer in out.past_key_values.layers] == [expected] * 2
    else:
        assert out.past_key_values is None


@VERSIONS
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(
    "method",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=10, top_p=0.7, temperature=0.7, num_return_sequences=2),
        dict(do_sample=False, num_beams=2, length_penalty=2.0, early_stopping=False),
        dict(do_sample=True, num_beams=2),
    ],
    ids=["greedy", "sample", "beam-search", "beam-sample"],
)
def test_generate_dict_outputs(version, use_cache, method):
    model = _model(version, attn_implementation="eager")
    ids = _ids()
    torch.manual_seed(0)
    out = model.generate(
        ids,
        max_new_tokens=3,
        min_new_tokens=3,
        pad_token_id=0,
        use_cache=use_cache,
        output_scores=True,
        output_logits=True,
        output_attentions=True,
        output_hidden_states=True,
        return_dict_in_generate=True,
        repetition_penalty=1.2,
        bad_words_ids=[[1, 0]],
        **method,
    )
    batch = 2 * method.get("num_beams", method.get("num_return_sequences", 1))
    assert out.sequences.shape == (2 * method.get("num_return_sequences", 1), 10)
    _check_generation_outputs(out, model, 7, batch, use_cache)


@VERSIONS
def test_past_key_values_format(version):
    """transformers assumes (B, h_kv, T, head_dim); version 1 caches 2·head_dim, which `config.cache_head_dim`
    states, so tools that size caches can ask the config instead of assuming."""
    model = _model(version)
    cache = model(_ids(), use_cache=True).past_key_values
    config = model.config
    assert config.cache_head_dim == (2 if version == 1 else 1) * config.head_dim
    shape = (2, config.num_key_value_heads, 7, config.cache_head_dim)
    assert len(cache.layers) == 2 and all(l.keys.shape == l.values.shape == shape for l in cache.layers)


@VERSIONS
def test_generate_without_input_ids_starts_from_bos(version):
    model = _model(version, bos_token_id=1)
    out = model.generate(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 4) and out[0, 0] == 1


@VERSIONS
def test_assisted_and_prompt_lookup_decoding_match_greedy(version):
    """Candidate tokens checked in one forward pass over a cache that is cropped back when they are rejected."""
    model = _model(version)
    torch.manual_seed(1)
    stranger = DiffLlamaForCausalLM(tiny_config(diff_version=version)).eval()
    ids = _ids(batch=1)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=-1)
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    greedy = model.generate(ids, **kwargs)
    for assistant in (model, stranger):  # every candidate accepted, most rejected
        assistant.generation_config.num_assistant_tokens = 2
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assisted = model.generate(ids, assistant_model=assistant, **kwargs)
        assert torch.equal(assisted.sequences, greedy.sequences)
        torch.testing.assert_close(torch.stack(assisted.scores), torch.stack(greedy.scores), atol=1e-5, rtol=1e-5)
        keep_all = model.generate(ids, assistant_model=assistant, logits_to_keep=0, **kwargs)
        assert torch.equal(keep_all.sequences, greedy.sequences)
    looked_up = model.generate(ids, prompt_lookup_num_tokens=2, **kwargs)
    assert torch.equal(looked_up.sequences, greedy.sequences)
    sampled = model.generate(ids, assistant_model=model, do_sample=True, max_new_tokens=4, pad_token_id=0)
    assert sampled.shape == (1, 11)


@VERSIONS
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_from_inputs_embeds(version, num_beams):
    model = _model(version)
    ids = _ids()
    embeds = model.get_input_embeddings()(ids)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, num_beams=num_beams, do_sample=False, pad_token_id=0)
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    from_ids = model.generate(ids, **kwargs)
    from_embeds = model.generate(ids, inputs_embeds=embeds, **kwargs)
    assert torch.equal(from_embeds.sequences, from_ids.sequences)
    without_ids = model.generate(inputs_embeds=embeds, **kwargs)
    assert torch.equal(without_ids.sequences, from_ids.sequences[:, 7:])
    other = model.generate(ids, inputs_embeds=torch.rand_like(embeds), **kwargs)
    assert not torch.allclose(other.scores[0], from_embeds.scores[0])
    if num_beams == 1:  # a static cache sized by generate() for the embeddings and the new tokens
        kwargs.update(max_new_tokens=20, min_new_tokens=20)
        static = model.generate(inputs_embeds=embeds, cache_implementation="static", **kwargs)
        assert isinstance(static.past_key_values, StaticCache) and static.sequences.shape == (2, 20)
        # the embeddings and every new token but the last, which is never fed back
        expected = (2, model.config.num_key_value_heads, 7 + 20 - 1, model.config.cache_head_dim)
        assert static.past_key_values.layers[0].keys.shape == expected


@VERSIONS
def test_generation_continues_from_a_returned_cache(version):
    model = _model(version)
    ids = _ids()
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=-1, return_dict_in_generate=True)
    whole = model.generate(ids, max_new_tokens=4, **kwargs)
    first = model.generate(ids, max_new_tokens=3, **kwargs)
    rest = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=1, **kwargs)
    assert torch.equal(rest.sequences, whole.sequences)
    for a, b in zip(rest.past_key_values.layers, whole.past_key_values.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    # and from embeddings: the cache of a first call over inputs_embeds, continued with the tokens
    embeds = model.get_input_embeddings()(ids)
    first = model.generate(inputs_embeds=embeds, max_new_tokens=3, **kwargs)
    continued = torch.cat([embeds, model.get_input_embeddings()(first.sequences)], dim=1)
    rest = model.generate(
        inputs_embeds=continued, past_key_values=first.past_key_values, max_new_tokens=1, **kwargs
    )
    assert torch.equal(torch.cat([first.sequences, rest.sequences], dim=1), whole.sequences[:, 7:])


# Every cache_implementation generate() accepts that a Llama can use on CPU: "quantized" with transformers' own fp8
# backend (quanto and HQQ need packages of their own), and the deprecated names that now pick a layer structure
# from the config. ("offloaded" and "offloaded_static" move layers with CUDA streams and need a GPU, for a Llama too.)
CACHE_IMPLEMENTATIONS = ("dynamic", "static", "quantized", "sliding_window", "hybrid", "hybrid_chunked")


@VERSIONS
@pytest.mark.parametrize("implementation", CACHE_IMPLEMENTATIONS)
def test_generation_with_every_cache_class(version, implementation):
    """The cache class a Llama gets, holding (B, h_kv, slots, cache_head_dim), and the uncached generation."""
    model = _model(version)
    llama = LlamaForCausalLM(LlamaConfig(**TINY, head_dim=16)).eval()
    ids = _ids()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    if implementation == "quantized":
        kwargs["cache_config"] = {"backend": "fp8"}
    out = model.generate(ids, cache_implementation=implementation, **kwargs)
    reference = llama.generate(ids, cache_implementation=implementation, **kwargs).past_key_values
    assert type(out.past_key_values) is type(reference)
    assert [type(layer) for layer in out.past_key_values.layers] == [type(layer) for layer in reference.layers]
    uncached = model.generate(ids, use_cache=False, **{k: v for k, v in kwargs.items() if k != "cache_config"})
    if implementation != "quantized":
        slots = reference.layers[0].keys.shape[2]
        cache_shape = (2, model.config.num_key_value_heads, slots, model.config.cache_head_dim)
        assert out.past_key_values.layers[0].keys.shape == cache_shape
        assert torch.equal(out.sequences, uncached.sequences)
        return
    # fp8 keys and values change the numbers, not the first token (the prompt's keys are used as computed) nor, beyond
    # rounding, the later logits; near-ties can flip a later token, for a Llama too.
    assert torch.equal(out.sequences[:, :8], uncached.sequences[:, :8])
    for got, expected in zip(out.scores, uncached.scores):
        assert (got - expected).abs().max() < 0.1 * expected.abs().max()


@VERSIONS
def test_cache_objects_passed_in_and_a_static_cache_built_ahead(version):
    """Caches built by the caller from the config, and the static cache generate() builds before a chunked prefill
    (sized from `config.cache_head_dim`: with head_dim, version 1 would fail on its first update)."""
    model = _model(version)
    ids = _ids()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    for cache in (
        DynamicCache(config=model.config),
        StaticCache(config=model.config, max_cache_len=20),
    ):
        assert torch.equal(model.generate(ids, past_key_values=cache, **kwargs), uncached), type(cache).__name__
    chunked = model.generate(ids, cache_implementation="static", prefill_chunk_size=3, **kwargs)
    assert torch.equal(chunked, uncached)


@VERSIONS
def test_a_cache_built_ahead_from_head_dim_is_refused_naming_cache_head_dim(version):
    """Tools that build a static cache ahead from head_dim (transformers' ExecuTorch wrapper does) get a clear error
    from version 1 instead of a shape error inside the cache; built from `cache_head_dim`, the cache works."""
    model = _model(version)
    ids = _ids(batch=1)
    config = model.config
    expected = model(ids).logits[:, -1]
    for head_dim in (config.head_dim, config.cache_head_dim):
        cache = StaticCache(config=config, max_cache_len=16)
        cache.early_initialization(1, config.num_key_value_heads, head_dim, torch.float32, torch.device("cpu"))
        if head_dim != config.cache_head_dim:  # version 1 only
            with pytest.raises(ValueError, match=r"keys 8 wide.*16 wide.*config.cache_head_dim"):
                model(ids, past_key_values=cache)
            continue
        torch.testing.assert_close(model(ids, past_key_values=cache).logits[:, -1], expected, atol=1e-5, rtol=1e-5)
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 16}
    exportable = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=16)
    if version == 1:
        with pytest.raises(ValueError, match="config.cache_head_dim"):
            exportable(input_ids=ids[:, :1], cache_position=torch.tensor([0]))
    else:
        torch.testing.assert_close(
            exportable(input_ids=ids[:, :1], cache_position=torch.tensor([0]))[:, -1], model(ids[:, :1]).logits[:, -1]
        )


def test_continuous_batching_with_version_2_and_a_clear_refusal_for_version_1():
    """generate_batch's paged cache is sized from head_dim: right for version 2, not for version 1's 2d-wide cache."""
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (5, 8)]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=-1)
    batching = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64)
    model = _model(2)
    results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching)
    for prompt, result in zip(prompts, (results[key] for key in sorted(results))):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert result.generated_tokens == alone[0, len(prompt) :].tolist()
    with pytest.raises(ValueError, match=r"head_dim \(8\).*16 wide"):
        _model(1).generate_batch(prompts, generation_config=config, continuous_batching_config=batching)


# ---------------------------------------------------------------------------------------------------------------
# Checks of transformers' testers that do not apply, and why:
#
# - Flash-attention, CUDA-graph, multi-GPU (DataParallel, device_map over GPUs, model parallel beam search),
#   sdpa-on-flash, compile-for-training on GPU and the offloaded caches need CUDA. The GPU checks the project has are
#   in benchmarks/gpu_check.sh; disk offload on CPU is test_generation's device_map test.
# - Group beam search, constrained beam search, contrastive search and DoLa live on the Hub as `custom_generate`
#   repositories in transformers 5.x: generic code fetched over the network, nothing model-specific.
# - The quanto and HQQ quantized-cache backends need packages this project does not install; the fp8 backend,
#   transformers' own, is tested above.
# - Head masking, head pruning, TorchScript, torch.fx, TensorFlow and Flax: not in transformers 5.x testers for a
#   Llama (CausalLMModelTest turns masking and pruning off).
# - `test_keep_in_fp32_modules`, `test_save_load_keys_to_ignore_on_save`: the model, like Llama, declares none.
# - `test_feed_forward_chunking`: Llama's MLP has no chunking; the config field is never read.
# - `test_model_is_small`: every config in this suite is tiny by construction (conftest.TINY).
# - Composite-model dispatch (attn_implementation per sub-config): the model has one config.
# - Sliding-window equivalence (`test_sdpa_matches_eager_sliding_window`): Llama, and so this model, has no sliding
#   window; the deprecated sliding/hybrid cache names still work and are tested above.
# - FlexAttention (`test_flex_attention_with_grads`): `_supports_flex_attn` is False, and transformers refuses it.
