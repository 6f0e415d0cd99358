"""DEX folded into a stock Llama, so that every Llama runtime (llama.cpp, Ollama, MLX, ONNX Runtime) runs it unchanged.

DEX keeps Llama's attention and differences the output of selected heads before `o_proj`. For a selected head i
with output O_i (a d-vector), f_D its d×d map and λ its layer's scalar,

    O_i − λ·f_D(O_i) = (I − λ·W_D) O_i,

a linear map, so `o_proj`, which reads O_i through its columns W_o,i (hidden × d), absorbs it: W_o,i ← W_o,i (I − λ·W_D).
The folded model is a `LlamaForCausalLM` computing the DEX model's function, its logits equal to rounding.
Versions 1 and 2 do not fold: their two softmax maps are not a linear function of one head's output.

    python -m conversion.fold runs/dex-lora runs/dex-llama      # a DEX folder, or a LoRA adapter on one
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

import modeling_diff  # noqa: F401  our model type, so DEX folders load without trust_remote_code

from . import output as outputs
from .errors import ConversionError
from .help import HelpFormatter, run_command

# Fields of our config that a Llama does not have.
OURS = ("diff_version", "dex_heads", "lambda_init", "lambda_std_dev", "use_head_norm", "o_proj_bias", "auto_map")
NOT_COPIED = ("model_type", "architectures", "transformers_version", *OURS)


def fold_dex(model) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` computing the function of the DEX `model` (a `DiffLlamaForCausalLM`)."""
    config = model.config
    if getattr(config, "diff_version", None) != "dex":
        version = getattr(config, "diff_version", config.model_type)
        raise ConversionError(
            f"only DEX models fold into a Llama, and this one is diff_version {version!r}: its two softmax maps are "
            "not a linear function of one head's output. Serve it with vLLM or export it to ONNX instead."
        )
    if config.o_proj_bias is not None and config.o_proj_bias != config.attention_bias:
        raise ConversionError(
            f"o_proj_bias ({config.o_proj_bias}) differs from attention_bias ({config.attention_bias}), as in models "
            "converted from Qwen2: a Llama gives all four projections a bias or none, so it cannot hold this model."
        )
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.to_dict().items() if k not in NOT_COPIED}))
    d = config.head_dim
    state = {}
    for key, tensor in model.state_dict().items():
        if ".self_attn.dex." not in key:
            state[key] = tensor
    for layer_idx, layer in enumerate(model.model.layers):
        dex = layer.self_attn.dex
        key = f"model.layers.{layer_idx}.self_attn.o_proj.weight"
        folded = state[key].double().clone()  # (hidden, h·d)
        correction = torch.eye(d, dtype=torch.float64) - dex.lambda_.double() * dex.weight.double()  # I − λ·W_D
        for head in dex.heads:
            columns = slice(head * d, (head + 1) * d)
            folded[:, columns] = folded[:, columns] @ correction
        state[key] = folded.to(state[key].dtype)
    missing, unexpected = llama.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConversionError(f"the folded weights do not fit a Llama: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        llama.tie_weights()
    return llama.to(next(model.parameters()).dtype).eval()


def check_adapter_base(adapter: Path) -> None:
    """Refuse an adapter whose recorded base model folder is gone, naming it and the fix (PEFT would read the path
    as a Hub id and fail with "Repo id must be in the form ...")."""
    import json

    config_file = adapter / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise ConversionError(f"{config_file} cannot be read ({error}): the adapter folder is damaged.") from None
    if not base:
        raise ConversionError(f"{config_file} names no base model (base_model_name_or_path): set it to the base folder.")
    path = Path(base).expanduser()
    if (path.is_absolute() or base.startswith(".") or base.count("/") > 1) and not path.is_dir():
        raise ConversionError(
            f"the adapter in {adapter} was trained on the base model {base}, which is not there (moved, or the run was "
            f"copied from another machine): put the base model back at that path, or set base_model_name_or_path in "
            f"{config_file} to where it is now."
        )


def load_for_export(source: Path):
    """The DEX model in `source`: a saved model, or a LoRA adapter (merged into its base)."""
    if (source / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        check_adapter_base(source)

        import finetune  # noqa: F401  registers our model type with PEFT

        return AutoPeftModelForCausalLM.from_pretrained(source, dtype=torch.float32).merge_and_unload()
    if not (source / "config.json").is_file():
        raise ConversionError(f"{source} is not a model folder or a LoRA adapter folder: check the path.")
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)


def export_folded(source: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write the DEX model in `source` (a model folder or a LoRA adapter on one) to `output` as a stock Llama folder:
    weights, config (`model_type: llama`, no `auto_map`, no code files), tokenizer and generation config.

    The folder is written beside `output` and renamed into place when complete, as conversions are.
    """
    source, output = outputs.export_paths(source, output, overwrite=overwrite)
    llama = fold_dex(load_for_export(source))
    tokenizer = AutoTokenizer.from_pretrained(source)
    with outputs.staged(output, {"folded_from": str(source)}) as temp:
        llama.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        if (source / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(source).save_pretrained(temp)
    return output


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m conversion.fold", description=__doc__, formatter_class=HelpFormatter)
    cli.add_argument("source", metavar="SOURCE", help="a DEX model folder, or a LoRA adapter folder on one")
    cli.add_argument("output", metavar="OUTPUT", help="the Llama folder to write")
    cli.add_argument("--overwrite", action="store_true", help="replace OUTPUT if an earlier export or conversion wrote it")
    args = cli.parse_args(argv)
    return run_command(lambda: export_folded(args.source, args.output, overwrite=args.overwrite),
                       "wrote {}: a LlamaForCausalLM (model_type llama), no custom code")


if __name__ == "__main__":
    sys.exit(main())
