"""ExecuTorch for DiffLlama: `python -m diffllama_executorch` exports a model folder (every version) to one `.pte`
program lowered to XNNPACK, its KV cache inside, and `ExecuTorchCausalLM` generates with it in the ExecuTorch
runtime."""

from .export import StaticCacheStep, export, export_program
from .runtime import ExecuTorchCausalLM

__all__ = ["ExecuTorchCausalLM", "StaticCacheStep", "export", "export_program"]
