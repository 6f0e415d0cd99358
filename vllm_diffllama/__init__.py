"""A vLLM plugin that serves DiffLlama checkpoints (versions 1, 2 and DEX) as native vLLM models.

vLLM calls `register` in each of its processes through the `vllm.general_plugins` entry point (setup.cfg). Nothing
else imports this package, so nothing changes for users without vLLM.
"""

# The names our folders list in `architectures`: the current one (configuration_diff.SAVED_ARCHITECTURES) and the
# one folders saved before it carry, which transformers' built-in `diffllama` also uses (`model.py` tells them apart
# by model type).
ARCHITECTURES = ("DifferentialLlamaForCausalLM", "DiffLlamaForCausalLM")
MODEL_CLASS = "vllm_diffllama.model:DiffLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    import configuration_diff  # noqa: F401  registers model type `diff_llama`, so no trust_remote_code is needed

    for name in ARCHITECTURES:
        ModelRegistry.register_model(name, MODEL_CLASS)
