"""The benchmark harness runs end to end and writes what it measured (timings themselves are not asserted here)."""

import json
import subprocess
import sys

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
    assert "llama" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
