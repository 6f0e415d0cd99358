"""Tensor (and pipeline) parallelism on 2 CPU processes (torchrun, gloo): a tiny version-1, version-2 and GQA model,
sharded by `from_pretrained(..., distributed_config=DistributedConfig(tp_size=2))`, computes the single-process
model's logits, training gradients and generations, and a size that would split a KV group is refused.

Each rank runs this file as its script (the `__main__` block at the end): one launch loads every saved model in turn
and writes what it computed (logits, gathered gradients, its own weight shards, generations, cache shapes) as
safetensors and JSON next to the models. Starting two processes costs more than the model work, so there is one
launch for the whole module; the tests compare its records with the same models run here in one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TP_SIZE = 2
NEW_TOKENS = 4

# hidden 64, 2 layers, vocabulary 128; heads over KV heads, as (h, h_kv, head_dim)
CASES = {
    "v1": dict(diff_version=1, num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    "v2": dict(diff_version=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "v1-gqa": dict(diff_version=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "v2-gqa": dict(diff_version=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8),
}
# Sizes that cannot be sharded by KV group over 2 processes: the number of KV heads is odd (also under MQA, where the
# query heads alone would divide).
REFUSED = {
    "v1-odd": dict(diff_version=1, num_attention_heads=3, num_key_value_heads=3, head_dim=8),
    "v2-mqa": dict(diff_version=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
}
PIPELINE_CASES = ("v1-gqa", "v2-gqa")


# ---------------------------------------------------------------------------------------------------------------
# Per-rank side: runs inside torchrun.


def _gathered_gradients(model) -> dict:
    from torch.distributed.tensor import DTensor

    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().contiguous()
    return grads


def _local_shards(model) -> dict:
    """The weights this rank holds for layer 0's attention, as local tensors."""
    from torch.distributed.tensor import DTensor

    shards = {}
    for name, param in model.model.layers[0].self_attn.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        shards[name] = local.detach().contiguous()
    return shards


def _rank_main(folder: Path) -> int:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import modeling_diff  # noqa: F401  (registers the Auto classes)

    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    ids = load_file(folder / "inputs.safetensors")["ids"]
    record = {"refused": {}}
    for name in CASES:
        model = AutoModelForCausalLM.from_pretrained(
            folder / name, distributed_config=DistributedConfig(tp_size=TP_SIZE)
        )
        tensors = {f"shard.{key}": value for key, value in _local_shards(model).items()}
        with torch.no_grad():
            tensors["inference_logits"] = model(ids).logits
            cache = model(ids, use_cache=True).cache
        record[name] = {"cache_shape": list(cache.layers[0].keys.shape)}
        for implementation in ("dynamic", "static"):
            generated = model.generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, cache_implementation=implementation
            )
            tensors[f"generated_{implementation}"] = generated
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        tensors["train_logits"] = out.logits.detach()
        tensors["loss"] = out.loss.detach()
        tensors.update({f"grad.{key}": value for key, value in _gathered_gradients(model).items()})
        save_file(tensors, folder / f"{name}.rank{rank}.safetensors")
        del model

    for name in REFUSED:
        try:
            AutoModelForCausalLM.from_pretrained(folder / name, distributed_config=DistributedConfig(tp_size=TP_SIZE))
        except ValueError as error:
            record["refused"][name] = str(error)

    record.update(world_size=dist.get_world_size(), backend=dist.get_backend())

    for name in PIPELINE_CASES:
        pipeline = DistributedConfig(pp_size=TP_SIZE)
        model = AutoModelForCausalLM.from_pretrained(folder / name, distributed_config=pipeline)
        with torch.no_grad():
            logits = model(ids).logits
        save_file({"logits": logits.contiguous()}, folder / f"{name}.pipeline.rank{rank}.safetensors")
        del model
    (folder / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(_rank_main(Path(sys.argv[1])))


# ---------------------------------------------------------------------------------------------------------------
# Test side.

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

from conftest import free_port, run_launcher, tiny_config
from modeling_diff import DiffLlamaForCausalLM

LAUNCH_TIMEOUT_S = 300  # about 30 s on two busy cores; a hung collective must not hang the suite


def _launch(folder: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two processes on two (shared) cores: more threads only contend
        "CUDA_VISIBLE_DEVICES": "",  # CPU and gloo even where a GPU is present
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(TP_SIZE)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(folder)]
    run_launcher(command, env=env, timeout_s=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The saved models, the inputs and every rank's records, after one torchrun launch."""
    folder = tmp_path_factory.mktemp("tensor-parallel")
    for name, overrides in {**CASES, **REFUSED}.items():
        torch.manual_seed(0)
        model = DiffLlamaForCausalLM(tiny_config(**overrides))
        with torch.no_grad():  # λ and the head-norm gains away from their init, so a wrong gradient sum shows
            for param_name, param in model.named_parameters():
                if "lambdas" in param_name or "head_norm" in param_name:
                    param.add_(0.3 * torch.randn_like(param))
        model.save_pretrained(folder / name)
    save_file({"ids": torch.randint(1, 128, (2, 10))}, folder / "inputs.safetensors")
    _launch(folder)
    return folder


def _single_process(folder: Path, name: str):
    """What the same model computes in this process: logits, loss and gradients of one training step."""
    model = DiffLlamaForCausalLM.from_pretrained(folder / name)
    ids = load_file(folder / "inputs.safetensors")["ids"]
    with torch.no_grad():
        logits = model(ids).logits
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    return model.eval(), ids, logits, out, grads


def _rank(folder: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(folder / f"{name}.rank{rank}.safetensors")


def test_the_launch_is_two_gloo_processes(launched):
    for rank in range(TP_SIZE):
        record = json.loads((launched / f"rank{rank}.json").read_text())
        assert record["world_size"] == TP_SIZE and record["backend"] == "gloo"


@pytest.mark.parametrize("name", CASES)
def test_logits_and_gradients_equal_one_process(launched, name):
    _, _, logits, out, grads = _single_process(launched, name)
    for rank in range(TP_SIZE):
        got = _rank(launched, name, rank)
        torch.testing.assert_close(got["inference_logits"], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["train_logits"], out.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["loss"], out.loss, atol=1e-6, rtol=1e-6)
        for param_name, grad in grads.items():
            assert grad is not None and grad.abs().sum() > 0, param_name
            torch.testing.assert_close(got[f"grad.{param_name}"], grad, atol=1e-6, rtol=1e-5, msg=param_name)


@pytest.mark.parametrize("name", CASES)
def test_each_process_holds_whole_kv_groups(launched, name):
    """Rank r holds KV heads r·h_kv/2 .. and the differential heads that read them, both maps of each: contiguous
    row blocks of q_proj (map-head 2i+s), k_proj (version 1: key maps 2g+s), v_proj and lambda_proj, column blocks of
    o_proj; λ vectors and head-norm gains whole on every rank."""
    model = DiffLlamaForCausalLM.from_pretrained(launched / name)
    attention = model.model.layers[0].self_attn
    h, h_kv, d = attention.num_heads, attention.num_key_value_heads, attention.head_dim
    width = model.config.cache_head_dim  # of one KV head's keys and value
    local_heads, local_kv = h // TP_SIZE, h_kv // TP_SIZE
    for rank in range(TP_SIZE):
        shards = {k.removeprefix("shard."): v for k, v in _rank(launched, name, rank).items() if k.startswith("shard.")}
        heads = slice(rank * local_heads, (rank + 1) * local_heads)
        kv_heads = slice(rank * local_kv, (rank + 1) * local_kv)
        expected = {
            "q_proj.weight": attention.q_proj.weight.view(h, 2 * d, -1)[heads],
            "k_proj.weight": attention.k_proj.weight.view(h_kv, width, -1)[kv_heads],
            "v_proj.weight": attention.v_proj.weight.view(h_kv, width, -1)[kv_heads],
            "o_proj.weight": attention.o_proj.weight.view(-1, h, width)[:, heads],
        }
        if attention.version == 2:
            expected["lambda_proj.weight"] = attention.lambda_proj.weight[heads]
        else:
            expected.update({n: p for n, p in attention.named_parameters() if "lambdas" in n or "head_norm" in n})
        assert set(shards) == set(expected)
        for param_name, tensor in expected.items():
            assert torch.equal(shards[param_name], tensor.reshape(shards[param_name].shape)), (rank, param_name)


@pytest.mark.parametrize("name", CASES)
def test_generation_and_cache_under_tensor_parallelism(launched, name):
    model, ids, _, _, _ = _single_process(launched, name)
    records = json.loads((launched / "rank0.json").read_text())
    config = model.config
    assert records[name]["cache_shape"] == [2, config.num_key_value_heads // TP_SIZE, 10, config.cache_head_dim]
    for implementation in ("dynamic", "static"):
        expected = model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, cache_implementation=implementation
        )
        for rank in range(TP_SIZE):
            assert torch.equal(_rank(launched, name, rank)[f"generated_{implementation}"], expected), implementation


def test_sizes_that_split_a_kv_group_are_refused(launched):
    for rank in range(TP_SIZE):
        refused = json.loads((launched / f"rank{rank}.json").read_text())["refused"]
        assert set(refused) == set(REFUSED)
        assert "num_key_value_heads (3) divisible by 2" in refused["v1-odd"]
        assert "num_key_value_heads (1) divisible by 2" in refused["v2-mqa"]


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_pipeline_parallel_logits_equal_one_process(launched, name):
    """The inherited `base_model_pp_plan` (embeddings, decoder layers, final norm) splits the layers over 2 stages."""
    _, _, logits, _, _ = _single_process(launched, name)
    last_stage = load_file(launched / f"{name}.pipeline.rank{TP_SIZE - 1}.safetensors")["logits"]
    torch.testing.assert_close(last_stage, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("use_head_norm", [True, False])
def test_tp_plan_names_every_sharded_module_and_nothing_else(version, use_head_norm):
    """Every rule matches a module of the model (transformers warns about a rule that matches nothing), and every
    parameter of the attention has a rule: a parameter without one would stay whole with a partial gradient."""
    model = DiffLlamaForCausalLM(tiny_config(diff_version=version, use_head_norm=use_head_norm))
    plan = model.config.base_model_tp_plan
    modules = {replace_layer_number_by_wildcard(name) for name, _ in model.model.named_modules()}
    assert set(plan) <= modules, set(plan) - modules
    attention = {n.rsplit(".", 1)[0] for n, _ in model.model.layers[0].self_attn.named_parameters()}
    assert {f"layers.*.self_attn.{n}" for n in attention} <= set(plan)
    assert set(LlamaConfig.base_model_tp_plan) <= set(plan)
    assert {f"model.{rule}": style for rule, style in plan.items()}.items() <= model.tp_plan.items()


def test_the_check_runs_before_sharding_and_refuses_other_versions():
    """`check_tensor_parallel` is what `from_pretrained` calls before anything is sharded: whole KV groups per process,
    and only the versions whose plan is written (DEX's differencing indexes heads by their global number)."""
    tiny_config(num_attention_heads=4, num_key_value_heads=2).check_tensor_parallel(2)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) divisible by 4"):
        tiny_config(num_attention_heads=4, num_key_value_heads=2).check_tensor_parallel(4)
    with pytest.raises(ValueError, match="diff_version 1 and 2, not 'dex'"):
        tiny_config(diff_version="dex", head_dim=16).check_tensor_parallel(2)
