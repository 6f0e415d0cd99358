"""Export to ONNX: one graph for every step of generation, the KV cache an input and an output.

The graph takes `input_ids` (batch, new tokens), `attention_mask` (batch, cached + new tokens; 0 on left padding),
`position_ids` (batch, new tokens) and, for every layer, `past_key_N` and `past_value_N` (batch, KV heads, cached
tokens, `cache_head_dim`: 2·head_dim for version 1, whose cache holds [K1 | K2] and a 2d-wide value), and returns
`logits` and `present_key_N` / `present_value_N`, the cache grown by the new tokens. Batch, new tokens and cached
tokens are dynamic: the first step passes an empty cache (0 cached tokens), later steps one token each. The export
traces our own model (`torch.onnx.export(..., dynamo=True)`), so versions 1, 2 and DEX run in ONNX Runtime exactly as
they compute in PyTorch; `runtime.OnnxCausalLM` drives the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, DynamicCache

from conversion import output as outputs
from conversion.errors import ConversionError
from conversion.fold import load_for_export

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
LAYOUT_FILE = "onnx_layout.json"  # what the runtime needs to know of the graph: cache shapes, names, ids
OPSET = 18


class CachedStep(nn.Module):
    """One generation step of a causal LM over an explicit cache: the function the graph computes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_shape(config) -> dict:
    """The per-layer cache layout of a DiffLlama (or Llama) config."""
    width = getattr(config, "cache_head_dim", None) or getattr(config, "head_dim", None)
    if width is None:
        width = config.hidden_size // config.num_attention_heads
    return {"layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads, "head_dim": width}


def names(layers: int) -> tuple[list[str], list[str]]:
    cache = [f"{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_{name}" for name in cache],
            ["logits"] + [f"present_{name}" for name in cache])


def example_inputs(config, *, batch=2, new=4, cached=3):
    shape = cache_shape(config)
    past = tuple(torch.randn(batch, shape["kv_heads"], cached, shape["head_dim"]) for _ in range(2 * shape["layers"]))
    ids = torch.randint(0, config.vocab_size, (batch, new))
    mask = torch.ones(batch, cached + new, dtype=torch.long)
    positions = torch.arange(cached, cached + new).expand(batch, new).contiguous()
    return ids, mask, positions, past


def export_model(model, path: Path, *, opset: int = OPSET) -> None:
    """Write `model` (in eval mode, float32) as an ONNX graph of `CachedStep` to `path`."""
    config = model.config
    dynamic = torch.export.Dim.DYNAMIC
    cache_dims = tuple({0: dynamic, 2: dynamic} for _ in range(2 * config.num_hidden_layers))
    dims = ({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, cache_dims)
    input_names, output_names = names(config.num_hidden_layers)
    with torch.no_grad():
        torch.onnx.export(CachedStep(model).eval(), example_inputs(config), str(path), dynamo=True,
                          dynamic_shapes=dims, input_names=input_names, output_names=output_names,
                          opset_version=opset, external_data=False, verbose=False)


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantisation: int8 weights of the matrix multiplications, activations quantised per
    call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def export(source: str | Path, output: str | Path, *, int8: bool = False, overwrite: bool = False,
           opset: int = OPSET) -> Path:
    """Write the model in `source` (a model folder, or a LoRA adapter merged into its base) to the folder `output`:
    `model.onnx` (and with `int8` `model.int8.onnx`), the tokenizer, `config.json` and `onnx_layout.json`.

    The folder is built beside `output` and renamed into place when complete, as conversions are.
    """
    try:
        import onnxruntime  # noqa: F401  checked before minutes of export
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ConversionError(f"the ONNX export needs onnx, onnxscript and onnxruntime ({error}): "
                              "pip install -e '.[onnx]'") from None
    source, output = outputs.export_paths(source, output, overwrite=overwrite)
    model = load_for_export(source).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    with outputs.staged(output, {"exported_from": str(source), "format": "onnx"}) as temp:
        export_model(model, temp / MODEL_FILE, opset=opset)
        files = [MODEL_FILE]
        if int8:
            quantize_int8(temp / MODEL_FILE, temp / INT8_FILE)
            files.append(INT8_FILE)
        input_names, output_names = names(model.config.num_hidden_layers)
        layout = {**cache_shape(model.config), "vocab_size": model.config.vocab_size, "files": files,
                  "inputs": input_names, "outputs": output_names,
                  "diff_version": getattr(model.config, "diff_version", None), "opset": opset}
        (temp / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
        model.config.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
    return output
