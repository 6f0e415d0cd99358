"""A stock Llama folder (a folded DEX model, say) written as one GGUF file for llama.cpp, Ollama and other GGUF runtimes.

Weights in f16 or Q8_0 (norms stay f32, as llama.cpp's own converter keeps them); queries and keys permuted from
Llama's rotate-half order to the interleaved order GGUF Llama files use (transformers' GGUF loader undoes it); the
byte-level BPE tokenizer (vocabulary, merges, special tokens, chat template) in the file's metadata.

    python -m conversion.gguf_export runs/dex-llama runs/dex-llama.Q8_0.gguf --type q8_0
"""

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from .errors import ConversionError
from .help import HelpFormatter, run_command

TYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def to_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order (j, j + d/2) to the interleaved pairs (2j, 2j+1) GGUF Llama uses."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def _check(config) -> None:
    if config.model_type != "llama":
        raise ConversionError(
            f"GGUF export takes a Llama folder, not model_type {config.model_type!r}; fold a DEX model first "
            "(python -m conversion.fold)."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_type {rope['rope_type']!r} is not written to GGUF here; only the default rotary.")
    if config.attention_bias or config.mlp_bias:
        raise ConversionError("biases on the attention or MLP projections are not written to GGUF here.")


def _tokenizer_metadata(writer: gguf.GGUFWriter, folder: Path) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no tokenizer.json: the GGUF file needs the tokenizer's vocabulary.")
    spec = json.loads(path.read_text())
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ConversionError("only byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) are written to GGUF here.")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    vocab = tokenizer.get_vocab()
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_tokens) | {t["content"] for t in spec.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token if token is not None else f"[PAD{i}]" for i, token in enumerate(tokens)])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in tokens]
    )
    writer.add_token_merges(merges)
    for name, index in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if index is not None:
            getattr(writer, f"add_{name}_token_id")(index)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(folder: str | Path, path: str | Path, *, type: str = "f16") -> Path:
    """Write the Llama in `folder` to the GGUF file `path`, its 2-D weights as `type` ("f16" or "q8_0")."""
    if type not in TYPES:
        raise ConversionError(f"unknown GGUF type {type!r}: use one of {', '.join(TYPES)}.")
    folder, path = Path(folder), Path(path)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = model.config
    _check(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[type])
    _tokenizer_metadata(writer, folder)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # GGUF runtimes tie it to token_embd, as the config says
        name = names.get_name(key.removesuffix(".weight"))
        if name is None:
            raise ConversionError(f"no GGUF name for the tensor {key!r}")
        data = tensor.numpy()
        if key.endswith("self_attn.q_proj.weight"):
            data = to_interleaved(data, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            data = to_interleaved(data, config.num_key_value_heads)
        if data.ndim == 1:  # norms: f32
            writer.add_tensor(f"{name}.weight", data.astype(np.float32))
        elif type == "f16":
            writer.add_tensor(f"{name}.weight", data.astype(np.float16))
        else:  # bytes of 32-value blocks; the writer recovers the shape from them
            writer.add_tensor(f"{name}.weight", gguf.quants.quantize(data, TYPES[type]), raw_dtype=TYPES[type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m conversion.gguf_export", description=__doc__,
                                  formatter_class=HelpFormatter)
    cli.add_argument("folder", metavar="LLAMA_FOLDER", help="a LlamaForCausalLM folder (e.g. from conversion.fold)")
    cli.add_argument("path", metavar="GGUF_FILE", help="the .gguf file to write")
    cli.add_argument("--type", choices=list(TYPES), default="f16", help="how the weight matrices are stored")
    args = cli.parse_args(argv)
    return run_command(lambda: export_gguf(args.folder, args.path, type=args.type), "wrote {}")


if __name__ == "__main__":
    sys.exit(main())
