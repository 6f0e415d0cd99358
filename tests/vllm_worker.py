"""Runs in vLLM's own environment (its pins differ from the suite's): generates for `test_vllm.py`, prints JSON.

`python tests/vllm_worker.py JOB_JSON`: for each model of the job, an engine in fp32 with prefix caching and chunked
prefill on, greedy tokens and their log-probabilities for every prompt, twice (the second pass reads the prefix
cache). A model that vLLM refuses gives its error message instead.
"""

import gc
import json
import sys

RESULT = "VLLM-RESULT "


def generate(model: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    try:
        llm = LLM(
            model=model["folder"],
            dtype="float32",
            skip_tokenizer_init=True,
            kv_cache_memory_bytes=model.get("kv_cache_memory_bytes", 64 << 20),
            max_model_len=512,
            enable_prefix_caching=True,
            block_size=32,  # the CPU's default of 128 would leave these short prompts no full block to cache
            enable_chunked_prefill=True,
            max_num_batched_tokens=model.get("max_num_batched_tokens", 16),  # below the longest prompt: chunked
            **model.get("engine", {}),
        )
    except Exception as error:  # the message is what the test checks
        return {"error": f"{type(error).__name__}: {error}"}
    params = SamplingParams(
        max_tokens=model["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False, logprobs=0
    )
    prompts = [TokensPrompt(prompt_token_ids=prompt) for prompt in model["prompts"]]
    passes = []
    for _ in range(2):
        outputs = llm.generate(prompts, params, use_tqdm=False)
        passes.append(
            {
                "tokens": [list(output.outputs[0].token_ids) for output in outputs],
                "logprobs": [
                    [step[token].logprob for step, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)]
                    for output in outputs
                ],
                "cached_tokens": [output.num_cached_tokens or 0 for output in outputs],
            }
        )
    del llm
    gc.collect()
    first, again = passes
    return {**first, "repeat": again["tokens"], "repeat_cached_tokens": again["cached_tokens"]}


def main() -> None:
    job = json.loads(sys.argv[1])
    results = [generate(model) for model in job["models"]]
    print(RESULT + json.dumps(results), flush=True)


if __name__ == "__main__":  # vLLM spawns processes that import this file
    main()
