"""TRL's trainers given our folder as a path: the model, and the reference model TRL builds by default, are ours.

TRL loads a model given by path with `getattr(transformers, config.architectures[0])`, falling back to `auto_map`
(its `create_model_from_path`), and DPO, GRPO, RLOO and KTO build their default reference model the same way. Before
folders named their class `DifferentialLlamaForCausalLM`, that lookup returned transformers' built-in `diffllama`
and loading failed.
"""

import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

import modeling_diff
from conftest import tiny_config
from test_trainer import byte_level_tokenizer

QUIET = dict(report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, save_strategy="no")


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = byte_level_tokenizer([Path(shutil.__file__)])
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def folder_of(tmp_path, tokenizer, version) -> str:
    folder = tmp_path / f"v{version}"
    torch.manual_seed(0)
    config = tiny_config(diff_version=version, vocab_size=len(tokenizer), eos_token_id=0, pad_token_id=0)
    modeling_diff.DiffLlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("version", [1, 2, "dex"])
def test_dpo_with_the_default_reference_model(tmp_path, tokenizer, version):
    folder = folder_of(tmp_path, tokenizer, version)
    data = Dataset.from_list([{"prompt": "def add(a, b):", "chosen": " return a + b", "rejected": " pass"}] * 4)
    trainer = DPOTrainer(model=folder, train_dataset=data, processing_class=tokenizer,
                         args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=2,
                                        **QUIET))
    assert type(trainer.model) is modeling_diff.DiffLlamaForCausalLM
    assert type(trainer.ref_model) is modeling_diff.DiffLlamaForCausalLM
    before = {name: p.detach().clone() for name, p in trainer.ref_model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert all(torch.equal(p, before[name]) for name, p in trainer.ref_model.named_parameters())  # frozen


def test_sft_and_grpo_from_a_path(tmp_path, tokenizer):
    folder = folder_of(tmp_path, tokenizer, 2)
    sft = SFTTrainer(model=folder, train_dataset=Dataset.from_list([{"text": "def f(x):\n    return x\n"}] * 4),
                     args=SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2,
                                    **QUIET))
    assert type(sft.model) is modeling_diff.DiffLlamaForCausalLM
    sft.train()

    def longer_is_better(completions, **kwargs):  # a tiny reward: enough to exercise the loop
        return [float(len(completion)) for completion in completions]

    grpo = GRPOTrainer(model=folder, reward_funcs=longer_is_better,
                       train_dataset=Dataset.from_list([{"prompt": "def add(a, b):"}] * 4),
                       args=GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=2,
                                       num_generations=2, max_completion_length=8, beta=0.1, **QUIET))
    assert type(grpo.model) is modeling_diff.DiffLlamaForCausalLM
    assert type(grpo.ref_model) is modeling_diff.DiffLlamaForCausalLM  # beta > 0: a reference model, by path
    grpo.train()
    assert grpo.state.global_step == 2
