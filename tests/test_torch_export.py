"""transformers' ExecuTorch path (`TorchExportableModuleForDecoderOnlyLM`, a static cache under `torch.export`)
exports versions 2 and DEX, and the exported program decodes our tokens; version 1 is refused by name, since that
path sizes its cache from `head_dim` and version 1 caches 2·head_dim."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

import modeling_diff
from conftest import tiny_config

PROMPT = [5, 17, 99, 3]


def static_cache_model(version, **overrides):
    torch.manual_seed(0)
    model = modeling_diff.DiffLlamaForCausalLM(tiny_config(diff_version=version, vocab_size=384, **overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4)  # peaked logits: greedy choices far from ties
        for layer in model.model.layers:
            if version == "dex":
                layer.self_attn.dex.weight.normal_(0, 0.3)
                layer.self_attn.dex.lambda_.fill_(0.7)
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static", max_length=32,
                                               cache_config={"batch_size": 1, "max_cache_len": 32})
    return model


@pytest.mark.parametrize("version", [2, "dex"])
def test_the_exported_static_cache_program_decodes_our_tokens(version):
    model = static_cache_model(version)
    program = TorchExportableModuleForDecoderOnlyLM(model).export(input_ids=torch.tensor([[1]]),
                                                                   cache_position=torch.tensor([0]))
    step = program.run_decompositions().module()  # the core-ATen program ExecuTorch lowers (to_edge does this)
    tokens, logits = [], None
    with torch.no_grad():
        for position, token in enumerate(PROMPT):
            logits = step(input_ids=torch.tensor([[token]]), cache_position=torch.tensor([position]))
        for position in range(len(PROMPT), len(PROMPT) + 8):
            tokens.append(int(logits[0, -1].argmax()))
            logits = step(input_ids=torch.tensor([[tokens[-1]]]), cache_position=torch.tensor([position]))
        expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(PROMPT):].tolist()
    assert tokens == expected


def test_version_1_is_refused_naming_the_cache_width():
    model = static_cache_model(1)
    with pytest.raises(Exception, match=r"caches keys and values 16 wide \(config.cache_head_dim"):
        TorchExportableModuleForDecoderOnlyLM(model).export(input_ids=torch.tensor([[1]]),
                                                            cache_position=torch.tensor([0]))
