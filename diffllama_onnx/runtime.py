"""Generation on ONNX Runtime from a folder `python -m diffllama_onnx` wrote: numpy and onnxruntime only.

    from diffllama_onnx import OnnxCausalLM

    model = OnnxCausalLM("out/SmolLM2-135M-Instruct-v2-onnx")
    ids = model.tokenizer(["def fibonacci(n):", "import os"])["input_ids"]
    print(model.tokenizer.batch_decode(model.generate(ids, max_new_tokens=32)))

A batch is left-padded: each row's attention mask is 0 on its padding, its positions count from its first real
token, and the whole batch then advances one token a step over the cache the graph returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .export import INT8_FILE, LAYOUT_FILE, MODEL_FILE


class ExportedFolder:
    """A folder an exporter wrote: its layout file (read here) and its tokenizer (loaded on first use)."""

    def __init__(self, folder: str | Path, layout_file: str, command: str):
        self.folder = Path(folder)
        if not (self.folder / layout_file).is_file():
            raise FileNotFoundError(f"{self.folder} has no {layout_file}: pass a folder `{command}` wrote")
        self.layout = json.loads((self.folder / layout_file).read_text())
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The exported folder's tokenizer (loaded with transformers on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        return self._tokenizer


class OnnxCausalLM(ExportedFolder):
    """An exported graph, its layout and tokenizer; `generate` decodes greedily or by sampling."""

    def __init__(self, folder: str | Path, *, int8: bool = False, threads: int | None = None):
        import onnxruntime

        super().__init__(folder, LAYOUT_FILE, "python -m diffllama_onnx")
        name = INT8_FILE if int8 else MODEL_FILE
        if name not in self.layout["files"]:
            raise FileNotFoundError(f"{self.folder} has no {name}: export it with --int8")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(self.folder / name), options,
                                                    providers=["CPUExecutionProvider"])

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        layout = self.layout
        shape = (batch, layout["kv_heads"], 0, layout["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * layout["layers"])]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (batch, new tokens, vocabulary) and the grown cache, for new tokens after `cache`."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64)}
        feeds.update(zip(self.layout["inputs"][3:], cache))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0, eos_token_id: int | None = None,
                 pad_token_id: int = 0) -> list[list[int]]:
        """The new tokens of each prompt (token ids), greedy or sampled (`temperature`, `top_k`; numpy's generator
        seeded with `seed`); a row stops at `eos_token_id` (kept), the others go on."""
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature ({temperature}) must be positive when sampling")
        rng = np.random.default_rng(seed)
        longest = max(len(prompt) for prompt in prompts)
        ids = np.array([[pad_token_id] * (longest - len(p)) + list(p) for p in prompts], dtype=np.int64)
        mask = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        cache = self.empty_cache(len(prompts))
        new = [[] for _ in prompts]
        done = np.zeros(len(prompts), dtype=bool)
        for _ in range(max_new_tokens):
            logits, cache = self.step(ids, mask, positions, cache)
            scores = logits[:, -1].astype(np.float64)
            tokens = sample(scores, temperature, top_k, rng) if do_sample else scores.argmax(-1)
            for row, token in enumerate(tokens):
                if not done[row]:
                    new[row].append(int(token))
                    done[row] = eos_token_id is not None and token == eos_token_id
            if done.all():
                break
            ids = np.where(done, pad_token_id, tokens)[:, None]
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        return new


def sample(scores: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """One token a row of `scores` (rows, vocabulary), drawn at `temperature` from the `top_k` best (0: all)."""
    scores = scores / temperature
    if top_k > 0:
        kth = np.sort(scores, axis=-1)[:, -min(top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probabilities = np.exp(scores - scores.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probabilities])
