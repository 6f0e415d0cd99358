"""The benchmark harness runs end to end and writes what it measured (timings themselves are not asserted here)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def test_perf_harness_writes_json_markdown_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "perf.py"), "--preset", "tiny", "--dtypes", "fp32",
         "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    by_model = {r["model"]: r for r in data["results"]}
    assert set(by_model) == {"llama", "diff-paired", "diff-widened", "diff-v2", "builtin-diffllama"}
    llama, paired, v2 = by_model["llama"], by_model["diff-paired"], by_model["diff-v2"]
    # the paired layout and version 2 cache exactly what the Llama caches; the widened layout twice as much
    assert paired["kv_cache_bytes_per_token"] == llama["kv_cache_bytes_per_token"] == v2["kv_cache_bytes_per_token"]
    assert by_model["diff-widened"]["kv_cache_bytes_per_token"] == 2 * llama["kv_cache_bytes_per_token"]
    assert paired["parameters"] - llama["parameters"] == 6 * 16 * 2  # 6·d per layer
    assert set(paired["figures"]) == set(llama["figures"]) >= {"prefill_32", "decode_tokens_per_s", "train_step_32"}
    # peak training memory, from a fresh process per model: at least the weights and their gradients
    for result in (llama, paired, v2):
        assert result["figures"]["train_peak_64"]["value"] >= 2 * 4 * result["parameters"]
    assert "llama" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path):
    """`benchmarks/gpu_check.sh` end to end at a tiny size on the CPU: the correctness checks pass (with SDPA's
    chunked and packed CPU paths in place of CUDA's) and the benchmark writes its results. The script runs this
    interpreter (PYTHON), here with a PATH that has no `python` at all, as when the suite runs from a virtual
    environment's interpreter without that environment on PATH."""
    env = dict(os.environ, DEVICE="cpu", PRESET="tiny", OUT=str(tmp_path), PYTHON=sys.executable, PATH="/usr/bin:/bin")
    env.update(CHECKS_SECONDS="600", BENCH_SECONDS="600", REPEATS="1")  # the GPU's time budget is not the point here
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = json.loads((tmp_path / "cuda_checks.json").read_text())
    assert checks["device"] == "cpu"
    assert len(checks["checks"]) == 8  # 2 versions × fp32/bf16 × unpadded/padded, SDPA
    assert all(check["ok"] for check in checks["checks"]), checks["checks"]
    assert {r["model"] for r in json.loads((tmp_path / "perf" / "results.json").read_text())["results"]} >= {"llama"}


def test_malloc_benchmark_compares_allocator_settings_in_subprocesses(tmp_path):
    """`benchmarks/malloc_env.py` at a tiny size: one process per allocator setting, faults and time written."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "malloc_env.py"), "--preset", "tiny", "--length", "32",
         "--rounds", "1", "--prefills", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert {"glibc", "glibc-tuned"} <= set(summary)
    assert summary["glibc-tuned"]["environment"]["MALLOC_MMAP_THRESHOLD_"] == str(32 * 2**20)
    assert all(row["seconds_per_prefill"] > 0 and row["minor_faults_per_prefill"] >= 0 for row in summary.values())
    assert "glibc-tuned" in (tmp_path / "results.md").read_text()


def test_v2_kernel_benchmark_checks_every_kernel_against_the_models_call(tmp_path):
    """`benchmarks/v2_kernel.py` at a tiny size, several chunks and a short last one: each candidate's output is
    checked against version 2's one SDPA call before it is timed (the script stops otherwise), and where a C++
    toolchain exists the compiled chunks are built and checked too."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "v2_kernel.py"), "--heads", "4", "--kv-heads", "2", "--head-dim",
         "16", "--lengths", "40", "72", "--train-lengths", "40", "--chunk-tokens", "16", "--repeats", "1", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    compiled = report["compiled"] == "yes"
    if shutil.which("ninja") and shutil.which("c++"):
        assert compiled, report["compiled"]
    for length in ("40", "72"):
        row = report["lengths"][length]
        assert row["ratio"]["llama"] == 1.0 and row["ratio"]["sdpa-2h"] > 0
        assert set(row["max_error"]) == ({"chunks-python", "chunks-cpp"} if compiled else {"chunks-python"})
        assert all(error < 1e-5 for error in row["max_error"].values()), row["max_error"]
        assert compiled == ("chunks-cpp, products only" in row["ratio"])
    training = report["training"]["40"]  # forward and backward, the chunks' gradients checked against the call's
    assert set(training["ratio"]) == {"llama", "sdpa-2h", "chunks-python"} and training["max_error"] < 1e-5
    assert "Forward and backward" in (tmp_path / "results.md").read_text()


def test_local_inference_benchmark_measures_every_runtime_and_resumes(tmp_path):
    """benchmarks/local_inference.py on a tiny Llama and its version-2 conversion: every runtime but ExecuTorch
    measured (its lowering takes half a minute a model; tests/test_executorch.py measures an export with the same
    function), ONNX Runtime's greedy tokens compared with transformers', a rerun measures nothing again."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_trainer import MODULES, STDLIB, byte_level_tokenizer

    source = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(source)
    byte_level_tokenizer([STDLIB / f"{name}.py" for name in MODULES]).save_pretrained(source)
    runtimes = ("torch", "torch-int8", "torch-int4", "onnx", "onnx-int8")
    command = [sys.executable, str(ROOT / "benchmarks" / "local_inference.py"), "--quick", "--source", str(source),
               "--models", "v2", "--out", str(tmp_path / "out"), "--runtimes", *runtimes]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert set(runs) == {f"{model}/{runtime}" for model in ("llama", "v2") for runtime in runtimes}
    for model in ("llama", "v2"):
        assert runs[f"{model}/onnx"]["tokens_equal_torch"] is True
        assert runs[f"{model}/onnx"]["perplexity"] == pytest.approx(runs[f"{model}/torch"]["perplexity"], rel=1e-4)
        assert all(runs[f"{model}/{runtime}"]["decode_tok_s"] > 0 for runtime in runtimes)
    assert "| onnx-int8 | v2 |" in (tmp_path / "out" / "results.md").read_text()
    before = (tmp_path / "out" / "results.json").read_text()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0 and "[local]" not in rerun.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"] == json.loads(before)["runs"]
