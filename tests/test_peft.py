"""LoRA on DiffLlama: defaults, the trainable set, adapter round trip, merging, and reloading the merged model."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import modeling_diff
from conftest import tiny_config
from finetune.lora import default_target_modules, diff_modules_to_save, lora_config

LAYERS = 2
# Per layer, by what differential attention adds (the LoRA adapters are the same for every variant).
DIFF_PARAMETERS = {
    "v1": ["lambdas.lambda_q1", "lambdas.lambda_k1", "lambdas.lambda_q2", "lambdas.lambda_k2", "head_norm.weight"],
    "v1_no_norm": ["lambdas.lambda_q1", "lambdas.lambda_k1", "lambdas.lambda_q2", "lambdas.lambda_k2"],
    "v2": ["lambda_proj.weight"],
}
VARIANTS = {
    "v1": dict(diff_version=1),
    "v1_no_norm": dict(diff_version=1, use_head_norm=False),
    "v2": dict(diff_version=2),
}


def tiny_model(variant: str, seed: int = 0) -> modeling_diff.DiffLlamaForCausalLM:
    torch.manual_seed(seed)
    return modeling_diff.DiffLlamaForCausalLM(tiny_config(num_hidden_layers=LAYERS, **VARIANTS[variant])).eval()


def trainable_names(model) -> set[str]:
    """Trainable parameter names with PEFT's wrapper segments removed: `model.layers.0.self_attn.q_proj.lora_A`."""
    names = set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            name = name.removeprefix("base_model.model.")
            for segment in (".default", ".modules_to_save"):
                name = name.replace(segment, "")
            names.add(name)
    return names


def expected_names(variant: str, lora_modules, full_modules=()) -> set[str]:
    names = set()
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        attention = f"{prefix}.self_attn"
        names.update(f"{attention}.{name}" for name in DIFF_PARAMETERS[variant])
        for module in lora_modules:
            parent = attention if module in ("q_proj", "k_proj", "v_proj", "o_proj") else f"{prefix}.mlp"
            names.update({f"{parent}.{module}.lora_A.weight", f"{parent}.{module}.lora_B.weight"})
        names.update(f"{attention}.{module}.weight" for module in full_modules)
    return names


def perturb(peft_model) -> None:
    """Move every trainable parameter away from its initial value, as training would.

    LoRA's B starts at zero and λ at its conversion value: without this an adapter that lost them would still
    reproduce the outputs, and the round-trip tests could not fail.
    """
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def inputs() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))


def test_peft_mapping_knows_diff_llama():
    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["diff_llama"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # A bare LoraConfig (no target_modules) now resolves for our model type.
    model = get_peft_model(tiny_model("v2"), LoraConfig(task_type="CAUSAL_LM", r=4))
    assert trainable_names(model) == expected_names("v2", default_target_modules(model.config)) - {
        f"model.layers.{layer}.self_attn.lambda_proj.weight" for layer in range(LAYERS)
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_trainable_set(variant):
    model = get_peft_model(tiny_model(variant), lora_config(tiny_model(variant), r=4))
    assert trainable_names(model) == expected_names(variant, ["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.mark.parametrize(
    ("variant", "full_modules"),
    [("v1", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("v2", ["q_proj"])],
)
def test_lora_trainable_set_with_full_second_maps(variant, full_modules):
    base = tiny_model(variant)
    config = lora_config(base, r=4, second_maps="full")
    model = get_peft_model(base, config)
    lora_modules = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if name not in full_modules]
    lora_modules += ["gate_proj", "up_proj", "down_proj"]
    assert trainable_names(model) == expected_names(variant, lora_modules, full_modules)


def test_all_linear_leaves_lambda_proj_to_modules_to_save():
    model = get_peft_model(tiny_model("v2"), lora_config(tiny_model("v2"), r=4, target_modules="all-linear"))
    names = trainable_names(model)
    assert "model.layers.0.self_attn.lambda_proj.weight" in names
    assert not any("lambda_proj.lora" in name for name in names)
    assert "model.layers.0.mlp.up_proj.lora_A.weight" in names


def test_llama_baseline_gets_same_targets_and_nothing_to_save():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4)
    assert default_target_modules(config) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert diff_modules_to_save(config) == []
    assert lora_config(config).modules_to_save is None
    with pytest.raises(ValueError, match="no second maps"):
        lora_config(config, second_maps="full")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("second_maps", ["lora", "full"])
def test_adapter_round_trip(tmp_path, variant, second_maps):
    peft_model = get_peft_model(tiny_model(variant), lora_config(tiny_model(variant), r=4, second_maps=second_maps))
    perturb(peft_model)
    peft_model.eval()
    ids = inputs()
    with torch.no_grad():
        adapted = peft_model(ids).logits
        base_logits = tiny_model(variant)(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapter does change the function

    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    expected = {f"base_model.model.{name}" for name in trainable_names(peft_model)}
    assert set(saved) == expected  # λ, gains and lambda_proj (and full second maps) are in the file, nothing else

    reloaded = PeftModel.from_pretrained(tiny_model(variant), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merge_and_unload_then_auto_reload(tmp_path, variant):
    peft_model = get_peft_model(tiny_model(variant), lora_config(tiny_model(variant), r=4))
    perturb(peft_model)
    peft_model.eval()
    ids = inputs()
    with torch.no_grad():
        adapted = peft_model(ids).logits

    merged = peft_model.merge_and_unload()
    assert type(merged) is modeling_diff.DiffLlamaForCausalLM
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is modeling_diff.DiffLlamaForCausalLM
    assert reloaded.config.model_type == "diff_llama"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, rtol=0, atol=0)
