"""What glibc's habit of returning freed memory to the OS costs a CPU prefill, and what allocator settings save.

PyTorch on CPU allocates every intermediate tensor with malloc. glibc serves blocks above its mmap threshold with a
fresh mmap and hands them back to the OS when freed (and trims the heap top above its trim threshold), so each
layer of a long prefill pages its intermediates in again: one minor page fault per 4 KiB touched. The settings
compared here keep that memory in the process instead; they are environment variables of the process, which this
library never sets for you:

- `glibc`: the defaults (mmap threshold 128 KiB, rising dynamically; trim threshold 128 KiB);
- `glibc-tuned`: `MALLOC_MMAP_THRESHOLD_` at glibc's largest accepted value (32 MiB on 64-bit) and
  `MALLOC_TRIM_THRESHOLD_` at 4 GiB, so freed blocks stay on the heap;
- `jemalloc`: `LD_PRELOAD` of Debian's libjemalloc2 (`apt-get install libjemalloc2`), when installed.

Each setting runs in its own process: build the Llama of `perf.py`'s CPU preset, one warm-up prefill, then timed
prefills; the process reports minor page faults (`getrusage`'s `ru_minflt`) and seconds per prefill. Processes
alternate between settings, so background load hits them alike; the median over processes is reported.

    python benchmarks/malloc_env.py                        # 2,048 tokens, fp32, 3 processes per setting
    python benchmarks/malloc_env.py --length 4096 --rounds 5
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from perf import DTYPES, PRESETS, build, prefill  # noqa: E402

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
SETTINGS = {
    "glibc": {},
    "glibc-tuned": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)},
    "jemalloc": {"LD_PRELOAD": str(JEMALLOC)},
}
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")


def child(preset: str, length: int, dtype: str, prefills: int) -> dict:
    """In the measured process: faults and seconds per prefill, after one warm-up."""
    torch.manual_seed(0)
    model = build("llama", PRESETS[preset], DTYPES[dtype], "cpu").eval()
    run = torch.no_grad()(prefill(model, length, "cpu"))
    run()
    faults, seconds = [], []
    for _ in range(prefills):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"minor_faults": statistics.median(faults), "seconds": statistics.median(seconds)}


def measure(setting: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES}
    env.update(SETTINGS[setting])
    command = [sys.executable, __file__, "--child", "--preset", args.preset, "--length", str(args.length)]
    command += ["--dtype", args.dtype, "--prefills", str(args.prefills)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{setting}: the measured process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-100m")
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens per prefill")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--prefills", type=int, default=3, help="timed prefills per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting, alternating")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "malloc")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.preset, args.length, args.dtype, args.prefills)))
        return 0

    settings = [s for s in SETTINGS if s != "jemalloc" or JEMALLOC.exists()]
    if "jemalloc" not in settings:
        print(f"jemalloc left out: {JEMALLOC} not installed (apt-get install libjemalloc2)", file=sys.stderr)
    runs = {s: [] for s in settings}
    for round_ in range(args.rounds):
        for setting in settings:
            runs[setting].append(measure(setting, args))
            print(f"round {round_ + 1}/{args.rounds} {setting}: {runs[setting][-1]}", flush=True)
    summary = {
        s: {
            "minor_faults_per_prefill": statistics.median(r["minor_faults"] for r in runs[s]),
            "seconds_per_prefill": statistics.median(r["seconds"] for r in runs[s]),
            "environment": SETTINGS[s],
        }
        for s in settings
    }
    base = summary["glibc"]
    lines = [
        f"Llama prefill of {args.length} tokens ({args.preset}, {args.dtype}, {torch.get_num_threads()} threads), "
        f"median of {args.rounds} processes × {args.prefills} prefills:\n",
        "| allocator | minor page faults per prefill | seconds per prefill | time vs glibc defaults |",
        "|---|---:|---:|---:|",
    ]
    for s, row in summary.items():
        ratio = row["seconds_per_prefill"] / base["seconds_per_prefill"]
        faults, seconds = row["minor_faults_per_prefill"], row["seconds_per_prefill"]
        lines.append(f"| {s} | {faults:,.0f} | {seconds:.3f} | {ratio:.2f}× |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average_at_end": os.getloadavg()}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
