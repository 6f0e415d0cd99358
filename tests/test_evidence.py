"""The evidence scripts: the from-scratch comparison is parameter-matched and runs end to end, the recovery report
is written from its metrics, and the committed results are complete."""

import importlib.util
import json
import random
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
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


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The smoke runs of scratch.py and retrieval.py, once for the tests that read them (probes.py among them)."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("scratch", "retrieval")}
    for name, folder in folders.items():
        run_script(name, "--quick", "--out", str(folder))
    return folders


def test_scratch_quick_run_sweeps_pairs_and_resumes(quick, tmp_path):
    data = json.loads((quick["scratch"] / "results.json").read_text())
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
    assert "diff-v2 vs llama-wide" in (quick["scratch"] / "results.md").read_text()
    for plot in ("loss_curves.png", "lr_sweep.png", "trend.png"):
        assert (quick["scratch"] / plot).read_bytes()[:4] == b"\x89PNG"
    # Resume: a run taken out of the file is the only one trained again
    key = sorted(data["runs"])[-1]
    del data["runs"][key]
    shutil.copytree(quick["scratch"], tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoints"))
    (tmp_path / "resumed" / "results.json").write_text(json.dumps(data))
    again = run_script("scratch", "--quick", "--out", str(tmp_path / "resumed"))
    assert again.stdout.count("[scratch] done ") == 1 and f"done {key}" in again.stdout


def tiny_kinds(lab):
    """What `lab.build_kind` takes for a 64x2x4 model, and a batch to scale it on."""
    shape = lab.Shape.parse("64x2x4")

    def config_for(kind, **overrides):
        return lab.model_config(kind, shape, vocab_size=100, max_positions=64, **overrides)

    return shape, config_for, torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))


def test_one_map_ablation_is_the_rescaled_model_without_its_difference(lab):
    shape, config_for, batch = tiny_kinds(lab)
    onemap, _ = lab.build_kind("diff-v1-gain-onemap", config_for, batch, seed=0)
    rescaled, _ = lab.build_kind("diff-v1-gain", config_for, batch, seed=0)
    assert all(layer.self_attn.lambdas().item() == 0.0 for layer in onemap.model.layers)
    # Rescaled to the same attention scale as diff-v1-gain, with the same parameters
    assert lab.attention_scale(onemap, batch)["ratio"] == pytest.approx(
        lab.attention_scale(rescaled, batch)["ratio"], rel=1e-5)
    assert lab.count(onemap) == lab.count(rescaled)
    # Unscaled, it starts as diff-v1 without its second maps: the Llama-equivalent of λ = 0 at diff-v1's output scale
    plain, _ = lab.build_kind("diff-v1", config_for, batch, seed=0)
    unscaled, _ = lab.build_kind("diff-v1-onemap", config_for, batch, seed=0)
    for layer in plain.model.layers:
        layer.self_attn.lambdas.lambda_init = 0.0  # λ = 1 − 1 + 0, the head scale below keeps 1 − λ_init
        with torch.no_grad():
            for vector in layer.self_attn.lambdas.parameters():
                vector.zero_()
    with torch.no_grad():
        assert torch.allclose(plain(batch).logits, unscaled(batch).logits, atol=1e-6)
    onemap(batch, labels=batch).loss.backward()
    for layer in onemap.model.layers:
        attention = layer.self_attn
        assert not any(v.requires_grad for v in attention.lambdas.parameters())
        # q_proj rows: map 2i+s of head i; the second maps (and second key maps) get no gradient
        q_grad = attention.q_proj.weight.grad.view(-1, 2, attention.head_dim, shape.hidden)
        k_grad = attention.k_proj.weight.grad.view(-1, 2, attention.head_dim, shape.hidden)
        assert q_grad[:, 1].abs().max() == 0 and k_grad[:, 1].abs().max() == 0
        assert q_grad[:, 0].abs().max() > 0 and k_grad[:, 0].abs().max() > 0


def test_llama_at_version_2s_starting_scale(lab):
    _, config_for, batch = tiny_kinds(lab)
    scaled, extra = lab.build_kind("llama-v2scale", config_for, batch, seed=0)
    llama, _ = lab.build_kind("llama", config_for, batch, seed=0)
    v2, _ = lab.build_kind("diff-v2", config_for, batch, seed=0)
    ratio = {name: lab.attention_scale(model, batch)["ratio"] for name, model in
             (("scaled", scaled), ("llama", llama), ("v2", v2))}
    assert ratio["scaled"] == pytest.approx(ratio["v2"], rel=1e-4)
    assert all(factor < 1 for factor in extra["attention_rescaled_by"])  # version 2 starts below the Llama
    # Only o_proj differs from the Llama of the same seed
    for (name, a), b in zip(scaled.named_parameters(), llama.parameters()):
        assert torch.equal(a, b) != name.endswith("o_proj.weight")


def test_ablation_sizes_per_kind(lab):
    scratch = importlib.import_module("scratch")
    parser = scratch.argparse.ArgumentParser()
    ablations = ["diff-v1-gain", "llama-v2scale"]
    sizes = scratch.ablation_sizes(parser, ["128x4x8,256x8x16", "llama-v2scale=128x4x8"], ablations)
    assert sizes == {"diff-v1-gain": ["128x4x8", "256x8x16"], "llama-v2scale": ["128x4x8"]}
    with pytest.raises(SystemExit):
        scratch.ablation_sizes(parser, ["diff-v1-nonorm=128x4x8"], ablations)


@pytest.fixture(scope="module")
def retrieval():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("retrieval")


@pytest.mark.parametrize(("length", "distractors"), [(64, 0), (64, 4), (256, 8)])
def test_retrieval_examples_hide_the_records_they_query(retrieval, length, distractors):
    example = retrieval.make_example(random.Random(length + distractors), length, distractors)
    records = example.records
    assert len(records) == distractors + 1
    context = example.tokens[1 : length + 1]
    assert example.tokens[0] == retrieval.BOS and len(context) == length
    assert all(token in retrieval.FILLER or token in retrieval.KEY_SYMBOLS or token in retrieval.VALUE_SYMBOLS
               or token == retrieval.END for token in context)
    keys = [key for _, key, _ in records]
    assert len({tuple(key) for key in keys}) == len(keys)
    # every key shares at least its first symbol with all the others (the distractors share a prefix)
    assert len({key[0] for key in keys}) == 1
    for start, key, value in records:
        assert example.tokens[start : start + retrieval.RECORD] == key + value + [retrieval.END]
    assert len(example.queries) == min(retrieval.MAX_QUERIES, len(records))
    batch = retrieval.collate([example])
    labelled = (batch["labels"][0] != -100).nonzero().flatten().tolist()
    expected = []
    for position, index in example.queries:
        assert example.tokens[position - retrieval.KEY_LENGTH : position + 1] == [retrieval.QUERY] + records[index][1]
        expected += [position + 1, position + 2]
        assert example.tokens[position + 1 : position + 3] == records[index][2]
    assert labelled == expected


def test_retrieval_sweep_grows_for_every_model_and_seeds_wait_for_it(retrieval, tmp_path):
    """The rate grid grows by 2x at an end while some model's best sits there (every model then runs the new rate),
    at most `grow` times; no model's other seeds start before every sweep is done (a best rate may still move)."""
    settings = {"models": ["llama", "diff-v1"], "lrs": [1e-3, 2e-3, 4e-3], "seeds": [0, 1], "grow": 1, "lr_from": {},
                "extend": False, "lr_from_file": None}

    def record(accuracy):
        return {"accuracy": accuracy, "train_loss_curve": [1.0]}

    runs = {}
    results = type("Results", (), {"runs": runs, "__contains__": lambda self, key: key in runs})()
    plan = retrieval.planner(settings, results, {}, tmp_path / "cache")

    def planned():
        return sorted(key for key, _ in plan())

    assert planned() == sorted(f"{kind}/lr{lr:g}/seed0" for kind in settings["models"] for lr in settings["lrs"])
    runs.update({"llama/lr0.001/seed0": record(0.6), "llama/lr0.002/seed0": record(0.5),
                 "llama/lr0.004/seed0": record(0.2)})
    # the Llama's best is known, but the version-1 sweep is not: nothing at seed 1 yet
    assert planned() == ["diff-v1/lr0.001/seed0", "diff-v1/lr0.002/seed0", "diff-v1/lr0.004/seed0"]
    runs.update({"diff-v1/lr0.001/seed0": record(0.6), "diff-v1/lr0.002/seed0": record(0.9),
                 "diff-v1/lr0.004/seed0": record(0.7)})
    # the Llama's best sits at the low end: 5e-4 for both models, and still no seed 1
    assert retrieval.lr_grid(settings, runs) == [5e-4, 1e-3, 2e-3, 4e-3]
    assert planned() == ["diff-v1/lr0.0005/seed0", "llama/lr0.0005/seed0"]
    runs.update({"llama/lr0.0005/seed0": record(0.7), "diff-v1/lr0.0005/seed0": record(0.5)})
    # its best is at the new end, but the grid has grown as often as `grow` allows: the seeds start, each model at its
    # own best rate
    assert retrieval.lr_grid(settings, runs) == [5e-4, 1e-3, 2e-3, 4e-3]
    assert planned() == ["diff-v1/lr0.002/seed1", "llama/lr0.0005/seed1"]


def test_retrieval_refuses_distractors_that_do_not_fit(retrieval):
    with pytest.raises(ValueError, match="do not fit in a context of 32 tokens"):
        retrieval.make_example(random.Random(0), 32, 8)


def test_retrieval_quick_run_writes_results(quick):
    data = json.loads((quick["retrieval"] / "results.json").read_text())
    s = data["settings"]
    assert len(data["runs"]) == len(s["models"]) * (len(s["lrs"]) + len(s["seeds"]) - 1)
    cells = {f"{length}/{d}" for length in s["lengths"] for d in s["eval_distractors"]
             if d <= int(length * 0.6) // 6 - 1}
    for run in data["runs"].values():
        assert set(run["grid"]) == cells and all(0 <= c["accuracy"] <= 1 for c in run["grid"].values())
    assert "diff-v2 vs llama-wide" in (quick["retrieval"] / "results.md").read_text()
    # each cell keeps every chosen seed's accuracy (the plot draws them), and its mean is theirs
    assert all("cells" in model for model in data["summary"]["models"].values())
    for kind, model in data["summary"]["models"].items():
        for cell, value in model["cells"].items():
            assert set(value["by_seed"]) == set(model["accuracy_by_seed"]), (kind, cell)
            assert value["mean"] == pytest.approx(sum(value["by_seed"].values()) / len(value["by_seed"]))
    assert (quick["retrieval"] / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_retrieval_report_names_the_runs_trained_again(retrieval, tmp_path):
    results = retrieval.lab.Results(tmp_path / "results.json", {})
    results.add("diff-v1/lr0.002/seed0", {"accuracy": 0.661})
    results.put("superseded", {key: {"accuracy": 0.927, "reason": "an earlier backward pass"}
                               for key in ("diff-v1/lr0.002/seed0", "diff-v1/lr0.002/seed1")})
    notes = "\n".join(retrieval.superseded_notes(results))
    assert "- diff-v1/lr0.002/seed0: 0.927 at first, trained again: 0.661 (an earlier backward pass)" in notes
    assert "- diff-v1/lr0.002/seed1: 0.927 at first, not trained again" in notes


def test_retrieval_extend_trains_on_from_the_shorter_runs_models(retrieval, quick, tmp_path, capsys):
    source, threads = quick["retrieval"] / "results.json", str(torch.get_num_threads())

    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit:
            retrieval.main(["--quick", "--threads", threads, "--extend", *argv, "--out", str(tmp_path / "refused")])
        assert exit.value.code == 2
        return capsys.readouterr().err

    assert "name its results.json with --lr-from" in refused()
    assert "built at step 0" in refused("--lr-from", str(source), "--models", "diff-v1-onemap")
    partial = tmp_path / "partial"
    shutil.copytree(quick["retrieval"], partial)
    rates = json.loads(source.read_text())["summary"]["models"]
    key = retrieval.run_key("diff-v2", rates["diff-v2"]["best_lr"], 1)
    retrieval.checkpoint_file(partial, key).unlink()
    assert "1 starting models are missing" in refused("--lr-from", str(partial / "results.json"), "--models", "diff-v2")

    out = tmp_path / "extended"
    assert retrieval.main(["--quick", "--threads", threads, "--extend", "--lr-from", str(source), "--models",
                           "diff-v2", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    keys = [retrieval.run_key("diff-v2", rates["diff-v2"]["best_lr"], seed) for seed in data["settings"]["seeds"]]
    assert sorted(data["runs"]) == keys and data["settings"]["extend"]
    key = keys[0]
    # The first step's loss is the shorter run's trained model on the first batch, not a new model's
    s = data["settings"]
    model, _ = retrieval.lab.load_checkpoint(retrieval.checkpoint_file(quick["retrieval"], key))
    batch = retrieval.training_batches(seed=0, batch_size=s["batch_size"], lengths=s["lengths"],
                                       distractors=s["distractors"], queries=s["queries"])(1)
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(data["runs"][key]["train_loss_curve"][0], rel=1e-5)
    assert retrieval.checkpoint_file(out, key).is_file()


@pytest.fixture(scope="module")
def probes():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("probes")


@pytest.mark.parametrize("kind", ["llama", "diff-v1", "diff-v2"])
def test_logit_probe_reproduces_the_eager_maps(lab, probes, kind):
    """The hook's q·k/√d, softmaxed and combined as the model combines its maps, gives the eager attention maps:
    so the logits are the model's own (GQA included: 4 heads over 2 key/value heads)."""
    shape = lab.Shape.parse("64x2x4")
    config = lab.model_config(kind, shape, vocab_size=100, max_positions=32)
    config.num_key_value_heads = config.num_attention_heads // 2
    torch.manual_seed(0)
    model = lab.build_model(config, attn="eager").eval()
    gates = []
    if kind == "diff-v2":  # version 2's λ depends on the layer's input: record it
        for layer in model.model.layers:
            layer.self_attn.register_forward_pre_hook(
                lambda module, args, kwargs: gates.append(torch.sigmoid(module.lambda_proj(kwargs["hidden_states"]))),
                with_kwargs=True)
    probe = probes.LogitProbe(model)
    with torch.no_grad():
        maps = model(input_ids=torch.randint(0, 100, (2, 12)), output_attentions=True).attentions
    probe.remove()
    for index, (logits, expected) in enumerate(zip(probe.logits, maps)):
        weights = logits.softmax(-1)
        if kind == "llama":
            combined = weights
        else:
            first, second = weights[:, 0::2], weights[:, 1::2]
            attention = model.model.layers[index].self_attn
            lam = attention.lambdas() if kind == "diff-v1" else gates[index].transpose(1, 2).unsqueeze(-1)
            combined = first - lam * second
        torch.testing.assert_close(combined, expected, atol=1e-5, rtol=1e-4)


def test_round_to_nearest_per_channel_and_group(probes):
    weight = torch.tensor([[1.0, -0.55, 0.26, 0.0], [0.1, 0.25, -0.4, 0.05]])
    four = probes.round_to_nearest(weight, 4, None)  # 7 levels each side, one scale a row
    assert four[0].tolist() == pytest.approx([1.0, -4 / 7, 2 / 7, 0.0])
    assert four[1].tolist() == pytest.approx([0.4 * k / 7 for k in (2, 4, -7, 1)])
    grouped = probes.round_to_nearest(weight, 4, 2)  # the second half of row 0 gets its own scale
    assert grouped[0, 2:].tolist() == pytest.approx([0.26, 0.0])
    wide = torch.randn(16, 64)
    for bits, group in ((8, None), (6, 32), (4, 32)):
        step = wide.reshape(16, -1, group or 64).abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        error = (probes.round_to_nearest(wide, bits, group) - wide).reshape(16, -1, group or 64).abs()
        assert (error <= step / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="does not divide"):
        probes.round_to_nearest(wide, 4, 48)


def test_torchao_quantizer_touches_only_the_decoder_linears(lab, probes):
    """`--quantizer torchao`: torchao's weight-only int4 on the same layers as ours, per channel and per group:
    every row (or group of 32) holds at most 16 levels, the embedding and λ vectors keep their values, and the
    model still computes nearly what it did."""
    pytest.importorskip("torchao", reason="pip install torchao (part of the test extra)")
    config = lab.model_config("diff-v1", lab.Shape.parse("64x2x4"), vocab_size=100, max_positions=32)
    torch.manual_seed(0)
    reference = lab.build_model(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    for group in (None, 32):
        model = lab.build_model(config).eval()
        model.load_state_dict(reference.state_dict())
        probes.quantize(model, 4, group, "torchao")
        for name, module in probes.decoder_linears(model):
            weight = module.weight.dequantize() if hasattr(module.weight, "dequantize") else module.weight
            blocks = weight.detach().reshape(weight.shape[0], -1, group or weight.shape[1])
            levels = max(len(torch.unique(block)) for row in blocks for block in row)
            assert levels <= 16, name
            original = reference.model.layers.get_submodule(name).weight
            assert not torch.equal(weight, original), name
        assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
        attention, original = model.model.layers[0].self_attn, reference.model.layers[0].self_attn
        assert torch.equal(attention.lambdas.lambda_q1, original.lambdas.lambda_q1)
        with torch.no_grad():
            drift = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()
        assert 0 < drift < 0.5


def test_probes_quick_run_reads_the_trained_models(quick, tmp_path):
    run_script("probes", "--quick", "--scratch-out", str(quick["scratch"]), "--retrieval-out",
               str(quick["retrieval"]), "--out", str(tmp_path))
    data = json.loads((tmp_path / "results.json").read_text())
    scratch = [run for key, run in data["runs"].items() if key.startswith("scratch/")]
    retrieval_runs = [run for key, run in data["runs"].items() if key.startswith("retrieval/")]
    assert scratch and retrieval_runs
    for run in scratch:
        assert set(run["loss"]) == {"fp32"} | {f"int{b} {g}" for b in (8, 6, 4, 3, 2) for g in ("channel", "group32")}
        assert run["outliers"]["logit_top"][0] >= run["outliers"]["logit_top"][2]
    for run in retrieval_runs:
        assert sum(run["allocation"]["all_layers"]) == pytest.approx(1.0)
    table = (tmp_path / "results.md").read_text()
    assert "Attention allocation" in table and "Weight-only quantisation (rtn)" in table
    # each seed's share of the queried record, in seed order
    llama = sorted((run for run in retrieval_runs if run["model"] == "llama"), key=lambda run: run["seed"])
    by_seed = " / ".join(f"{run['allocation']['all_layers'][0]:.2f}" for run in llama)
    assert any(line.startswith("| llama |") and f"| {by_seed} |" in line for line in table.splitlines())
    for plot in ("attention_maps.png", "quantization.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_probes_forget_the_models_an_experiment_no_longer_chooses(probes, tmp_path):
    experiment = tmp_path / "retrieval"
    (experiment / "cache" / "checkpoints").mkdir(parents=True)
    summary = {"models": {"llama": {"best_lr": 1e-3, "accuracy_by_seed": {"0": 0.6, "1": 0.7}},
                          "diff-v1": {"sweep": {"0.001": 0.5}}}}  # still sweeping: nothing chosen yet
    (experiment / "results.json").write_text(json.dumps({"summary": summary}))
    (experiment / "cache" / "checkpoints" / "llama_lr0.001_seed0.pt").write_bytes(b"")  # seed 1's is gone
    assert [run["key"] for run in probes.chosen_runs(experiment)] == ["llama/lr0.001/seed0", "llama/lr0.001/seed1"]
    assert [run["key"] for run in probes.chosen_checkpoints(experiment)] == ["llama/lr0.001/seed0"]

    results = probes.lab.Results(tmp_path / "results.json", {"quick": True})
    old, kept = "retrieval/llama/lr0.002/seed1", "retrieval/llama/lr0.001/seed1"
    other = "scratch/64x2x4/llama/lr0.003/seed0"
    for key in (old, kept, other):
        results.add(key, {"seed": 1})
    probes.forget_unchosen(results, "retrieval/", {f"retrieval/{run['key']}" for run in probes.chosen_runs(experiment)})
    probes.forget_unchosen(results, "scratch/", set())  # no results file for it: its probes stay
    assert set(results.runs) == {kept, other}
    assert set(json.loads((tmp_path / "results.json").read_text())["runs"]) == {kept, other}


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


def test_committed_recovery_results_are_complete():
    folder = RESULTS / "recovery"
    for name in ("results.json", "results.md", "recovery.png"):
        assert (folder / name).is_file(), f"recovery/{name}: run benchmarks/recovery.py"
    data = json.loads((folder / "results.json").read_text())
    assert not data["settings"]["quick"]
    assert set(data["runs"]) == {"llama", "widened-preserve", "widened", "v2-preserve"}
    # Both preserving conversions start as the source's own function.
    before = {name: run["held_out_perplexity_before"] for name, run in data["runs"].items()}
    assert before["widened-preserve"] == pytest.approx(before["llama"], rel=1e-3)
    assert before["v2-preserve"] == pytest.approx(before["llama"], rel=1e-3)


def test_committed_scratch_results_are_consistent():
    """The from-scratch results: two sizes, the four models, each model's rate the best of its sweep, and every
    model that has its rate trained on the same seeds."""
    folder = RESULTS / "scratch"
    for name in ("results.json", "results.md", "loss_curves.png", "lr_sweep.png", "trend.png"):
        assert (folder / name).is_file(), f"scratch/{name}: run benchmarks/scratch.py"
    data = json.loads((folder / "results.json").read_text())
    s = data["settings"]
    assert not s["quick"] and len(s["sizes"]) >= 2 and len(s["seeds"]) >= 5
    assert {"llama", "llama-wide", "diff-v1", "diff-v2"} <= set(s["models"])
    for size, part in data["summary"].items():
        for kind, model in part["models"].items():
            if "best_lr" in model:
                lrs = s["size_lrs"].get(size, s["lrs"])
                assert set(model["sweep"]) == {str(lr) for lr in lrs}, (size, kind)
                assert model["best_lr"] == min(lrs, key=lambda lr: model["sweep"][str(lr)])

