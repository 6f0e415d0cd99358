"""A smoke run of benchmarks/humaneval.py on a tiny Llama: the protocol, the records, the report, resuming."""

import json
import sys

import torch
from test_trainer import MODULES, STDLIB, byte_level_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import humaneval  # noqa: E402

FIELDS = {"model", "strategy", "train_tokens", "seed", "pass_at_1", "solution_loss", "stdlib_ppl"}


def test_quick_run_writes_records_and_resumes(tmp_path):
    source = tmp_path / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(source)
    byte_level_tokenizer([STDLIB / f"{name}.py" for name in MODULES]).save_pretrained(source)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--quick", "--source", str(source), "--models", "llama-lora", "dex", "--out", str(out), "--work", str(work)]
    assert humaneval.main(argv) == 0

    records = json.loads((out / "results.json").read_text())
    assert all(FIELDS <= set(record) for record in records)
    by_key = {(r["model"], r["seed"]): r for r in records}
    # Step 0 of both models, then seed 0 of each, then seed 1 of the two candidates (the only conversion and the
    # only baseline here).
    assert sorted(by_key, key=str) == sorted(
        [(m, s) for m in ("llama-lora", "dex") for s in (None, 0, 1)], key=str
    )
    before = {m: by_key[(m, None)] for m in ("llama-lora", "dex")}
    assert all(r["train_tokens"] == 0 for r in before.values())
    assert all(by_key[(m, s)]["train_tokens"] == 2 * 2 * 32 for m in before for s in (0, 1))
    # pass@1 (generation) at step 0 and for the first seed only; the solution loss for every model and seed.
    assert all(by_key[(m, s)]["pass_at_1"] is not None for m in before for s in (None, 0))
    assert all(by_key[(m, 1)]["pass_at_1"] is None for m in before)
    assert all(record["solution_loss"] is not None for record in records)
    # The conversion starts as the source exactly, and the benchmark's own step-0 stdlib score is the recipe's.
    assert before["dex"]["solution_loss"] == before["llama-lora"]["solution_loss"]
    runs = json.loads((out / "runs.json").read_text())["runs"]
    trained = runs["train/dex/lr0.0002/seed0"]
    assert abs(trained["stdlib_loss_before"] - runs["before/dex"]["stdlib_loss"]) < 1e-5
    assert by_key[("dex", 0)]["parameters"] == before["dex"]["parameters"] > before["llama-lora"]["parameters"]
    assert (out / "results.png").stat().st_size > 0
    assert "| dex |" in (out / "results.md").read_text()

    # Running again finds every run done and trains nothing.
    stamp = (out / "runs.json").read_text()
    assert humaneval.main(argv) == 0
    assert json.loads((out / "runs.json").read_text())["runs"] == json.loads(stamp)["runs"]
