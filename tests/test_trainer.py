"""The fine-tuning recipe: corpus split, Trainer steps, resume, gradient checkpointing, command line."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer

import modeling_diff
from configuration_diff import DiffLlamaConfig
from conftest import tiny_config
from finetune.__main__ import main
from finetune.data import build_corpus, python_files, split_files
from finetune.recipe import CHECKPOINTS_DIR, MERGED_DIR, METRICS_FILE, finetune, prepare_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small, stable standard-library modules: a real code corpus of about 60k tokens.
MODULES = ["abc", "bisect", "colorsys", "copy", "fnmatch", "glob", "heapq", "keyword", "numbers", "shlex", "string"]
VOCAB = 384
QUIET = {"disable_tqdm": True}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on threads that contend for two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diff_config(version: int) -> DiffLlamaConfig:
    return tiny_config(diff_version=version, vocab_size=VOCAB, eos_token_id=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("code")
    for name in MODULES:
        target = folder / ("pkg" if name in ("copy", "glob") else "") / f"{name}.py"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(STDLIB / f"{name}.py", target)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "ignored.py").write_text("x = 1\n")
    return folder


def byte_level_tokenizer(files: list[Path]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `files` (no download), EOS `<|endoftext|>` with id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(path) for path in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def save_checkpoint(folder: Path, config: DiffLlamaConfig, tokenizer) -> Path:
    torch.manual_seed(0)
    modeling_diff.DiffLlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return byte_level_tokenizer(python_files(data_dir))


@pytest.fixture(scope="module")
def v1_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("v1"), diff_config(1), tokenizer)


@pytest.fixture(scope="module")
def v2_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("v2"), diff_config(2), tokenizer)


def test_split_is_by_file_deterministic_and_stable(data_dir, tmp_path):
    files = python_files(data_dir)
    assert len(files) == len(MODULES)  # __pycache__ skipped
    train, held_out = split_files(files, root=data_dir, eval_fraction=0.3)
    assert train and held_out and not set(train) & set(held_out)
    assert sorted(train + held_out) == files
    assert split_files(files[::-1], root=data_dir, eval_fraction=0.3) == (train, held_out)
    # Adding a file never moves the others: a file's side depends on its own path only.
    more = files + [data_dir / "zz_new.py"]
    train_more, held_more = split_files(more, root=data_dir, eval_fraction=0.3)
    assert set(train) <= set(train_more) and set(held_out) <= set(held_more)


def test_corpus_blocks(data_dir, tokenizer):
    corpus = build_corpus(data_dir, tokenizer, block_size=64, eval_fraction=0.3, max_train_tokens=2000)
    assert corpus.train.blocks.shape == (2000 // 64, 64)
    assert corpus.held_out.blocks.shape[1] == 64
    item = corpus.train[3]
    assert torch.equal(item["input_ids"], item["labels"])
    # Files are separated by EOS inside the packed stream.
    assert (corpus.held_out.blocks == tokenizer.eos_token_id).any()


def train(checkpoint, output, data_dir, **overrides):
    settings = dict(
        model=checkpoint,
        output=output,
        data=data_dir,
        mode="full",
        steps=20,
        block_size=64,
        batch_size=8,
        learning_rate=3e-3,
        eval_fraction=0.3,
        eval_tokens=4096,
        log_every=1,
        training_args=QUIET,
    )
    return finetune(**{**settings, **overrides})


def assert_learned(metrics, steps, *, loss_drop, perplexity_ratio):
    losses = [entry["loss"] for entry in metrics["loss_curve"]]
    assert [entry["step"] for entry in metrics["loss_curve"]] == list(range(1, steps + 1))
    assert sum(losses[-3:]) / 3 < losses[0] - loss_drop
    assert metrics["held_out_perplexity_after"] < perplexity_ratio * metrics["held_out_perplexity_before"]


def test_full_training_reduces_loss(v1_checkpoint, data_dir, tmp_path):
    metrics = train(v1_checkpoint, tmp_path, data_dir)
    assert metrics["steps"] == 20
    rates = [entry["learning_rate"] for entry in metrics["loss_curve"]]
    assert rates[0] == pytest.approx(3e-3 / 2) and max(rates) == pytest.approx(3e-3)  # warm-up step 1 of 1 trains
    assert_learned(metrics, 20, loss_drop=0.8, perplexity_ratio=0.5)
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == metrics
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["total"]
    # The written model is a plain checkpoint that the Auto classes load, and it is the trained one.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is modeling_diff.DiffLlamaForCausalLM
    original = AutoModelForCausalLM.from_pretrained(v1_checkpoint)
    trained_lambda, original_lambda = (m.model.layers[0].self_attn.lambdas.lambda_q1 for m in (reloaded, original))
    assert not torch.equal(trained_lambda, original_lambda)


def test_lora_training_with_checkpointing_saves_lambda_and_merges(v2_checkpoint, data_dir, tmp_path):
    metrics = train(
        v2_checkpoint, tmp_path, data_dir, mode="lora", learning_rate=3e-2, gradient_checkpointing=True, merge=True
    )
    # Frozen random embeddings and head leave LoRA on attention little to learn: a small, certain improvement.
    assert_learned(metrics, 20, loss_drop=0.05, perplexity_ratio=0.95)
    assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"] / 2
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    original = AutoModelForCausalLM.from_pretrained(v2_checkpoint)
    trained_lambda = adapter["base_model.model.model.layers.0.self_attn.lambda_proj.weight"]
    assert not torch.equal(trained_lambda, original.model.layers[0].self_attn.lambda_proj.weight)

    ids = torch.arange(40).view(2, 20)
    adapted = PeftModel.from_pretrained(original, tmp_path).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / MERGED_DIR).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
    card = (tmp_path / "README.md").read_text()  # ours, not PEFT's empty template
    assert card.startswith("---\nlibrary_name: peft") and "differential-attention" in card
    assert f"{metrics['held_out_perplexity_after']:.3f} after" in card and "AutoPeftModelForCausalLM" in card
    assert "merged/" in card and "[More Information Needed]" not in card


@pytest.mark.parametrize(("checkpoint", "mode"), [("v1_checkpoint", "full"), ("v2_checkpoint", "lora")])
def test_resume_continues_the_step_count(checkpoint, mode, data_dir, tmp_path, request):
    checkpoint = request.getfixturevalue(checkpoint)
    uninterrupted = train(checkpoint, tmp_path, data_dir, mode=mode, steps=6, save_steps=3)
    checkpoints = tmp_path / CHECKPOINTS_DIR
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(checkpoints / "checkpoint-6")  # as if the run had stopped after step 3

    resumed = train(checkpoint, tmp_path, data_dir, mode=mode, steps=6, save_steps=3, resume=True)
    assert resumed["resumed_from"] == str(checkpoints / "checkpoint-3")
    assert resumed["steps"] == 6
    assert (checkpoints / "checkpoint-6").is_dir()
    # Steps 1-3 come from the checkpoint's history; 4-6 are trained again, on the same batches with the same
    # weights (λ and lambda_proj included), optimizer and scheduler state, so they repeat the uninterrupted run.
    assert [entry["step"] for entry in resumed["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    expected = [entry["loss"] for entry in uninterrupted["loss_curve"]]
    got = [entry["loss"] for entry in resumed["loss_curve"]]
    assert got == pytest.approx(expected, rel=1e-4)
    assert resumed["held_out_loss_after"] == pytest.approx(uninterrupted["held_out_loss_after"], rel=1e-4)


def test_resume_without_checkpoint_is_refused(v1_checkpoint, data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(v1_checkpoint, tmp_path, data_dir, steps=2, resume=True)


def gradients(config, mode, checkpointing):
    torch.manual_seed(0)
    model = prepare_model(modeling_diff.DiffLlamaForCausalLM(config), mode=mode, lora_r=4, lora_dropout=0.0)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    calls = []
    attention = next(module for name, module in model.named_modules() if name.endswith("layers.0.self_attn"))
    # A pre-hook: checkpointing stops recomputing once the last saved tensor is back, before post-hooks would run.
    attention.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    # A layer runs again during backward exactly when its activations were dropped.
    assert len(calls) == (2 if checkpointing else 1)
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("version", "mode"), [(1, "full"), (1, "lora"), (2, "full"), (2, "lora")])
def test_gradient_checkpointing_same_gradients(version, mode):
    config = diff_config(version)
    plain = gradients(config, mode, checkpointing=False)
    checkpointed = gradients(config, mode, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    assert all(grad is not None for grad in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_command_line(v2_checkpoint, data_dir, tmp_path, capsys):
    args = ["--lora", "--model", str(v2_checkpoint), "--data", str(data_dir), "--output", str(tmp_path)]
    args += ["--steps", "2", "--block-size", "32", "--batch-size", "2", "--eval-fraction", "0.3"]
    args += ["--eval-tokens", "256", "--lora-r", "2"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / METRICS_FILE).read_text())
    assert metrics["mode"] == "lora" and metrics["steps"] == 2 and metrics["block_size"] == 32
    assert (tmp_path / "adapter_config.json").is_file()

    capsys.readouterr()  # only the failing run's output below
    with pytest.raises(SystemExit) as stopped:
        main(["--full", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "does not exist" in error


def test_resume_skips_an_incomplete_checkpoint_and_refuses_when_none_is_complete(v1_checkpoint, data_dir, tmp_path,
                                                                                  caplog):
    train(v1_checkpoint, tmp_path, data_dir, steps=4, save_steps=2)
    checkpoints = tmp_path / CHECKPOINTS_DIR
    (checkpoints / "checkpoint-4" / "optimizer.pt").unlink()  # as a kill during its save leaves it
    with caplog.at_level("WARNING", logger="finetune.recipe"):
        resumed = train(v1_checkpoint, tmp_path, data_dir, steps=6, save_steps=2, resume=True)
    assert resumed["resumed_from"] == str(checkpoints / "checkpoint-2") and resumed["steps"] == 6
    assert "checkpoint-4 is incomplete (it lacks optimizer.pt" in caplog.text
    assert "resuming from checkpoint-2" in caplog.text

    for checkpoint in checkpoints.iterdir():
        (checkpoint / "scheduler.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .* is complete \(checkpoint-6 lacks scheduler.pt\)"):
        train(v1_checkpoint, tmp_path, data_dir, steps=8, resume=True)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-6 lacks scheduler.pt: resuming would silently restart"):
        train(v1_checkpoint, tmp_path, data_dir, steps=8, resume=str(checkpoints / "checkpoint-6"))
    (checkpoints / "checkpoint-6" / "scheduler.pt").write_bytes(b"")
    (checkpoints / "checkpoint-6" / "trainer_state.json").write_text("{truncated")
    with pytest.raises(FileNotFoundError, match=r"checkpoint-6 lacks a readable trainer_state.json"):
        train(v1_checkpoint, tmp_path, data_dir, steps=8, resume=str(checkpoints / "checkpoint-6"))


def test_resume_with_another_model_or_mode_is_refused(v1_checkpoint, v2_checkpoint, data_dir, tmp_path):
    train(v1_checkpoint, tmp_path, data_dir, steps=2, save_steps=2, mode="full")
    with pytest.raises(ValueError, match=r"differs from this command \(model: the run has '.*', this command '.*'\)"):
        train(v2_checkpoint, tmp_path, data_dir, steps=4, resume=True, mode="full")
    with pytest.raises(ValueError, match=r"mode: the run has 'full', this command 'lora'"):
        train(v1_checkpoint, tmp_path, data_dir, steps=4, resume=True, mode="lora")
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == ["checkpoint-2"]


def test_sigterm_stops_a_run_saying_which_checkpoint_to_resume(v2_checkpoint, data_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    output = tmp_path / "run"
    command = [sys.executable, "-m", "finetune", "--lora", "--model", str(v2_checkpoint), "--data", str(data_dir),
               "--output", str(output), "--steps", "5000", "--save-steps", "1", "--block-size", "32",
               "--batch-size", "2", "--eval-fraction", "0.3", "--eval-tokens", "64"]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not list((output / CHECKPOINTS_DIR).glob("checkpoint-*/trainer_state.json")):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-3000:]
    said = next(line for line in err.splitlines() if "interrupted at step" in line)
    assert "is the newest complete checkpoint; continue with --resume" in said, said
    kept = Path(said.split(": ", 2)[2].split(" is the newest")[0])
    assert kept.parent == output / CHECKPOINTS_DIR and (kept / "optimizer.pt").is_file()


def test_an_earlier_run_is_continued_or_replaced_only_when_asked(v2_checkpoint, data_dir, tmp_path):
    first = train(v2_checkpoint, tmp_path / "run", data_dir, steps=2, mode="lora", merge=True)
    with pytest.raises(ValueError, match="holds an earlier run: pass --resume to continue it or --overwrite"):
        train(v2_checkpoint, tmp_path / "run", data_dir, steps=2)
    second = train(v2_checkpoint, tmp_path / "run", data_dir, steps=3, overwrite=True)  # full, no adapter
    assert second["steps"] == 3 and first["mode"] == "lora"
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert "adapter_config.json" not in written and "merged" not in written and "model.safetensors" in written
    assert sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS_DIR).iterdir()) == ["checkpoint-3"]


def test_a_failed_or_interrupted_replacement_leaves_the_earlier_run_whole(v2_checkpoint, data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(v2_checkpoint, run, data_dir, steps=2, mode="lora")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}

    def fail(self, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train", fail)
        with pytest.raises(KeyboardInterrupt, match=f"earlier run in {run} is unchanged"):
            train(v2_checkpoint, run, data_dir, steps=3, overwrite=True)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    assert (tmp_path / ".run.finetune-replacement").is_dir()  # the unfinished replacement, beside the output

    replaced = train(v2_checkpoint, run, data_dir, steps=3, overwrite=True)  # removes it, then swaps in when complete
    assert replaced["steps"] == 3 and json.loads((run / METRICS_FILE).read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in (run / CHECKPOINTS_DIR).iterdir()) == ["checkpoint-3"]


def test_overwrite_never_removes_files_the_user_put_among_the_checkpoints(v2_checkpoint, data_dir, tmp_path):
    run = tmp_path / "run"
    train(v2_checkpoint, run, data_dir, steps=2)
    kept = run / CHECKPOINTS_DIR / "best-by-hand"
    shutil.copytree(run / CHECKPOINTS_DIR / "checkpoint-2", kept)
    (kept / "notes.txt").write_text("the one to ship")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match=r"holds files finetune did not write \(checkpoints/best-by-hand/.*nothing was changed"):
        train(v2_checkpoint, run, data_dir, steps=3, overwrite=True)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_adapter_loads_from_any_working_folder(v2_checkpoint, data_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    relative = Path("models") / "v2"
    (tmp_path / "models").mkdir()
    shutil.copytree(v2_checkpoint, tmp_path / relative)
    monkeypatch.chdir(tmp_path)
    train(relative, Path("runs") / "lora", data_dir, steps=1, mode="lora")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    adapter_config = json.loads((tmp_path / "runs" / "lora" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / relative)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "runs" / "lora")
    assert type(model.get_base_model()) is modeling_diff.DiffLlamaForCausalLM


def test_a_run_prints_no_deprecation_warning_of_the_libraries(v2_checkpoint, data_dir, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(v2_checkpoint, tmp_path / "run", data_dir, steps=1, mode="lora", gradient_checkpointing=True)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not [message for message in deprecated if "is_gradient_checkpointing" in message], deprecated


def test_help_shows_the_defaults():
    from finetune.__main__ import build_parser

    text = build_parser().format_help()
    for option, default in (("--steps", 200), ("--block-size", 512), ("--batch-size", 8), ("--lora-r", 16)):
        entry = " ".join(text.split(option + " ", 2)[2].split("\n  --", 1)[0].split())  # wrapped lines joined
        assert f"(default: {default})" in entry, option


def test_a_full_disk_while_checkpointing_is_named_and_the_last_complete_checkpoint_kept(v1_checkpoint, data_dir,
                                                                                        tmp_path, monkeypatch):
    saves = []
    real_save = torch.save

    def fills_the_disk(obj, f, *args, **kwargs):  # torch.save's own message for a short write
        if str(f).endswith("optimizer.pt"):
            saves.append(f)
            if len(saves) == 2:
                Path(f).write_bytes(b"PK\x03\x04 truncated")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6528 vs 6416")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    checkpoints = tmp_path / CHECKPOINTS_DIR
    with pytest.raises(OSError, match=rf"no space left .* while saving step 4's checkpoint \(the partial one was "
                                      rf"removed\); free space, then continue from {checkpoints / 'checkpoint-2'}"):
        train(v1_checkpoint, tmp_path, data_dir, steps=6, save_steps=2)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]
    monkeypatch.setattr(torch, "save", real_save)
    resumed = train(v1_checkpoint, tmp_path, data_dir, steps=6, save_steps=2, resume=True)
    assert resumed["resumed_from"] == str(checkpoints / "checkpoint-2") and resumed["steps"] == 6


def test_a_run_stopped_while_saving_leaves_a_folder_resume_and_overwrite_accept(v2_checkpoint, data_dir, tmp_path,
                                                                                 monkeypatch):
    """The final save goes through a staging folder the manifest claims, so a stop in the middle of it (here while
    writing the merged model, after the adapter) leaves nothing that reads as the user's."""
    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(modeling_diff.DiffLlamaForCausalLM, "save_pretrained", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(v2_checkpoint, tmp_path / "run", data_dir, steps=2, save_steps=2, mode="lora", merge=True)
    assert (tmp_path / "run" / ".saving" / "adapter_model.safetensors").is_file()
    monkeypatch.undo()
    resumed = train(v2_checkpoint, tmp_path / "run", data_dir, steps=2, save_steps=2, mode="lora", merge=True,
                    resume=True)
    assert resumed["steps"] == 2 and (tmp_path / "run" / "merged" / "config.json").is_file()
    assert not (tmp_path / "run" / ".saving").exists()
    train(v2_checkpoint, tmp_path / "run", data_dir, steps=2, mode="lora", overwrite=True)
