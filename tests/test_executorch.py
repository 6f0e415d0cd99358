"""ExecuTorch: `python -m diffllama_executorch` exports every version (tested here: versions 1 and 2) to one `.pte`
program lowered to XNNPACK, the KV cache inside (version 1's sized from `cache_head_dim`, which transformers' own
ExecuTorch path cannot do), and `ExecuTorchCausalLM` generates our `generate()`'s tokens from it in the ExecuTorch
runtime."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import ROOT
from diffllama_executorch import ExecuTorchCausalLM, export
from diffllama_executorch.__main__ import main
from test_onnx import NEW_TOKENS, PROMPTS, reference, tokenizer, trained_looking  # noqa: F401  (a fixture)

# DEX lowers through the same step as version 2 (only its attention module differs); a lowering takes half a minute,
# so DEX is checked on the SmolLM2 conversion by benchmarks/local_inference.py (greedy tokens equal to transformers')
# and through transformers' own ExecuTorch path in tests/test_torch_export.py.
MODELS = {
    "v1": dict(diff_version=1),  # caches [K1 | K2] and 2d-wide values
    "v2": dict(diff_version=2),
}
MAX_CACHE_LEN = 40


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):  # noqa: F811
    """`exported(name)`: our model and its ExecuTorch folder, exported once per module (version 1 by the command)."""
    done = {}

    def get(name: str):
        if name not in done:
            folder = tmp_path_factory.mktemp(name)
            model = trained_looking(folder / "model", tokenizer, **MODELS[name])
            if name == "v1":
                assert main([str(folder / "model"), str(folder / "pte"), "--max-cache-len", str(MAX_CACHE_LEN)]) == 0
                done[name] = model, folder / "pte"
            else:
                done[name] = model, export(folder / "model", folder / "pte", max_cache_len=MAX_CACHE_LEN)
        return done[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_executorch_generates_our_tokens(exported, name):
    model, folder = exported(name)
    program = ExecuTorchCausalLM(folder)
    expected = [reference(model, prompt) for prompt in PROMPTS]
    assert program.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == expected
    assert program.generate(PROMPTS[::-1], max_new_tokens=NEW_TOKENS) == expected[::-1]  # the cache starts over
    # The prompt's logits, read in one call, at every position of the longest prompt.
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[2]])).logits[0].numpy()
    assert np.abs(program.step(PROMPTS[2], 0) - logits).max() <= 1e-4 * np.abs(logits).max()
    layout = json.loads((folder / "executorch_layout.json").read_text())
    assert layout["max_cache_len"] == MAX_CACHE_LEN and layout["diff_version"] == model.config.diff_version


def test_sampling_and_end_of_sequence(exported):
    model, folder = exported("v2")
    program = ExecuTorchCausalLM(folder)
    sampled = program.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.5, seed=3)
    assert sampled == program.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.5, seed=3)
    assert sampled != program.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.5, seed=4)
    assert all(0 <= token < model.config.vocab_size for tokens in sampled for token in tokens)
    greedy = program.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert program.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1) == greedy
    stop = greedy[0][2]  # the third token of the first prompt: generation ends there, the token kept
    assert program.generate(PROMPTS[:1], max_new_tokens=NEW_TOKENS, eos_token_id=stop)[0] == greedy[0][:3]


def test_the_local_inference_benchmark_measures_an_export(exported, monkeypatch):
    """benchmarks/local_inference.py's ExecuTorch measurement: the perplexity of the model's own forward pass and
    the greedy tokens of generate()."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import local_inference

    model, folder = exported("v2")
    blocks = torch.tensor([PROMPTS[2] + PROMPTS[3]])
    record = local_inference.measure_executorch(folder, blocks, torch.tensor([PROMPTS[0]]), NEW_TOKENS - 1, 1)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(blocks).logits[0, :-1], blocks[0, 1:])
    assert record["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert record["tokens"] == reference(model, PROMPTS[0]) and math.isfinite(record["decode_tok_s"])


def test_what_the_program_cannot_hold_is_refused(exported, tmp_path):
    _, folder = exported("v2")
    program = ExecuTorchCausalLM(folder)
    with pytest.raises(ValueError, match=r"exceed the program's cache of 40 tokens: export with a larger "
                                         r"--max-cache-len"):
        program.generate([list(range(30))], max_new_tokens=12)
    assert len(program.generate([list(range(30))], max_new_tokens=11)[0]) == 11  # exactly fills the cache
    with pytest.raises(ValueError, match="exceed the program's cache of 40 tokens"):
        program.step(list(range(41)), 0)
    with pytest.raises(FileNotFoundError, match="has no executorch_layout.json"):
        ExecuTorchCausalLM(tmp_path)
