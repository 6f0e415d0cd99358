"""ONNX Runtime for DiffLlama: `python -m diffllama_onnx` exports a model folder (every version) to one ONNX graph
with the KV cache as its inputs and outputs, and `OnnxCausalLM` generates with it on onnxruntime."""

from .export import CachedStep, export, export_model, quantize_int8
from .runtime import OnnxCausalLM

__all__ = ["CachedStep", "OnnxCausalLM", "export", "export_model", "quantize_int8"]
