"""Check a converted model against its source: parameter counts, held-out perplexity, one greedy generation."""

import inspect
import math
import textwrap

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .sources import progress_bars

# Python standard-library code neither model was tuned on here: a fixed, offline, held-out sample.
SAMPLE_MODULE = textwrap
PROMPT = "def fibonacci(n):\n    "


def code_sample(tokenizer, max_tokens: int = 256) -> torch.Tensor:
    """The first `max_tokens` tokens of a standard-library module's source, shape (1, T)."""
    ids = tokenizer(inspect.getsource(SAMPLE_MODULE), return_tensors="pt").input_ids
    return ids[:, :max_tokens]


@torch.no_grad()
def score(model, tokenizer, ids: torch.Tensor, new_tokens: int) -> dict:
    """Logits and perplexity on `ids`, and a greedy continuation of `PROMPT`."""
    model.eval()
    output = model(input_ids=ids, labels=ids)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    generated = model.generate(
        **prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return {
        "parameters": model.num_parameters(),
        "perplexity": math.exp(output.loss.item()),
        "logits": output.logits.float(),
        "generated_ids": generated[0, prompt.input_ids.shape[1] :].tolist(),
        "generation": tokenizer.decode(generated[0, prompt.input_ids.shape[1] :], skip_special_tokens=True),
    }


def verify(*, source, output, max_tokens: int = 256, new_tokens: int = 24, progress: bool = True) -> dict:
    """Reload the converted model from `output` and compare it with `source` (a `sources.Source`), in fp32.

    The models are loaded one after the other, so peak memory is one model plus one set of logits; a GGUF
    source's model is the one the conversion already dequantised.
    """
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = code_sample(tokenizer, max_tokens)
    model = source.load_model(torch.float32)
    before = score(model, tokenizer, ids, new_tokens)
    del model
    source.release()
    with progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    after = score(model, tokenizer, ids, new_tokens)
    del model
    return {
        "tokens": ids.shape[1],
        "prompt": PROMPT,
        "new_tokens": new_tokens,
        "parameters_source": before["parameters"],
        "parameters_converted": after["parameters"],
        "perplexity_source": before["perplexity"],
        "perplexity_converted": after["perplexity"],
        "max_logit_difference": (before["logits"] - after["logits"]).abs().max().item(),
        "generation_source": before["generation"],
        "generation_converted": after["generation"],
        "same_generation": before["generated_ids"] == after["generated_ids"],
    }
