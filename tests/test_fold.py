"""DEX folded into a stock Llama: `conversion.fold` writes a `LlamaForCausalLM` folder with the DEX model's logits."""

import json

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import modeling_diff
from conftest import tiny_config
from conversion import ConversionError
from conversion.fold import export_folded, fold_dex, main
from finetune import lora_config
from test_trainer import byte_level_tokenizer

TOLERANCE = 1e-5  # fp32: o_proj's product reassociated, (W_o,i (I − λ W_D)) O_i against W_o,i ((I − λ W_D) O_i)


def trained_dex(**overrides):
    """A DEX model as after training: f_D and λ away from zero, a subset of heads in one layer."""
    torch.manual_seed(0)
    model = modeling_diff.DiffLlamaForCausalLM(
        tiny_config(diff_version="dex", dex_heads=[[0, 2], [0, 1, 2, 3]], tie_word_embeddings=True, **overrides)
    ).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.dex.weight.normal_(0, 0.3)
            layer.self_attn.dex.lambda_.fill_(0.6)
    return model


def test_the_folded_llama_computes_the_dex_model():
    model = trained_dex()
    llama = fold_dex(model)
    assert type(llama) is LlamaForCausalLM and llama.config.model_type == "llama"
    ids = torch.randint(1, 128, (2, 17))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(llama(ids).logits, expected, atol=TOLERANCE, rtol=0)
        # the fold is what makes them equal: the Llama with DEX's weights and no fold differs
        unfolded = LlamaForCausalLM(llama.config)
        unfolded.load_state_dict({k: v for k, v in model.state_dict().items() if ".dex." not in k}, strict=False)
        unfolded.tie_weights()
        assert (unfolded(ids).logits - expected).abs().max() > 100 * TOLERANCE


@pytest.fixture
def tokenizer():
    import shutil
    from pathlib import Path

    return byte_level_tokenizer([Path(shutil.__file__)])


def test_export_writes_a_stock_llama_folder_from_a_model_or_an_adapter(tmp_path, tokenizer):
    model = trained_dex(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "dex")
    tokenizer.save_pretrained(tmp_path / "dex")
    ids = torch.randint(1, len(tokenizer), (1, 12))

    assert main([str(tmp_path / "dex"), str(tmp_path / "llama")]) == 0
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and not list((tmp_path / "llama").glob("*.py"))
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert type(folded) is LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, model(ids).logits, atol=TOLERANCE, rtol=0)

    # a LoRA adapter on the DEX model (which records the folder of its base): merged, then folded
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dex").eval()
    peft = get_peft_model(model, lora_config(model, r=4)).eval()
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
        expected = peft(ids).logits
    peft.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    export_folded(tmp_path / "adapter", tmp_path / "from-adapter")
    folded = LlamaForCausalLM.from_pretrained(tmp_path / "from-adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, expected, atol=TOLERANCE, rtol=0)

    # the run copied to another machine, its base not there: named, with the fix, and nothing written
    (tmp_path / "dex").rename(tmp_path / "moved")
    with pytest.raises(ConversionError, match=r"trained on the base model .*/dex, which is not there .* set "
                                              r"base_model_name_or_path in .*adapter_config.json"):
        export_folded(tmp_path / "adapter", tmp_path / "after-the-move")
    assert not (tmp_path / "after-the-move").exists()


def test_what_cannot_fold_is_refused_with_the_reason(tmp_path, capsys):
    with pytest.raises(ConversionError, match="only DEX models fold.*diff_version 2"):
        fold_dex(modeling_diff.DiffLlamaForCausalLM(tiny_config(diff_version=2)))
    with pytest.raises(ConversionError, match="o_proj_bias .* differs from attention_bias"):
        fold_dex(modeling_diff.DiffLlamaForCausalLM(tiny_config(diff_version="dex", attention_bias=True,
                                                                  o_proj_bias=False)))
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "not a model folder or a LoRA adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# Largest logit error as a share of the logits' spread: measured 0.002 (f16) and 0.04 (Q8_0); queries and keys left in
# rotate-half order give 0.04 in f16.
@pytest.mark.parametrize("kind, tolerance", [("f16", 1e-2), ("q8_0", 1e-1)])
def test_the_folded_llama_as_gguf_reads_back_to_the_same_logits(tmp_path, tokenizer, kind, tolerance):
    """transformers' GGUF loader reads the file back (dequantised) to the DEX model's logits, within the storage
    type's error relative to the logits' spread."""
    from conversion.gguf_export import export_gguf

    model = trained_dex(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "dex")
    tokenizer.save_pretrained(tmp_path / "dex")
    export_folded(tmp_path / "dex", tmp_path / "llama")
    export_gguf(tmp_path / "llama", tmp_path / f"model.{kind}.gguf", type=kind)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=f"model.{kind}.gguf", dtype=torch.float32).eval()
    ids = torch.randint(1, len(tokenizer), (1, 12))
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert (got - expected).abs().max() < tolerance * expected.std()
    from transformers import AutoTokenizer

    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"model.{kind}.gguf")
    text = "def add(a, b):\n    return a + b\n"
    assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"]
