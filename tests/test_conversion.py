"""Conversion on tiny random Llama, Mistral and Qwen2 sources; failures; the weight map at Llama-3 scale on meta."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import ROOT
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import modeling_diff
from conversion import ConversionError, WeightMap, convert
from conversion.__main__ import main
from conversion.output import MANIFEST_NAME
from conversion.weight_map import target_shapes

VOCAB = 100
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
SOURCES = {
    # Llama with what must survive: llama3 RoPE scaling, tied embeddings, an unusual eps, sharded weights.
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, rms_norm_eps=1e-5, head_dim=16),
    ),
    "mistral": (MistralForCausalLM, MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=False)),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, with special tokens and a chat template."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 32 + VOCAB - 3)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_source(folder, name: str, max_shard_size="40KB"):
    """A random tiny checkpoint of architecture `name`, saved in shards, with nonzero biases where it has any."""
    model_class, config = SOURCES[name]
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if key.endswith("bias") or "norm" in key:  # zeros and ones by default would hide a misplaced tensor
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture(params=list(SOURCES))
def source(request, tmp_path):
    folder = tmp_path / f"{request.param}-source"
    return request.param, folder, make_source(folder, request.param)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def leftovers(folder):
    """Everything in `folder`'s parent that a conversion into `folder` may have created."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith((folder.name, f".{folder.name}")))


def expected_parameters(source_model, strategy: str, preserve: bool) -> int:
    """The converted model's parameter count, computed independently of the weight map."""
    config = source_model.config
    hidden, h, h_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or hidden // h
    biased = config.model_type == "qwen2"
    per_layer = 0  # Qwen2's o_proj has no bias, and the converted one none either (o_proj_bias=False)
    if strategy == "v2":
        per_layer += hidden * h * d + hidden * h + (h * d if biased else 0)
    else:
        norm = 0 if (strategy == "widened" and preserve) else 2 * d
        per_layer += 4 * d + norm
        if strategy == "widened":
            per_layer += hidden * h * d * 2 + hidden * h_kv * d * 2 + (h * d + 2 * h_kv * d if biased else 0)
    return source_model.num_parameters() + config.num_hidden_layers * per_layer


@pytest.mark.parametrize("strategy", ["widened", "paired", "v2"])
def test_converts_and_loads_with_auto_classes(source, strategy, tmp_path):
    _, folder, source_model = source
    out = convert(
        source=folder, output=tmp_path / "out", strategy=strategy, preserve=False, verify=False, progress=False
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is modeling_diff.DiffLlamaForCausalLM
    config, source_config = model.config, source_model.config
    assert config.diff_version == (2 if strategy == "v2" else 1)
    h = source_config.num_attention_heads // (2 if strategy == "paired" else 1)
    assert (config.num_attention_heads, config.head_dim) == (h, 16)
    assert model.num_parameters() == expected_parameters(source_model, strategy, preserve=False)

    attention = model.model.layers[0].self_attn
    hidden, d = 64, 16
    q_rows = {"widened": 2 * 4 * d, "paired": 4 * d, "v2": 2 * 4 * d}[strategy]
    kv_rows = {"widened": 2 * 2 * d, "paired": 2 * d, "v2": 2 * d}[strategy]
    o_cols = {"widened": 4 * 2 * d, "paired": 4 * d, "v2": 4 * d}[strategy]
    assert attention.q_proj.weight.shape == (q_rows, hidden)
    assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (kv_rows, hidden)
    assert attention.o_proj.weight.shape == (hidden, o_cols)

    # Map 1 of every head is the source's head (paired: the source's matrix as a whole).
    source_q = source_model.model.layers[0].self_attn.q_proj.weight
    q = attention.q_proj.weight
    expected_q1 = source_q if strategy == "paired" else source_q.view(4, 1, d, hidden)
    got_q1 = q if strategy == "paired" else q.view(4, 2, d, hidden)[:, :1]
    torch.testing.assert_close(got_q1, expected_q1, rtol=0, atol=0)

    # Everything outside attention is the source's, untouched.
    source_state = source_model.state_dict()
    for key, tensor in model.state_dict().items():
        if "self_attn" not in key:
            torch.testing.assert_close(tensor, source_state[key], rtol=0, atol=0)
    assert model.config.tie_word_embeddings == source_config.tie_word_embeddings
    assert model.config.rope_parameters == source_config.rope_parameters
    assert model.config.rms_norm_eps == source_config.rms_norm_eps


@pytest.mark.parametrize("strategy", ["widened", "v2"])
def test_preserve_gives_the_source_logits(source, strategy, tmp_path):
    _, folder, source_model = source
    out = convert(
        source=folder, output=tmp_path / "out", strategy=strategy, preserve=True, verify=False, progress=False
    )
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.num_parameters() == expected_parameters(source_model, strategy, preserve=True)
    ids = torch.randint(3, VOCAB, (2, 24))
    torch.testing.assert_close(logits(model, ids), logits(source_model, ids), rtol=0, atol=1e-5)
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        torch.testing.assert_close(logits(model, ids), logits(source_model, ids), rtol=0, atol=1e-5)


def test_preserve_keeps_gradients_on_the_new_parameters(tmp_path):
    folder = tmp_path / "source"
    make_source(folder, "llama")
    ids = torch.randint(3, VOCAB, (2, 16))
    for strategy, names in {
        "widened": ("lambdas.lambda_q1", "lambdas.lambda_k2", "o_proj.weight"),
        "v2": ("lambda_proj.weight", "q_proj.weight"),
    }.items():
        out = convert(
            source=folder, output=tmp_path / strategy, strategy=strategy, preserve=True, verify=False, progress=False
        )
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        model(input_ids=ids, labels=ids).loss.backward()
        attention = model.model.layers[1].self_attn
        if strategy == "widened":
            assert attention.lambdas().item() == 0.0
            # o_proj's new columns (reading the new value half) learn from step 0.
            assert attention.o_proj.weight.grad.view(64, 4, 2, 16)[:, :, 1].abs().sum() > 0
        else:
            assert attention.q_proj.weight.grad.view(4, 2, 16, 64)[:, 1].abs().sum() > 0  # Q2
        for parameter_name in names:
            grad = attention.get_parameter(parameter_name).grad
            assert grad is not None and grad.abs().sum() > 0, parameter_name


def test_paired_preserve_and_odd_heads_are_refused(tmp_path):
    folder = tmp_path / "source"
    make_source(folder, "mistral")
    with pytest.raises(ConversionError, match="widened"):
        convert(source=folder, output=tmp_path / "out", strategy="paired", preserve=True, verify=False)
    assert leftovers(tmp_path / "out") == []


def test_output_folder_contents(tmp_path):
    folder = tmp_path / "source"
    make_source(folder, "llama")
    out = convert(
        source=folder,
        output=tmp_path / "out",
        strategy="widened",
        preserve=True,
        verify=False,
        max_shard_size="100KB",
        progress=False,
    )
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "configuration_diff.py",
        "modeling_diff.py",
        "generation_config.json",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
    } <= files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    for shard in shards:  # every file is valid safetensors that holds exactly what the index says
        with safe_open(out / shard, framework="pt") as file:
            assert set(file.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "diff_llama" and config["auto_map"]["AutoModelForCausalLM"]
    assert config["lambda_init"] == 0.0 and config["use_head_norm"] is False
    assert config["rope_parameters"] == LLAMA3_ROPE

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "</s>")
    card = (out / "README.md").read_text()
    for fact in ("# DiffLlama converted from source\n", "widened", "preserve `True`", "LlamaForCausalLM"):
        assert fact in card
    assert str(tmp_path) not in card  # a local path means nothing to a reader of a pushed model
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*")} - {MANIFEST_NAME}
    assert leftovers(out) == ["out"]


def test_same_seed_same_files(tmp_path):
    folder = tmp_path / "source"
    make_source(folder, "qwen2")
    outs = [
        convert(source=folder, output=tmp_path / f"out{i}", init="random", verify=False, progress=False)
        for i in range(2)
    ]
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


def test_verify_reports(tmp_path, caplog):
    folder = tmp_path / "source"
    make_source(folder, "llama")
    caplog.set_level("INFO", logger="conversion")
    convert(source=folder, output=tmp_path / "out", strategy="v2", preserve=True, progress=False)
    text = caplog.text
    assert "perplexity" in text and "greedy generation" in text and "identical generation: True" in text


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = "0" * 40
    snapshot = cache / "models--tiny--llama" / "snapshots" / commit
    make_source(snapshot, "llama")
    (snapshot / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny\n")
    (cache / "models--tiny--llama" / "refs").mkdir()
    (cache / "models--tiny--llama" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = convert(source="tiny/llama", output=tmp_path / "out", verify=False, progress=False)
    card = (out / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "base_model: tiny/llama" in front_matter and "license: mit" in front_matter
    assert "library_name: transformers" in front_matter and "revision=revision" in card
    with pytest.raises(ConversionError, match="hf download tiny/missing"):
        convert(source="tiny/missing", output=tmp_path / "other", verify=False)
    # A relative folder that is missing reads as a Hub id too: the message names the folder it looked for.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match=f"neither a folder \\({tmp_path}/models/llama does not exist\\)"):
        convert(source="models/llama", output=tmp_path / "other", verify=False)


# Failures leave nothing behind.


def test_unsupported_architecture(tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)).save_pretrained(folder)
    with pytest.raises(ConversionError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        convert(source=folder, output=tmp_path / "out", verify=False)
    assert leftovers(tmp_path / "out") == []


def test_corrupted_shard(tmp_path):
    folder = tmp_path / "source"
    make_source(folder, "llama")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConversionError, match=f"{shard.name}.*re-download"):
        convert(source=folder, output=tmp_path / "out", verify=False)
    assert leftovers(tmp_path / "out") == []


def test_existing_output_is_refused_and_kept(tmp_path):
    folder = tmp_path / "source"
    make_source(folder, "llama")
    out = convert(source=folder, output=tmp_path / "out", verify=False, progress=False)
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConversionError, match="an earlier conversion.*--overwrite"):
        convert(source=folder, output=out, strategy="widened", verify=False)
    assert (out / "model.safetensors").read_bytes() == first
    convert(source=folder, output=out, strategy="widened", overwrite=True, verify=False, progress=False)
    assert json.loads((out / "config.json").read_text())["diff_version"] == 1
    assert leftovers(out) == ["out"]


def test_killed_conversion_leaves_nothing_and_is_cleaned_next_run(tmp_path):
    folder = tmp_path / "source"
    make_source(folder, "llama")
    out, marker = tmp_path / "out", tmp_path / "halfway"
    # The child converts for real and stops after a few tensors, so the kill lands mid-way, every time.
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from conversion import writer
        write = writer.StreamingWriter.write
        def write_then_stall(self, key, tensor):
            write(self, key, tensor)
            if self.position == 5:
                open({str(marker)!r}, "w").close()
                time.sleep(600)
        writer.StreamingWriter.write = write_then_stall
        from conversion.__main__ import main
        main([{str(folder)!r}, {str(out)!r}, "--no-verify", "--no-progress"])
    """)
    process = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the conversion never got half-way"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not out.exists()
    # the killed run's temporary folder, and its lock on `out`, which the next run takes over (its process is gone)
    assert leftovers(out) == [f".out.converting-{process.pid}", ".out.lock"]
    convert(source=folder, output=out, verify=False, progress=False)
    assert leftovers(out) == ["out"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    with pytest.raises(ConversionError):
        main([str(tmp_path / "missing"), str(tmp_path / "out"), "--debug"])


# The weight map at real scale, on the meta device: no memory.

LLAMA_3 = {
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}


@pytest.mark.parametrize("size", list(LLAMA_3))
def test_weight_map_at_llama_3_scale(size):
    config = LlamaConfig(
        **LLAMA_3[size],
        num_key_value_heads=8,
        vocab_size=128256,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters={**LLAMA_3_ROPE},
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    with torch.device("meta"):
        source_state = LlamaForCausalLM(config).state_dict()
    hidden, h, d, layers = config.hidden_size, config.num_attention_heads, 128, config.num_hidden_layers
    for strategy in ("widened", "paired", "v2"):
        weight_map = WeightMap(
            source_config=config, source_keys=source_state, strategy=strategy, preserve=False, dtype=None
        )
        produced = {}
        for key, tensor in source_state.items():
            for name, converted in weight_map.convert(key, tensor):
                assert converted.device.type == "meta" and name not in produced
                produced[name] = converted.shape
        weight_map.check_complete()
        expected = target_shapes(weight_map.target_config)
        assert produced == expected
        # An independent count of the three shapes per strategy that change.
        q = produced["model.layers.0.self_attn.q_proj.weight"]
        v = produced["model.layers.0.self_attn.v_proj.weight"]
        o = produced[f"model.layers.{layers - 1}.self_attn.o_proj.weight"]
        if strategy == "widened":
            assert (q, v, o) == ((2 * h * d, hidden), (8 * 2 * d, hidden), (hidden, h * 2 * d))
        elif strategy == "paired":
            assert (q, v, o) == ((h * d, hidden), (8 * d, hidden), (hidden, h * d))
        else:
            assert (q, v, o) == ((2 * h * d, hidden), (8 * d, hidden), (hidden, h * d))
            assert produced["model.layers.0.self_attn.lambda_proj.weight"] == (h, hidden)


LLAMA_3_ROPE = {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}


def test_no_progress_silences_the_gguf_dequantisation_bar(capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    from conversion.sources import progress_bars

    with progress_bars(False):
        for _ in gguf_loader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert "de-quantizing" not in capfd.readouterr().err
    for _ in gguf_loader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):  # restored after
        pass
    assert "de-quantizing" in capfd.readouterr().err
