"""DEX's λ schedule (arXiv 2505.16333): a converted DEX model starts with λ = 0, exactly its source, and λ is
annealed upwards while it trains, so the learned f_D enters the attention output gradually.

The schedule is linear, from 0 at the first optimizer step to `max_lambda` after `anneal_fraction` of the run,
then constant. The paper anneals λ from 0 but its schedule's exact form is not public; a linear warm-up over the
first quarter of the run to λ = 1 (where `O − λ·f_D(O)` is plain `O − f_D(O)`) is the simple rule used here. λ is a
buffer of each layer's `DiffLlamaDex` module, saved with the model (and in a LoRA adapter, with f_D, through
`modules_to_save`), so a trained model carries the λ it ended with.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

DEX_MODULE = "DiffLlamaDex"  # matched by name: a model loaded as remote code has its own copy of the class


def dex_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every DEX module of `model`, the copies a PEFT `modules_to_save` wrapper trains included."""
    return [module for module in model.modules() if type(module).__name__ == DEX_MODULE]


@torch.no_grad()
def set_dex_lambda(model: torch.nn.Module, value: float) -> None:
    for module in dex_modules(model):
        module.lambda_.fill_(value)


class DexLambdaCallback(TrainerCallback):
    """Sets λ of every DEX layer before each optimizer step, `max_lambda · min(1, step / (anneal_fraction · steps))`."""

    def __init__(self, *, max_lambda: float = 1.0, anneal_fraction: float = 0.25):
        if not 0.0 < anneal_fraction <= 1.0:
            raise ValueError(f"anneal_fraction ({anneal_fraction}) must lie in (0, 1]")
        self.max_lambda = max_lambda
        self.anneal_fraction = anneal_fraction

    def lambda_at(self, step: int, max_steps: int) -> float:
        anneal_steps = max(1, round(self.anneal_fraction * max_steps))
        return self.max_lambda * min(1.0, step / anneal_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        set_dex_lambda(model, self.lambda_at(state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # The value the last update was heading for, so the saved model is the one the schedule describes.
        set_dex_lambda(model, self.lambda_at(state.global_step, state.max_steps))


def dex_callbacks(model: torch.nn.Module) -> list[TrainerCallback]:
    """The callbacks a `Trainer` needs for `model`: the λ schedule when it has DEX layers, else none."""
    return [DexLambdaCallback()] if dex_modules(model) else []
