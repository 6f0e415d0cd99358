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

import modeling_diff  # noqa: E402
from configuration_diff import DiffLlamaConfig  # noqa: E402


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
