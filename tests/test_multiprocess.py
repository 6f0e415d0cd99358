"""More than one process: `accelerate launch` runs the fine-tuning recipe on 2 CPU processes (gloo) under DDP and
under FSDP2, with the accelerate configs in examples/accelerate, and what it saves reloads through the Auto classes.

Each rank runs this file as its script (the `__main__` block at the end): it records what the rank wrote and how
accelerate set the run up, then runs `python -m finetune`'s `main`. The tests read those records next to the
recipe's `metrics.json` and checkpoints.

Two things differ from a GPU launch, both about accelerate 1.15 on a machine without an accelerator:
- its CPU launchers start one process unless MPI starts more (`--cpu` and `distributed_type: MULTI_CPU` go through
  the simple launcher, commands/launch.py `launch_command`), so the runs use the torchrun launcher of the GPU
  configs, with `ACCELERATE_USE_CPU=true` to make the Trainer's `PartialState` take the CPU/gloo path
  (transformers `TrainingArguments._setup_devices`; without it every rank would train alone);
- `AcceleratorState.__init__` turns a run into FSDP only for accelerator device types (state.py: the branch that
  sets `DistributedType.FSDP` lists MULTI_GPU, MULTI_XPU, ... but not MULTI_CPU), so `distributed_type: FSDP` on
  CPU trains as plain DDP. `_fsdp_on_cpu` makes that one decision; everything after it (FSDP2 `fully_shard` of
  each decoder layer, sharded optimizer, full-state-dict checkpoints) is accelerate's and the Trainer's own path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
RECORD_DIR_ENV = "DIFFLLAMA_TEST_RANK_RECORDS"  # where each rank writes what it saw; outside the run's output


# ---------------------------------------------------------------------------------------------------------------
# Per-rank side: runs inside `accelerate launch`.


def _fsdp_on_cpu() -> None:
    """Let a CPU-only run with an FSDP plugin be FSDP (see the module docstring for why accelerate refuses it).

    Reapplied after every `AcceleratorState()`: each construction copies the `PartialState` fields (MULTI_CPU) back
    into the shared state.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:
            self.fsdp_plugin = fsdp_plugin
        if getattr(self, "fsdp_plugin", None) is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def _rank_main(argv: list[str]) -> int:
    import atexit

    import torch
    import transformers.modeling_utils
    from transformers import Trainer

    rank = int(os.environ["RANK"])
    output = Path(argv[argv.index("--output") + 1]).resolve()
    record = {"rank": rank, "writes": []}

    def wrote(path) -> None:
        path = Path(os.fsdecode(path)).resolve()
        if path.is_relative_to(output):
            record["writes"].append(path.relative_to(output).as_posix())

    # Python-level opens for writing (configs, JSON, copied code files) through an audit hook; safetensors and
    # torch.save write from native code, so those two are wrapped where the Trainer and transformers call them.
    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            if (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            ):
                wrote(path)

    sys.addaudithook(audit)
    safe_save_file = transformers.modeling_utils.safe_save_file
    torch_save = torch.save

    def recorded_safe_save_file(tensors, filename, *args, **kwargs):
        wrote(filename)
        return safe_save_file(tensors, filename, *args, **kwargs)

    def recorded_torch_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            wrote(f)
        return torch_save(obj, f, *args, **kwargs)

    transformers.modeling_utils.safe_save_file = recorded_safe_save_file
    torch.save = recorded_torch_save

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu()

    train = Trainer.train

    def recorded_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        layers = [m for m in self.model.modules() if type(m).__name__.endswith("DiffLlamaDecoderLayer")]
        record.update(
            world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            distributed_type=self.accelerator.distributed_type.name,
            fsdp2=self.accelerator.is_fsdp2,
            decoder_layers=len(layers),
            sharded_decoder_layers=sum(type(m).__name__.startswith("FSDP") for m in layers),
        )
        return result

    Trainer.train = recorded_train

    def write_record():
        folder = Path(os.environ[RECORD_DIR_ENV])
        (folder / f"rank{rank}.json").write_text(json.dumps(record, indent=1))

    atexit.register(write_record)

    from finetune.__main__ import main

    return main(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(_rank_main(sys.argv[1:]))


# ---------------------------------------------------------------------------------------------------------------
# Test side.

import pytest
import test_trainer
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import modeling_diff
from configuration_diff import DiffLlamaConfig
from conftest import free_port, run_launcher
from finetune.data import build_corpus
from finetune.recipe import CHECKPOINTS_DIR, METRICS_FILE, STAGING_DIR, held_out_loss

# The recipe tests' corpus, tokenizer and tiny version-1 checkpoint: their module-scoped fixtures, reused here.
data_dir, tokenizer, v1_checkpoint = test_trainer.data_dir, test_trainer.tokenizer, test_trainer.v1_checkpoint

STEPS = 10
SAVE_STEPS = 5
BLOCK_SIZE = 64
BATCH_SIZE = 4  # per process: 8 blocks a step over both
EVAL_FRACTION = 0.3
MAX_EVAL_TOKENS = 2048
LAUNCH_TIMEOUT_S = 300  # a run takes 20-40 s on two busy cores; a hung collective must not hang the suite
STRATEGIES = {"ddp": CONFIGS / "ddp.yaml", "fsdp": CONFIGS / "fsdp.yaml"}
CODE_FILES = {"configuration_diff.py", "modeling_diff.py", "chunked_attention.py"}  # what a Hub snapshot carries


def launch(config: Path, model: Path, data: Path, output: Path, records: Path) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # two processes on two (shared) cores: more threads only contend
        "ACCELERATE_USE_CPU": "true",
        "CUDA_VISIBLE_DEVICES": "",  # CPU and gloo even where a GPU is present
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        RECORD_DIR_ENV: str(records),
    }
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    # The GPU configs, sized down: the command line wins over the file.
    command += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    command += [__file__, "--full", "--model", str(model), "--data", str(data), "--output", str(output)]
    command += ["--steps", str(STEPS), "--save-steps", str(SAVE_STEPS), "--log-every", "1", "--seed", "0"]
    command += ["--block-size", str(BLOCK_SIZE), "--batch-size", str(BATCH_SIZE), "--learning-rate", "3e-3"]
    command += ["--eval-fraction", str(EVAL_FRACTION), "--eval-tokens", str(MAX_EVAL_TOKENS)]
    return run_launcher(command, env=env, timeout_s=LAUNCH_TIMEOUT_S, cwd=output.parent)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, v1_checkpoint, data_dir):
    """`runs(strategy)`: the output folder and per-rank records of one launch, run once per module."""
    done = {}

    def run(strategy: str) -> tuple[Path, list[dict]]:
        if strategy not in done:
            done[strategy] = None  # a failed launch is reported once, not run again by the next test
            folder = tmp_path_factory.mktemp(strategy)
            output, records = folder / "out", folder / "records"
            records.mkdir()
            log = launch(STRATEGIES[strategy], v1_checkpoint, data_dir, output, records)
            (folder / "launch.log").write_text(log)
            ranks = [json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)]
            done[strategy] = output, ranks
        if done[strategy] is None:
            pytest.fail(f"the {strategy} launch failed in an earlier test")
        return done[strategy]

    return run


def state_dict(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_train_save_and_reload(strategy, runs, v1_checkpoint, data_dir):
    output, ranks = runs(strategy)

    # Both ranks took part in one gloo group, in the intended mode, and FSDP sharded every decoder layer.
    for record in ranks:
        assert record["world_size"] == 2 and record["backend"] == "gloo"
        if strategy == "fsdp":
            assert record["distributed_type"] == "FSDP" and record["fsdp2"]
            assert record["sharded_decoder_layers"] == record["decoder_layers"] == 2
        else:
            assert record["distributed_type"] == "MULTI_CPU" and record["sharded_decoder_layers"] == 0

    # The loss goes down, on the training batches and on the held-out files.
    metrics = json.loads((output / METRICS_FILE).read_text())
    assert metrics["steps"] == STEPS
    assert [entry["step"] for entry in metrics["loss_curve"]] == list(range(1, STEPS + 1))
    losses = [entry["loss"] for entry in metrics["loss_curve"]]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    assert metrics["held_out_perplexity_after"] < 0.8 * metrics["held_out_perplexity_before"]
    # The default budget counts both processes: 8 blocks a step, 80 blocks read for 10 steps, one epoch (a budget
    # sized for one process would give 40 blocks, seen twice).
    state = json.loads((output / CHECKPOINTS_DIR / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(1.0)
    assert metrics["tokens_per_step"] == 2 * BATCH_SIZE * BLOCK_SIZE and metrics["train_blocks"] == 80
    assert metrics["loss_curve"][0]["learning_rate"] > 0  # the first step trains

    # Rank 0 writes the model, checkpoints and metrics; rank 1 only its own RNG state (for an exact resume).
    # (the final model through the staging folder the run manifest claims, then moved up)
    assert {f"{STAGING_DIR}/model.safetensors", f"{STAGING_DIR}/config.json", METRICS_FILE} <= set(ranks[0]["writes"])
    assert (output / "model.safetensors").is_file() and not (output / STAGING_DIR).exists()
    assert f"{CHECKPOINTS_DIR}/checkpoint-{STEPS}/model.safetensors" in ranks[0]["writes"]
    assert [path for path in ranks[1]["writes"] if not path.endswith("/rng_state_1.pth")] == []

    # The final model and the last checkpoint carry our code and an auto_map that names it, nothing else:
    # a sharded model's class is FSDP's generated subclass, which must not leak into what is saved.
    for folder in (output, output / CHECKPOINTS_DIR / f"checkpoint-{STEPS}"):
        assert {path.name for path in folder.glob("*.py")} == CODE_FILES
        for name in CODE_FILES:
            assert (folder / name).read_bytes() == (ROOT / name).read_bytes()
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert all(target.split(".")[0] in ("configuration_diff", "modeling_diff") for target in auto_map.values())
        assert auto_map["AutoModelForCausalLM"] == "modeling_diff.DiffLlamaForCausalLM"

    # It reloads through the Auto classes as our model, and it is the trained model: it reproduces the held-out
    # loss the recipe measured at the end of training (a shard or a stale copy would not), ...
    assert type(AutoConfig.from_pretrained(output)) is DiffLlamaConfig
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    assert type(reloaded) is modeling_diff.DiffLlamaForCausalLM
    corpus = build_corpus(
        data_dir,
        AutoTokenizer.from_pretrained(output),
        block_size=BLOCK_SIZE,
        eval_fraction=EVAL_FRACTION,
        max_train_tokens=BLOCK_SIZE,
        max_eval_tokens=MAX_EVAL_TOKENS,
    )
    assert held_out_loss(reloaded, corpus.held_out, batch_size=BATCH_SIZE) == pytest.approx(
        metrics["held_out_loss_after"], rel=1e-5
    )
    # ... its logits are finite and moved away from the starting checkpoint's, λ included, ...
    initial = AutoModelForCausalLM.from_pretrained(v1_checkpoint).eval()
    ids = corpus.held_out.blocks[:2]
    with torch.no_grad():
        logits, initial_logits = reloaded(ids).logits, initial(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - initial_logits).abs().max() > 0.1
    lambdas = [m.model.layers[0].self_attn.lambdas.lambda_q1 for m in (reloaded, initial)]
    assert not torch.equal(*lambdas)
    # ... and the Trainer's last checkpoint holds the same weights.
    final, checkpoint = reloaded.state_dict(), state_dict(output / CHECKPOINTS_DIR / f"checkpoint-{STEPS}")
    assert final.keys() == checkpoint.keys()
    for name, tensor in final.items():
        torch.testing.assert_close(checkpoint[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_process_speaks_for_the_run(strategy, runs):
    """The main process logs the run's progress once; the other shows warnings only, and DDP has nothing to warn."""
    output, _ = runs(strategy)
    log = (output.parent / "launch.log").read_text()
    for line in ("held-out perplexity before training", f"held-out perplexity after {STEPS} steps",
                 f"wrote {output / METRICS_FILE}", "full fine-tuning of"):
        assert log.count(line) == 1, f"{line!r} logged {log.count(line)} times:\n{log[-4000:]}"
    assert "find_unused_parameters" not in log


def test_ddp_and_fsdp_train_the_same_model(runs):
    """Same seed, data order and global batch: sharding changes where the numbers live, not what they are."""
    (ddp, _), (fsdp, _) = runs("ddp"), runs("fsdp")
    ddp_metrics, fsdp_metrics = (json.loads((folder / METRICS_FILE).read_text()) for folder in (ddp, fsdp))
    ddp_losses, fsdp_losses = ([e["loss"] for e in m["loss_curve"]] for m in (ddp_metrics, fsdp_metrics))
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-5)
    ddp_weights, fsdp_weights = state_dict(ddp), state_dict(fsdp)
    assert ddp_weights.keys() == fsdp_weights.keys()
    for name, tensor in ddp_weights.items():
        # Reduction order differs (all-reduce vs reduce-scatter): equal up to float32 rounding, about 1e-6 here.
        torch.testing.assert_close(fsdp_weights[name], tensor, rtol=1e-4, atol=2e-5, msg=name)
