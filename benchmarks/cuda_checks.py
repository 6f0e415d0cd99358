"""Correctness on a CUDA device: every attention implementation against eager, in fp32 and bf16, both versions.

Run by `benchmarks/gpu_check.sh`; writes a JSON verdict and exits non-zero if any check fails.

    python benchmarks/cuda_checks.py --out benchmarks/results/gpu/cuda_checks.json
"""

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configuration_diff import DiffLlamaConfig  # noqa: E402
from modeling_diff import DiffLlamaForCausalLM  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def check(version: int, implementation: str, dtype: torch.dtype, padded: bool) -> dict:
    torch.manual_seed(0)
    config = DiffLlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, diff_version=version, attn_implementation="eager", pad_token_id=0,
    )
    eager = DiffLlamaForCausalLM(config).to("cuda", dtype).eval()
    other = copy.deepcopy(eager)
    other.config._attn_implementation = implementation
    ids = torch.randint(1, 512, (2, 256), device="cuda")
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :100] = 0
    with torch.no_grad():
        reference = eager(ids, attention_mask=mask).logits.float()
        logits = other(ids, attention_mask=mask).logits.float()
        keep = mask.bool()
        error = (logits[keep] - reference[keep]).abs().max().item()
        cached = other.generate(ids[1:], max_new_tokens=16, do_sample=False, pad_token_id=0)
        uncached = other.generate(ids[1:], max_new_tokens=16, do_sample=False, use_cache=False, pad_token_id=0)
    ok = error <= TOLERANCE[dtype] and torch.isfinite(logits).all().item() and torch.equal(cached, uncached)
    return {"version": version, "implementation": implementation, "dtype": str(dtype), "padded": padded,
            "max_abs_error_vs_eager": error, "cache_equal": torch.equal(cached, uncached), "ok": bool(ok)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu" / "cuda_checks.json")
    args = parser.parse_args()
    implementations = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        implementations.append("flash_attention_2")
    results = []
    for version in (1, 2):
        for implementation in implementations:
            for dtype in (torch.float32, torch.bfloat16):
                if implementation == "flash_attention_2" and dtype == torch.float32:
                    continue  # FlashAttention-2 runs in half precision only
                for padded in (False, True):
                    results.append(check(version, implementation, dtype, padded))
                    print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "flash_attn": "flash_attention_2" in implementations, "checks": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
