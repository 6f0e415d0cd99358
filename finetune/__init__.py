"""Fine-tuning DiffLlama (and its Llama baselines): LoRA defaults for PEFT and a `Trainer` recipe on code.

Importing the package registers `diff_llama` in PEFT's default-target mappings (see `finetune.lora`).
"""

from .data import CodeCorpus, PackedBlocks, build_corpus, default_data_dir, python_files, split_files
from .lora import default_target_modules, diff_modules_to_save, lora_config, register_peft_defaults
from .recipe import finetune, held_out_loss, prepare_model

__all__ = [
    "CodeCorpus",
    "PackedBlocks",
    "build_corpus",
    "default_data_dir",
    "default_target_modules",
    "diff_modules_to_save",
    "finetune",
    "held_out_loss",
    "lora_config",
    "prepare_model",
    "python_files",
    "register_peft_defaults",
    "split_files",
]
