"""The evidence scripts: the from-scratch comparison is parameter-matched and runs end to end, the recovery report
is written from its metrics, and the committed results are complete."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scratch():
    return load("scratch")


def test_scratch_models_are_parameter_matched(scratch):
    hidden, layers, heads = 64, 3, 4
    d = hidden // heads
    configs = scratch.model_configs(vocab_size=100, hidden=hidden, layers=layers, heads=heads, block_size=32)
    counts = {name: scratch.count(scratch.build_model(config)) for name, config in configs.items()}
    llama = counts["llama"]["non_embedding"]
    # Version 1 with half the heads: the Llama's projection shapes, plus four λ vectors (d) and a norm gain (2d)
    assert counts["diff-v1"]["non_embedding"] - llama == layers * 6 * d
    # Version 2: a second query map per head and lambda_proj, hidden·H·d + hidden·H a layer
    assert counts["diff-v2"]["non_embedding"] - llama == layers * (hidden * heads * d + hidden * heads)
    assert configs["diff-v1"].head_dim == configs["diff-v2"].head_dim == configs["llama"].head_dim == d


def test_scratch_quick_run_writes_results(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "scratch.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["summary"]) == {"llama", "diff-v1", "diff-v2"}
    for runs in data["runs"].values():
        assert len(runs[0]["train_loss_curve"]) == data["settings"]["steps"]
        assert runs[0]["held_out_loss_curve"][-1][0] == data["settings"]["steps"]
    assert "diff-v2" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_recovery_report_from_metrics(tmp_path):
    recovery = load("recovery")
    curve = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    run = {"parameters": {"total": 1000, "trainable": 10}, "held_out_tokens": 512, "loss_curve": curve,
           "held_out_perplexity_before": 10.0, "held_out_perplexity_after": 8.0}
    results = {"settings": {"steps": 2, "batch_size": 1, "block_size": 8, "learning_rate": 1e-3, "lora_r": 4,
                            "seed": 0},
               "runs": {name: dict(run) for name in recovery.RUNS}}
    recovery.write_outputs(results, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in recovery.RUNS)
    assert "| 10.000 | 8.000 | -20.0% |" in table
    assert (tmp_path / "recovery.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("folder", "files"), [("scratch", ("results.json", "results.md", "loss_curves.png")),
                                               ("recovery", ("results.json", "results.md", "recovery.png"))])
def test_committed_results_are_complete(folder, files):
    for name in files:
        assert (RESULTS / folder / name).is_file(), f"{folder}/{name}: run benchmarks/{folder}.py"
    data = json.loads((RESULTS / folder / "results.json").read_text())
    assert not data["settings"]["quick"]
    if folder == "scratch":
        assert len(data["settings"]["seeds"]) >= 3
        assert all(len(runs) == len(data["settings"]["seeds"]) for runs in data["runs"].values())
        assert set(data["runs"]) == {"llama", "diff-v1", "diff-v2"}
    else:
        assert set(data["runs"]) == {"llama", "widened-preserve", "widened", "v2-preserve"}
        # Both preserving conversions start as the source's own function.
        before = {name: run["held_out_perplexity_before"] for name, run in data["runs"].items()}
        assert before["widened-preserve"] == pytest.approx(before["llama"], rel=1e-3)
        assert before["v2-preserve"] == pytest.approx(before["llama"], rel=1e-3)
