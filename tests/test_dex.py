"""DEX (arXiv 2505.16333): conversion keeps the source's function, the differencing against an independent
implementation on Llama's own attention, the config's checks, the λ schedule, and LoRA training and saving."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_conversion import SOURCES, make_source
from test_trainer import byte_level_tokenizer, data_dir, train  # noqa: F401  (data_dir is a fixture)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import modeling_diff
from configuration_diff import DiffLlamaConfig
from conftest import TINY
from conversion import ConversionError, convert
from finetune.data import python_files
from finetune.dex import DexLambdaCallback, dex_modules, set_dex_lambda
from finetune.lora import diff_modules_to_save, lora_config


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("name", list(SOURCES))
def test_converted_dex_is_exactly_the_source(tmp_path, name):
    source = make_source(tmp_path / "source", name).eval()
    out = convert(source=tmp_path / "source", output=tmp_path / "dex", strategy="dex", verify=False, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model) is modeling_diff.DiffLlamaForCausalLM and model.config.diff_version == "dex"
    layers, d = source.config.num_hidden_layers, model.config.head_dim
    assert model.num_parameters() == source.num_parameters() + layers * d * d  # f_D; λ is a buffer
    ids = torch.randint(3, 100, (2, 13))
    assert torch.equal(logits(model, ids), logits(source, ids))
    prompt = ids[:, :5]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(generated, source.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2))


def test_dex_refuses_no_preserve(tmp_path):
    make_source(tmp_path / "source", "llama")
    with pytest.raises(ConversionError, match="strategy 'dex' always starts as exactly its source"):
        convert(source=tmp_path / "source", output=tmp_path / "out", strategy="dex", preserve=False, verify=False)
    assert not (tmp_path / "out").exists()


def differenced_llama(llama: LlamaForCausalLM, f_d: list[torch.Tensor], heads: list[list[int]], lam: float):
    """An independent DEX: Llama's own attention, its o_proj input changed by a forward pre-hook, in float64."""

    def hook(layer_idx):
        def pre_hook(module, args):
            (output,) = args
            per_head = output.unflatten(-1, (-1, llama.config.head_dim)).clone()  # (B, T, h, d)
            for head in heads[layer_idx]:
                per_head[:, :, head] -= lam * per_head[:, :, head] @ f_d[layer_idx].T
            return (per_head.flatten(-2),)

        return pre_hook

    for layer_idx, layer in enumerate(llama.model.layers):
        layer.self_attn.o_proj.register_forward_pre_hook(hook(layer_idx))
    return llama


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_dex_matches_an_independent_implementation(attn_implementation):
    torch.manual_seed(0)
    common = dict(TINY, head_dim=16)
    llama = LlamaForCausalLM(LlamaConfig(**common, attn_implementation=attn_implementation)).double().eval()
    heads = [[0, 3], [1, 2, 3]]
    config = DiffLlamaConfig(**common, diff_version="dex", dex_heads=heads, attn_implementation=attn_implementation)
    model = modeling_diff.DiffLlamaForCausalLM(config).double().eval()
    missing = model.load_state_dict(llama.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"model.layers.{i}.self_attn.dex.{n}" for i in (0, 1) for n in ("weight", "lambda_"))
    f_d = [torch.randn(16, 16, dtype=torch.float64) * 0.3 for _ in heads]
    with torch.no_grad():
        for module, weight in zip(dex_modules(model), f_d):
            module.weight.copy_(weight)
    set_dex_lambda(model, 0.7)
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    if attn_implementation == "sdpa":  # Llama's own eager path turns a left-padded float64 row into NaN
        mask[1, :3] = 0
    plain = logits(llama, ids, attention_mask=mask)
    expected = logits(differenced_llama(llama, f_d, heads, 0.7), ids, attention_mask=mask)
    assert not torch.allclose(expected, plain)  # the differencing does change the function
    real = mask.bool()  # padding positions predict nothing
    got = logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-10, atol=1e-10)
    # Cached decoding, one token at a time after a prompt, equals the full forward pass: to float64 rounding with
    # SDPA, to float32 rounding in eager, whose softmax transformers computes in float32 (5.25: even for float64
    # inputs, so a Llama differs as much between the two passes).
    tolerance = 1e-10 if attn_implementation == "sdpa" else 1e-6
    full = logits(model, ids[:1])
    out = model(input_ids=ids[:1, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 9):
        out = model(input_ids=ids[:1, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(diff_version="dex", dex_heads=[[0]]), r"dex_heads has 1 lists but num_hidden_layers is 2"),
        (dict(diff_version="dex", dex_heads=[[0], [4]]), r"dex_heads of layer 1 is \[4\]: .* in \[0, 4\)"),
        (dict(diff_version="dex", dex_heads=[[1, 1], [0]]), r"dex_heads of layer 0 is \[1, 1\]: .* distinct"),
        (dict(diff_version=2, dex_heads=[[0], [0]]), r"dex_heads is set but diff_version is 2"),
        (dict(diff_version="dex", dex_heads=[["0"], [1]]), r"field 'dex_heads'(.|\n)*value \[\['0'\], \[1\]\]"),
        (dict(diff_version="dex", dex_heads="all"), r"field 'dex_heads'(.|\n)*value 'all'"),
        (dict(diff_version="v3"), r"diff_version \('v3'\) must be 1 .*, 2 .* or 'dex'"),
    ],
)
def test_dex_config_refuses_what_cannot_work(fields, message):
    with pytest.raises(Exception, match=message):  # types: caught by transformers' own field validation
        DiffLlamaConfig(**TINY, **fields)


def test_a_layer_without_dex_heads_is_left_as_the_llama_computes_it():
    """An empty head list is a layer DEX does not touch: with f_D and λ away from zero, the model equals one whose
    layer 0 has no DEX module at work, and with every list empty it is the plain Llama."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    ids = torch.randint(3, 100, (2, 9))
    for heads in ([[], [1, 3]], [[], []]):
        model = modeling_diff.DiffLlamaForCausalLM(DiffLlamaConfig(**TINY, diff_version="dex", dex_heads=heads))
        model.load_state_dict(llama.state_dict(), strict=False)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.dex.weight.normal_(0, 0.3)
                layer.self_attn.dex.lambda_.fill_(0.7)
        model.eval()
        if heads[1]:
            reference = modeling_diff.DiffLlamaForCausalLM(DiffLlamaConfig(**TINY, diff_version="dex",
                                                                            dex_heads=[[0], [1, 3]])).eval()
            reference.load_state_dict(model.state_dict())
            reference.model.layers[0].self_attn.dex.lambda_.zero_()  # layer 0's correction switched off
            assert torch.equal(logits(model, ids), logits(reference, ids))
        else:
            assert torch.equal(logits(model, ids), logits(llama, ids))


def test_lambda_schedule():
    callback = DexLambdaCallback(max_lambda=1.0, anneal_fraction=0.25)
    assert [callback.lambda_at(step, 20) for step in (0, 1, 4, 5, 6, 20)] == [0.0, 0.2, 0.8, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"anneal_fraction \(0\) must lie in \(0, 1\]"):
        DexLambdaCallback(anneal_fraction=0)


def test_lora_config_trains_and_saves_the_dex_modules():
    config = DiffLlamaConfig(**TINY, diff_version="dex")
    assert diff_modules_to_save(config) == ["dex"]
    lora = lora_config(config)
    assert lora.modules_to_save == ["dex"] and sorted(lora.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with pytest.raises(ValueError, match="does not apply to a DEX model"):
        lora_config(config, second_maps="full")


def test_lora_training_moves_f_d_and_lambda_and_saves_them(data_dir, tmp_path):  # noqa: F811
    tokenizer = byte_level_tokenizer(python_files(data_dir))
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": 384, "eos_token_id": 0}))
    source.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    folder = convert(source=tmp_path / "llama", output=tmp_path / "dex", strategy="dex", verify=False, progress=False)
    metrics = train(folder, tmp_path / "run", data_dir, mode="lora", learning_rate=3e-2, steps=8, merge=True)
    assert metrics["held_out_perplexity_after"] < metrics["held_out_perplexity_before"]
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.dex"
    assert adapter[f"{prefix}.lambda_"].item() == 1.0  # annealed over the first quarter, then held
    assert adapter[f"{prefix}.weight"].abs().sum() > 0  # f_D left zero once λ > 0

    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapted = PeftModel.from_pretrained(original, tmp_path / "run").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    ids = torch.arange(40).view(2, 20)
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), rtol=1e-5, atol=1e-5)
    assert merged.model.layers[1].self_attn.dex.lambda_.item() == 1.0


def test_output_attentions_are_the_source_maps(tmp_path):
    """DEX differences the attention output, not the maps: eager returns the source's own softmax maps."""
    make_source(tmp_path / "source", "llama")
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "source", attn_implementation="eager").eval()
    out = convert(source=tmp_path / "source", output=tmp_path / "dex", strategy="dex", verify=False, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        ours, theirs = model(ids, output_attentions=True).attentions, source(ids, output_attentions=True).attentions
    assert len(ours) == source.config.num_hidden_layers and ours[0].shape == (2, 4, 9, 9)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)
