"""The chunked CPU attention alone (`chunked_attention.py`): its cost against a Llama's SDPA, per chunk size, and
where its time goes.

The shapes are `perf.py`'s CPU preset: the Llama has 12 heads of 64 over 4 KV heads; version 2 has 24 query maps
over the same keys and values; the paired version 1 has 6 differential heads over 2 KV heads, each with two key maps
and a 128-wide value. Inputs are random tensors of one layer after its projections and rotary embedding, so this
measures the attention computation only (`perf.py`'s `attention_2048` includes the projections). `infer` runs
without autograd; `train` is forward and backward, against SDPA's forward and backward for the Llama.

    python benchmarks/chunked_path.py                                  # chunk sizes, both versions, both modes
    python benchmarks/chunked_path.py --profile --lengths 2048        # and a per-operation breakdown (torch.profiler)
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import chunked_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS, KV_HEADS, HEAD_DIM = 12, 4, 64  # the Llama's


def inputs(version: int, length: int, dtype: torch.dtype, train: bool) -> dict:
    """Random query, key, value and λ of one layer, in the shapes the model passes them."""
    d = HEAD_DIM
    h, h_kv = (HEADS, KV_HEADS) if version == 2 else (HEADS // 2, KV_HEADS // 2)
    key_maps, width = (1, d) if version == 2 else (2, 2 * d)
    r = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=train)  # noqa: E731
    lambda_ = torch.rand(1, length, h, 1, dtype=dtype) if version == 2 else torch.tensor(0.5, dtype=dtype)
    return {
        "query": r(1, length, 2 * h, d),
        "key": r(1, h_kv, length, key_maps * d),
        "value": r(1, h_kv, length, width),
        "lambda_": lambda_.requires_grad_(train),
    }


def candidates(version: int, length: int, dtype: torch.dtype, train: bool, row_bytes: list[int]) -> dict:
    """name -> zero-argument callable: the Llama's SDPA, then the chunked path at each chunk size."""
    r = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=train)  # noqa: E731
    q, k, v = r(1, HEADS, length, HEAD_DIM), r(1, KV_HEADS, length, HEAD_DIM), r(1, KV_HEADS, length, HEAD_DIM)
    x = inputs(version, length, dtype, train)
    module = SimpleNamespace(version=version, scaling=HEAD_DIM**-0.5)

    def finish(output):
        if train:
            output.backward(torch.ones_like(output))

    def chunked(size):
        def run():
            chunked_attention.CHUNK_ROW_BYTES = size
            finish(chunked_attention.chunked_attention(module, x["query"], x["key"], x["value"], None, x["lambda_"])[0])

        return run

    runs = {"llama": lambda: finish(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))}
    runs.update({f"chunked, {size} B": chunked(size) for size in row_bytes})
    return runs


def measure(runs: dict, train: bool, repeats: int) -> dict:
    """Median seconds per candidate, repeats round-robin so that background load hits all alike."""
    with torch.set_grad_enabled(train):
        for run in runs.values():
            run()
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def profile(run, train: bool, rows: int = 14) -> str:
    """Self time per operation over three calls, as torch.profiler tabulates it."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with torch.set_grad_enabled(train):
        run()
        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    parser.add_argument("--row-bytes", type=int, nargs="+", default=[384, 768, 1536], help="CHUNK_ROW_BYTES values")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print where the time goes, per operation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chunked_path")
    args = parser.parse_args(argv)
    default = chunked_attention.CHUNK_ROW_BYTES
    torch.manual_seed(0)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "default_row_bytes": default}
    report["env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    report["results"], profiles = {}, []
    lines = ["| version | mode | tokens | Llama (ms) | " + " | ".join(f"{b} B" for b in args.row_bytes) + " |"]
    lines.append("|---" * (4 + len(args.row_bytes)) + "|")
    for version in args.versions:
        for mode in args.modes:
            train = mode == "train"
            for length in args.lengths:
                runs = candidates(version, length, DTYPES[args.dtype], train, args.row_bytes)
                times = measure(runs, train, args.repeats)
                ratios = {name: round(t / times["llama"], 3) for name, t in times.items()}
                key = f"v{version}/{mode}/T={length}"
                report["results"][key] = {"llama_ms": times["llama"] * 1e3, "ratio": ratios}
                print(f"{key}: llama {times['llama'] * 1e3:.1f} ms; ratios {ratios}", flush=True)
                cells = " | ".join(f"{ratios[f'chunked, {b} B']:.2f}" for b in args.row_bytes)
                lines.append(f"| {version} | {mode} | {length} | {times['llama'] * 1e3:.0f} | {cells} |")
                if args.profile:
                    chunked_attention.CHUNK_ROW_BYTES = default
                    for name in ("llama", f"chunked, {default} B"):
                        if name in runs:
                            profiles.append(f"{key}, {name}:\n{profile(runs[name], train)}")
            chunked_attention.CHUNK_ROW_BYTES = default
    report["load_average_at_end"] = os.getloadavg()
    table = (
        f"Cost relative to the Llama's SDPA (median of {args.repeats}, {args.dtype}, {report['threads']} threads, "
        f"load average at the end {report['load_average_at_end'][0]:.1f}); columns: CHUNK_ROW_BYTES\n\n"
        + "\n".join(lines)
        + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "results.md").write_text(table + "".join(f"\n```\n{p}```\n" for p in profiles))
    print(table)
    for text in profiles:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
