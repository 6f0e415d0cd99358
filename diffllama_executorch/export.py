"""Export to ExecuTorch: one `.pte` program for every step of generation, its KV cache held inside.

transformers' ExecuTorch path (`TorchExportableModuleForDecoderOnlyLM`) sizes its static cache from `head_dim`,
which holds for versions 2 and DEX; version 1 caches [K1 | K2] and a 2d-wide value per KV head. `StaticCacheStep`
is the same recipe with the cache sized from `config.cache_head_dim`, so every version exports without changing
transformers: a `StaticCache` allocated up front, its tensors registered as buffers (the program's mutable state),
and a forward of `input_ids` (1, new tokens) and `cache_position` (new tokens) returning the logits. New tokens are
dynamic, so a prompt is read in one call and each generated token in one more. The program is lowered with the
XNNPACK partitioner, the CPU backend ExecuTorch runs on phones and laptops; `runtime.ExecuTorchCausalLM` drives it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, StaticCache

from conversion import output as outputs
from conversion.errors import ConversionError
from conversion.fold import load_for_export
from diffllama_onnx.export import cache_shape

PROGRAM_FILE = "model.pte"
LAYOUT_FILE = "executorch_layout.json"  # what the runtime needs to know of the program: its cache length, ids
MAX_CACHE_LEN = 2048


class StaticCacheStep(nn.Module):
    """One generation step of a causal LM over a static cache the module owns (batch 1)."""

    def __init__(self, model, *, max_cache_len: int):
        super().__init__()
        self.model = model
        config = model.config
        width = cache_shape(config)["head_dim"]  # cache_head_dim: 2·head_dim in version 1
        self.cache = StaticCache(max_cache_len=max_cache_len, config=config)
        # allocated now, not at the first update: torch.export needs the tensors before tracing
        self.cache.early_initialization(1, config.num_key_value_heads, width, model.dtype, model.device)
        for index, layer in enumerate(self.cache.layers):  # buffers: the program's state, updated in place
            self.register_buffer(f"key_cache_{index}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{index}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{index}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # Where the new tokens go: set from cache_position at every call, so one program serves any number of
        # generations (a new prompt at position 0 overwrites the old cache; the causal mask hides what lies beyond).
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        return self.model(input_ids=input_ids, cache=self.cache, use_cache=True).logits


def export_program(model, *, max_cache_len: int = MAX_CACHE_LEN) -> bytes:
    """`model` (eval mode, float32) as an ExecuTorch program lowered to XNNPACK: the bytes of a `.pte` file."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    step = StaticCacheStep(model, max_cache_len=max_cache_len).eval()
    new_tokens = torch.export.Dim("new_tokens", min=1, max=max_cache_len)
    example = {"input_ids": torch.tensor([[1, 2, 3]]), "cache_position": torch.arange(3)}
    with torch.no_grad():
        program = torch.export.export(step, (), example, strict=True,
                                      dynamic_shapes={"input_ids": {1: new_tokens}, "cache_position": {0: new_tokens}})
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        # The cache starts as zeros written into the file, not as whatever memory the runtime hands out: the causal
        # mask gives positions beyond the tokens a weight of 0, but 0 times a NaN left in memory is still a NaN.
        zeros = InitializedMutableBufferPass(["key_cache_", "value_cache_", "cumulative_length_"])
        return lowered.to_executorch(ExecutorchBackendConfig(passes=[zeros])).buffer


def export(source: str | Path, output: str | Path, *, max_cache_len: int = MAX_CACHE_LEN,
           overwrite: bool = False) -> Path:
    """Write the model in `source` (a model folder, or a LoRA adapter merged into its base) to the folder `output`:
    `model.pte`, the tokenizer, `config.json` and `executorch_layout.json`. A prompt and its generation together
    hold at most `max_cache_len` tokens.

    The folder is built beside `output` and renamed into place when complete, as conversions are.
    """
    try:
        import executorch.exir  # noqa: F401  checked before minutes of export
    except ImportError as error:
        raise ConversionError(f"the ExecuTorch export needs the executorch package ({error}): "
                              "pip install -e '.[executorch]'") from None
    if max_cache_len < 2:
        raise ConversionError(f"max_cache_len {max_cache_len}: a prompt and its generation need at least 2 tokens")
    source, output = outputs.export_paths(source, output, overwrite=overwrite)
    model = load_for_export(source).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    with outputs.staged(output, {"exported_from": str(source), "format": "executorch"}) as temp:
        (temp / PROGRAM_FILE).write_bytes(export_program(model, max_cache_len=max_cache_len))
        layout = {"max_cache_len": max_cache_len, "vocab_size": model.config.vocab_size, "backend": "xnnpack",
                  "diff_version": getattr(model.config, "diff_version", None)}
        (temp / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
        model.config.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
    return output
