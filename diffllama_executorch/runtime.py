"""Generation in the ExecuTorch runtime from a folder `python -m diffllama_executorch` wrote.

    from diffllama_executorch import ExecuTorchCausalLM

    model = ExecuTorchCausalLM("out/SmolLM2-135M-Instruct-v2-executorch")
    ids = model.tokenizer(["def fibonacci(n):", "import os"])["input_ids"]
    print(model.tokenizer.batch_decode(model.generate(ids, max_new_tokens=32)))

The program holds a batch-1 cache, so prompts run one after the other: each prompt in one call from position 0,
then one call per generated token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffllama_onnx.runtime import ExportedFolder, sample

from .export import LAYOUT_FILE, PROGRAM_FILE


class ExecuTorchCausalLM(ExportedFolder):
    """An exported program, its layout and tokenizer; `generate` decodes greedily or by sampling."""

    def __init__(self, folder: str | Path):
        from executorch.runtime import Runtime

        super().__init__(folder, LAYOUT_FILE, "python -m diffllama_executorch")
        self.method = Runtime.get().load_program(self.folder / PROGRAM_FILE).load_method("forward")

    def step(self, input_ids: list[int], position: int) -> np.ndarray:
        """Logits (new tokens, vocabulary) for `input_ids` placed at `position` onwards of the cache."""
        if position + len(input_ids) > self.layout["max_cache_len"]:
            raise ValueError(f"tokens up to position {position + len(input_ids)} exceed the program's cache of "
                             f"{self.layout['max_cache_len']} tokens: export with a larger --max-cache-len")
        ids = torch.tensor([input_ids], dtype=torch.long)
        positions = torch.arange(position, position + len(input_ids), dtype=torch.long)
        return self.method.execute([ids, positions])[0][0].numpy()

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos_token_id: int | None = None) -> list[list[int]]:
        """The new tokens of each prompt (token ids), greedy or sampled (`temperature`, `top_k`; numpy's generator
        seeded with `seed`); a prompt's generation stops at `eos_token_id` (kept)."""
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature ({temperature}) must be positive when sampling")
        room = self.layout["max_cache_len"]
        for prompt in prompts:
            if len(prompt) + max_new_tokens - 1 > room:  # the last new token is never fed back
                raise ValueError(f"a prompt of {len(prompt)} tokens and {max_new_tokens} new ones exceed the "
                                 f"program's cache of {room} tokens: export with a larger --max-cache-len, or ask "
                                 "for fewer tokens")
        rng = np.random.default_rng(seed)
        generated = []
        for prompt in prompts:
            logits, new = self.step(list(prompt), 0), []
            for _ in range(max_new_tokens):
                scores = logits[-1:].astype(np.float64)
                token = int((sample(scores, temperature, top_k, rng) if do_sample else scores.argmax(-1))[0])
                new.append(token)
                if token == eos_token_id or len(new) == max_new_tokens:
                    break
                logits = self.step([token], len(prompt) + len(new) - 1)
            generated.append(new)
        return generated
