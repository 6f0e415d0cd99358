import os
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
