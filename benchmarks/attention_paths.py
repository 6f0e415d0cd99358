"""Which formulation of version-1 differential attention is fastest: the attention kernel alone, against a Llama's.

For a Llama with H heads of width d over H_kv KV heads, the parameter-matched differential layer has h = H/2 heads,
each with two d-wide query/key maps and a 2d-wide value. Candidates, all computing the same (A1 V, A2 V):

- `chunked` (the model's CPU path over a causal mask, `chunked_attention.chunked_attention`): query chunks of
  matrix products, softmax, A1 − λ·A2, then one product with the value per chunk; returns the combined head outputs
  (the others return both maps' outputs, so it also saves the subtraction they still need).
- `selector` (the model's path with a padding mask, and on CUDA): one call, 2h query heads zero-padded to 2d
  so each selects its key map in the cached [K1 | K2]; equal widths everywhere.
- `split-values`: per map, two calls over the value's d-wide halves (four calls).
- `stacked-split`: both maps stacked on the head axis (2h query heads over 2h_kv key heads), two calls over the
  value's halves; needs the value duplicated for both maps.
- `wide-value`: per map, one call with the 2d-wide value (CPU SDPA falls back to its math kernel).
- `flex`: FlexAttention under `torch.compile`, per map, with the 2d-wide value (if this torch supports it here).

Decode (one query over a long cache) is measured too, where GQA handling dominates: `enable_gqa`, folding a
group's query heads into the sequence axis, or repeating K/V.

    python benchmarks/attention_paths.py [--lengths 512 2048 4096] [--dtypes fp32 bf16] [--no-flex]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunked_attention import chunked_attention  # noqa: E402
from configuration_diff import DiffLlamaConfig  # noqa: E402
from modeling_diff import DiffLlamaAttention  # noqa: E402
from perf import cpu_description  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sdpa(q, k, v, causal, scale, gqa=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


def chunked_layer(h, h_kv, d):
    """A version-1 attention layer of the given shape, for `chunked_attention`."""
    config = DiffLlamaConfig(
        hidden_size=2 * h * d, num_attention_heads=h, num_key_value_heads=h_kv, head_dim=d, intermediate_size=64
    )
    return DiffLlamaAttention(config, layer_idx=0)


def prefill_candidates(H, H_kv, d, T, dtype, use_flex):
    """name -> zero-argument callable, over random inputs of one layer."""
    h, h_kv = H // 2, H_kv // 2
    scale = d**-0.5
    r = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    q_llama, k_llama, v_llama = r(1, H, T, d), r(1, H_kv, T, d), r(1, H_kv, T, d)
    q1, q2 = r(1, h, T, d), r(1, h, T, d)
    keys, value = r(1, h_kv, T, 2 * d), r(1, h_kv, T, 2 * d)  # [K1 | K2] and V, as cached
    k1, k2 = keys[..., :d], keys[..., d:]
    va, vb = value[..., :d], value[..., d:]
    padded = torch.stack((F.pad(q1, (0, d)), F.pad(q2, (d, 0))), dim=2).flatten(1, 2)  # (1, 2h, T, 2d)
    stacked_q = torch.cat((q1, q2), dim=1)
    stacked_k = torch.cat((k1, k2), dim=1)
    gqa = h != h_kv
    layer = chunked_layer(h, h_kv, d)
    maps = torch.stack((q1, q2), dim=2).flatten(1, 2).transpose(1, 2)  # (1, T, 2h, d), the projection's layout
    lambda_ = torch.tensor(0.5, dtype=dtype)
    candidates = {
        "llama": lambda: sdpa(q_llama, k_llama, v_llama, True, scale, H != H_kv),
        "chunked": lambda: chunked_attention(layer, maps, keys, value, None, lambda_)[0],
        "selector": lambda: sdpa(padded, keys, value, True, scale, True),
        "split-values": lambda: [sdpa(q, k, v, True, scale, gqa) for q, k in ((q1, k1), (q2, k2)) for v in (va, vb)],
        "stacked-split": lambda: [
            sdpa(stacked_q, stacked_k, torch.cat((v, v), dim=1), True, scale, gqa) for v in (va, vb)
        ],
        "wide-value": lambda: [sdpa(q, k, value, True, scale, gqa) for q, k in ((q1, k1), (q2, k2))],
    }
    if use_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            torch._dynamo.reset()  # a fresh compile per shape: the recompile limit would silently fall back to eager
            block_mask = create_block_mask(lambda b, hh, qi, ki: qi >= ki, None, None, T, T, device="cpu")
            flex = torch.compile(flex_attention, dynamic=False)
            run = lambda: [  # noqa: E731
                flex(q, k.contiguous(), value, block_mask=block_mask, scale=scale, enable_gqa=gqa)
                for q, k in ((q1, k1), (q2, k2))
            ]
            with torch.no_grad():  # compile outside the timing, in the grad mode it is timed in
                run()
            candidates["flex"] = run
        except Exception as error:  # an unsupported shape or backend is a result too
            print(f"flex unavailable at T={T}, {dtype}: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
    return candidates


def decode_candidates(H, H_kv, d, S, dtype):
    """One new token over a cache of S tokens; the differential layer as the model runs it."""
    h, h_kv = H // 2, H_kv // 2
    scale = d**-0.5
    r = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    q_llama, k_llama, v_llama = r(1, H, 1, d), r(1, H_kv, S, d), r(1, H_kv, S, d)
    padded, keys, value = r(1, 2 * h, 1, 2 * d), r(1, h_kv, S, 2 * d), r(1, h_kv, S, 2 * d)

    def folded(q, k, v):  # the query heads of a KV group become that group's query positions
        out = sdpa(q.reshape(1, k.shape[1], -1, q.shape[-1]), k, v, False, scale)
        return out.reshape(1, -1, 1, v.shape[-1])

    def repeated(q, k, v):
        n = q.shape[1] // k.shape[1]
        return sdpa(q, k.repeat_interleave(n, 1), v.repeat_interleave(n, 1), False, scale)

    return {
        "llama (enable_gqa)": lambda: sdpa(q_llama, k_llama, v_llama, False, scale, True),
        "llama (folded)": lambda: folded(q_llama, k_llama, v_llama),
        "selector (enable_gqa)": lambda: sdpa(padded, keys, value, False, scale, True),
        "selector (folded)": lambda: folded(padded, keys, value),
        "selector (repeat_kv)": lambda: repeated(padded, keys, value),
    }


def measure(candidates, repeats, *, grad: bool = False):
    """Median seconds per call of each candidate, without autograd unless `grad` (a training step's backward)."""
    for run in candidates.values():
        with torch.set_grad_enabled(grad):
            run()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():  # round-robin, so background load hits all alike
            start = time.perf_counter()
            with torch.set_grad_enabled(grad):
                run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--decode-cache", type=int, default=2048)
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention_paths.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_description(),
              "prefill": {}, "decode": {}}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for length in args.lengths:
            cands = prefill_candidates(args.heads, args.kv_heads, args.head_dim, length, dtype, not args.no_flex)
            times = measure(cands, args.repeats)
            ratios = {n: round(t / times["llama"], 3) for n, t in times.items()}
            report["prefill"][f"{dtype_name}/T={length}"] = {"llama_ms": times["llama"] * 1e3, "ratio": ratios}
            print(f"prefill {dtype_name} T={length}: llama {times['llama'] * 1e3:.1f} ms; ratios {ratios}", flush=True)
        times = measure(decode_candidates(args.heads, args.kv_heads, args.head_dim, args.decode_cache, dtype), 50)
        base = times["llama (enable_gqa)"]
        ratios = {n: round(t / base, 3) for n, t in times.items()}
        report["decode"][f"{dtype_name}/S={args.decode_cache}"] = {"llama_us": base * 1e6, "ratio": ratios}
        print(f"decode {dtype_name} S={args.decode_cache}: llama {base * 1e6:.0f} us; ratios {ratios}", flush=True)
    report["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
