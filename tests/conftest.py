import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tests also run from a plain checkout, without `pip install -e .`
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # test processes share the cores (pyproject's -n): more threads contend
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch is loaded already: the variable is for children

import modeling_diff  # noqa: E402
from configuration_diff import DiffLlamaConfig  # noqa: E402

# The files that take longest, longest first. pytest-xdist hands out whole files (--dist loadfile) in collection
# order, so these start first and the rest fills in beside them, instead of one long file running alone at the end.
SLOWEST_FILES = ["test_vllm.py", "test_readme.py", "test_benchmarks.py", "test_conversion_smollm2.py",
                 "test_notebooks.py", "test_evals.py", "test_executorch.py", "test_evidence.py",
                 "test_humaneval_benchmark.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


# The smallest model that still exercises GQA: 4 heads over 2 key/value heads. Shared by the Llama baselines.
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
)


def tiny_config(**overrides) -> DiffLlamaConfig:
    return DiffLlamaConfig(**{**TINY, **overrides})


def free_port() -> int:
    """A TCP port free on this machine now, for a multi-process launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(command: list[str], *, env: dict, timeout_s: int, cwd: Path | None = None) -> str:
    """Run a launcher of several processes (torchrun, accelerate launch) and return its log (every process's output);
    fail the test with the end of the log if it fails or runs past `timeout_s`. Its own session, so that a timeout kills the launcher and every process it
    started, not the launcher alone: a hung collective must not hang the suite."""
    name = command[2] if command[1:2] == ["-m"] else command[0]  # python -m torch.distributed.run -> its module
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"{name} ran past {timeout_s} s:\n{log[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"{name} failed ({process.returncode}):\n{log[-6000:]}")
    return log


@pytest.fixture(scope="session")
def dequantised_smollm2(tmp_path_factory) -> Path:
    """SmolLM2's GGUF (the real checkpoint) dequantised to an fp32 folder once for the whole run, by whichever test
    process needs it first: transformers' GGUF loader takes about 25 s a load on two cores, this folder one."""
    from filelock import FileLock

    from conversion import sources

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each test process's own
    folder = shared / "smollm2-fp32"
    with FileLock(str(shared / "smollm2-fp32.lock")):
        if not (folder / "config.json").is_file():
            model = sources.resolve(sources.default_source()).load_model(torch.float32)
            model.hf_quantizer = None  # its weights are dequantised fp32: the GGUF "quantizer" only refuses to save
            del model.config.quantization_config
            model.save_pretrained(folder)
    return folder


@pytest.fixture
def smollm2_loads_fast(dequantised_smollm2, monkeypatch):
    """Converting SmolLM2 runs its GGUF path for real (config, tokenizer, generation config from the file); only the
    dequantisation of its weights is read from `dequantised_smollm2` instead."""
    from transformers import AutoModelForCausalLM

    from conversion import sources

    monkeypatch.setattr(sources.Source, "load_model", lambda self, dtype=torch.float32: (
        AutoModelForCausalLM.from_pretrained(dequantised_smollm2, dtype=dtype)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def chunk_calls(monkeypatch):
    """A list that gets one entry per call of `chunked_attention` by the model."""
    calls = []
    chunked = modeling_diff.chunked_attention
    monkeypatch.setattr(modeling_diff, "chunked_attention", lambda *a: calls.append(1) or chunked(*a))
    return calls
