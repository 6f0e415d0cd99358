"""Correctness on a CUDA device: every attention implementation against eager, in fp32 and bf16, both versions.

Run by `benchmarks/gpu_check.sh`; writes a JSON verdict and exits non-zero if any check fails.

    python benchmarks/cuda_checks.py --out benchmarks/results/gpu/cuda_checks.json
    python benchmarks/cuda_checks.py --device cpu --out /tmp/checks.json   # the same checks on the CPU

Each check runs a two-layer model over 256 tokens (with and without left padding) in eager and in the other
implementation, and compares the logits of a full forward pass and of cached decoding (a prefill of 200 tokens, three
tokens onto the cache, then one token at a time) with eager's full pass at every position.
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

# Largest error allowed against eager, relative to the largest logit: 1-3 bf16 ulps are normal at these sizes
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
PREFILL = 200  # tokens before cached decoding starts, of 256


def check(version: int, implementation: str, dtype: torch.dtype, padded: bool, device: str) -> dict:
    torch.manual_seed(0)
    config = DiffLlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, diff_version=version, attn_implementation="eager", pad_token_id=0,
    )
    eager = DiffLlamaForCausalLM(config).to(device, dtype).eval()
    other = copy.deepcopy(eager)
    other.config._attn_implementation = implementation
    ids = torch.randint(1, 512, (2, 256), device=device)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :100] = 0
    keep = mask.bool()
    with torch.no_grad():
        reference = eager(ids, attention_mask=mask).logits.float()
        logits = other(ids, attention_mask=mask).logits.float()
        # Cached decoding, teacher-forced so that a near-tie in bf16 cannot send the two runs down different tokens
        out = other(ids[:, :PREFILL], attention_mask=mask[:, :PREFILL], use_cache=True)
        steps = [out.logits]
        out = other(ids[:, PREFILL : PREFILL + 3], attention_mask=mask[:, : PREFILL + 3], cache=out.cache)
        steps.append(out.logits)
        for t in range(PREFILL + 3, ids.shape[1]):
            out = other(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache)
            steps.append(out.logits)
        cached = torch.cat(steps, dim=1).float()
    error = (logits[keep] - reference[keep]).abs().max().item()
    cached_error = (cached[keep] - reference[keep]).abs().max().item()
    finite = torch.isfinite(logits[keep]).all().item() and torch.isfinite(cached[keep]).all().item()
    scale = reference[keep].abs().max().item()
    ok = finite and max(error, cached_error) <= TOLERANCE[dtype] * scale
    return {"version": version, "implementation": implementation, "dtype": str(dtype), "padded": padded,
            "max_abs_error_vs_eager": error, "cached_max_abs_error_vs_eager": cached_error,
            "largest_logit": scale, "ok": bool(ok)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu" / "cuda_checks.json")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    implementations = ["sdpa"]
    if args.device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        implementations.append("flash_attention_2")
    results = []
    for version in (1, 2):
        for implementation in implementations:
            for dtype in (torch.float32, torch.bfloat16):
                if implementation == "flash_attention_2" and dtype == torch.float32:
                    continue  # FlashAttention-2 runs in half precision only
                for padded in (False, True):
                    results.append(check(version, implementation, dtype, padded, args.device))
                    print(json.dumps(results[-1]), flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                    "flash_attn": "flash_attention_2" in implementations, "checks": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
