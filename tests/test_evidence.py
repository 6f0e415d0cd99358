"""The evidence scripts: the from-scratch comparison is parameter-matched and runs end to end, the recovery report
is written from its metrics, and the committed results are complete."""

import importlib.util
import json
import statistics
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
def lab():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the experiment scripts import lab as a sibling module
    return importlib.import_module("lab")


def test_lab_kinds_are_parameter_matched(lab):
    shape = lab.Shape.parse("64x3x4")
    hidden, layers, heads, d = shape.hidden, shape.layers, shape.heads, shape.head_dim
    counts = {kind: lab.count(lab.build_model(lab.model_config(kind, shape, vocab_size=100, max_positions=32)))
              for kind in lab.KINDS}
    llama = counts["llama"]["non_embedding"]
    # Version 1 with half the heads: the Llama's projection shapes, plus four λ vectors (d) and a norm gain (2d)
    assert counts["diff-v1"]["non_embedding"] - llama == layers * 6 * d
    assert counts["diff-v1-nonorm"]["non_embedding"] - llama == layers * 4 * d  # λ vectors only
    # Version 2: a second query map per head and lambda_proj, hidden·H·d + hidden·H a layer
    assert counts["diff-v2"]["non_embedding"] - llama == layers * (hidden * heads * d + hidden * heads)
    # The wide Llama: heads 5/4 as wide, version 2's attention parameters but lambda_proj
    assert counts["diff-v2"]["non_embedding"] - counts["llama-wide"]["non_embedding"] == layers * hidden * heads
    assert len({c["total"] - c["non_embedding"] for c in counts.values()}) == 1  # the same tied embedding


def test_lab_refuses_sizes_it_cannot_build(lab):
    with pytest.raises(ValueError, match="HIDDENxLAYERSxHEADS"):
        lab.Shape.parse("128x4")
    for size in ("96x2x3", "120x2x8"):  # odd heads; heads of width 15
        with pytest.raises(ValueError, match="must be even"):
            lab.Shape.parse(size)


def test_lab_results_resume_and_refuse_other_settings(lab, tmp_path):
    results = lab.Results(tmp_path / "results.json", {"steps": 5})
    results.add("a", {"loss": 1.0})
    reopened = lab.Results(tmp_path / "results.json", {"steps": 5})
    assert "a" in reopened and reopened.runs["a"] == {"loss": 1.0}
    with pytest.raises(SystemExit, match=r"other settings \(steps\).*--fresh"):
        lab.Results(tmp_path / "results.json", {"steps": 6})
    assert "a" not in lab.Results(tmp_path / "results.json", {"steps": 6}, fresh=True)
    # Settings that only select runs may change: more seeds keep the runs already made
    lab.Results(tmp_path / "more.json", {"steps": 5, "seeds": [0]}).add("a", {"loss": 1.0})
    grown = lab.Results(tmp_path / "more.json", {"steps": 5, "seeds": [0, 1]}, selects=("seeds",))
    assert "a" in grown and grown.data["settings"]["seeds"] == [0, 1]


def test_lab_paired_comparison(lab):
    better = lab.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 2.4, 2: 3.1, 3: 9.0})
    assert better["seeds"] == [0, 1, 2] and better["wins"] == 3
    assert better["mean_difference"] == pytest.approx(-1.0 / 3)
    std = statistics.stdev([-0.5, -0.4, -0.1])
    assert better["ci95"] == pytest.approx(4.303 * std / 3**0.5)  # t quantile of 2 degrees of freedom


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_scratch_quick_run_sweeps_pairs_and_resumes(tmp_path):
    run_script("scratch", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "results.json").read_text())
    s = data["settings"]
    kinds = s["models"] + s["ablations"]
    # The sweep on the first seed at every rate, then the other seeds at each model's best
    assert len(data["runs"]) == len(kinds) * (len(s["lrs"]) + len(s["seeds"]) - 1)
    summary = data["summary"][s["sizes"][0]]
    for kind in kinds:
        model = summary["models"][kind]
        assert model["best_lr"] == min(s["lrs"], key=lambda lr: model["sweep"][str(lr)])
        assert len(model["loss_by_seed"]) == len(s["seeds"])
    run = next(iter(data["runs"].values()))
    assert len(run["train_loss_curve"]) == s["steps"] and run["eval_curve"][-1][0] == s["steps"]
    # The lead: version 1's attention outputs start far above the embedding's scale, the rescaled ones at the Llama's
    ratio = {kind: summary["models"][kind]["init_attention_ratio"] for kind in kinds}
    assert min(ratio["diff-v1"]) > 2 * max(ratio["llama"])
    assert ratio["diff-v1-gain"] == pytest.approx(ratio["llama"], rel=1e-3)
    assert "diff-v2 vs llama-wide" in (tmp_path / "results.md").read_text()
    for plot in ("loss_curves.png", "lr_sweep.png", "trend.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    # Resume: a run taken out of the file is the only one trained again
    key = sorted(data["runs"])[-1]
    del data["runs"][key]
    (tmp_path / "results.json").write_text(json.dumps(data))
    again = run_script("scratch", "--quick", "--out", str(tmp_path))
    assert again.stdout.count("[scratch] done ") == 1 and f"done {key}" in again.stdout


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
