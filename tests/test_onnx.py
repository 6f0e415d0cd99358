"""ONNX Runtime: `python -m diffllama_onnx` exports every version to one graph over an explicit KV cache, and
`OnnxCausalLM` generates our `generate()`'s tokens from it, greedy, left-padded in a batch, and by sampling."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import modeling_diff
from conftest import tiny_config
from diffllama_onnx import OnnxCausalLM, export
from diffllama_onnx.__main__ import main
from test_trainer import byte_level_tokenizer

# Prompts of different lengths, decoded together (left-padded) by ONNX Runtime and one by one by our generate().
PROMPTS = [[5, 17, 99, 3], [42], list(range(30, 52)), [7, 7, 8, 200, 31, 64, 9]]
NEW_TOKENS = 8
MODELS = {
    "v1": dict(diff_version=1),  # caches [K1 | K2] and 2d-wide values
    "v2": dict(diff_version=2),
    "dex-subset": dict(diff_version="dex", dex_heads=[[0, 3], [1]]),
    "dex-every-head": dict(diff_version="dex"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer([Path(shutil.__file__)])


def trained_looking(folder: Path, tokenizer, **overrides) -> modeling_diff.DiffLlamaForCausalLM:
    """A tiny model with peaked logits (greedy choices far from ties) and, for DEX, f_D and λ away from zero."""
    torch.manual_seed(0)
    model = modeling_diff.DiffLlamaForCausalLM(tiny_config(vocab_size=len(tokenizer), eos_token_id=0, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4)
        for layer in model.model.layers:
            if model.config.diff_version == "dex":
                layer.self_attn.dex.weight.normal_(0, 0.3)
                layer.self_attn.dex.lambda_.fill_(0.7)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """`exported(name)`: our model and its ONNX folder, exported once per module."""
    done = {}

    def get(name: str):
        if name not in done:
            folder = tmp_path_factory.mktemp(name)
            model = trained_looking(folder / "model", tokenizer, **MODELS[name])
            done[name] = model, export(folder / "model", folder / "onnx", int8=name == "v2")
        return done[name]

    return get


def reference(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_onnx_runtime_generates_our_tokens_in_a_left_padded_batch(exported, name):
    model, folder = exported(name)
    onnx = OnnxCausalLM(folder)
    assert onnx.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == [reference(model, prompt) for prompt in PROMPTS]
    # The first step's logits, every position of the longest prompt, against the model's forward pass.
    ids = np.array([PROMPTS[2]])
    logits, cache = onnx.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], onnx.empty_cache(1))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-4 * np.abs(expected).max()
    layout = json.loads((folder / "onnx_layout.json").read_text())
    width = 2 * model.config.head_dim if model.config.diff_version == 1 else model.config.head_dim
    assert cache[0].shape == (1, model.config.num_key_value_heads, ids.shape[1], width) == (1, layout["kv_heads"],
                                                                                          ids.shape[1], layout["head_dim"])


def test_sampling_is_seeded_and_top_k_one_is_greedy(exported):
    _, folder = exported("v2")
    onnx = OnnxCausalLM(folder)
    greedy = onnx.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert onnx.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, seed=3) == greedy
    first = onnx.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=3.0, seed=1)
    assert onnx.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=3.0, seed=1) == first
    assert onnx.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=3.0, seed=2) != first
    assert first != greedy


def test_a_row_stops_at_eos_and_the_others_go_on(exported):
    model, folder = exported("v2")
    onnx = OnnxCausalLM(folder)
    expected = [reference(model, prompt) for prompt in PROMPTS]
    eos = expected[0][2]  # the third token of the first prompt's answer
    got = onnx.generate(PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    for tokens, full in zip(got, expected):
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert tokens == full[:stop]


def test_int8_graph_runs_close_to_the_float_graph(exported):
    _, folder = exported("v2")
    ids = np.array([PROMPTS[2]])
    args = (ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    full = OnnxCausalLM(folder)
    quantised = OnnxCausalLM(folder, int8=True)
    reference_logits, _ = full.step(*args, full.empty_cache(1))
    logits, _ = quantised.step(*args, quantised.empty_cache(1))
    # int8 matrices (the embedding, a gather, stays float)
    assert (folder / "model.int8.onnx").stat().st_size < 0.75 * (folder / "model.onnx").stat().st_size
    error = np.abs(logits - reference_logits).max() / np.abs(reference_logits).max()
    assert 0 < error < 0.1, error  # quantised (not the same graph), and close
    with pytest.raises(FileNotFoundError, match="export it with --int8"):
        OnnxCausalLM(exported("v1")[1], int8=True)


def test_the_command_refuses_what_it_did_not_write_and_a_folder_without_a_model(tmp_path, tokenizer, capsys):
    trained_looking(tmp_path / "model", tokenizer, diff_version=2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "model"), str(tmp_path / "taken")]) == 1
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "not a model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="onnx_layout.json"):
        OnnxCausalLM(tmp_path / "model")
