"""What the process environment costs a CPU prefill: glibc returning freed memory to the OS, and OpenMP threads
spinning while they wait on a loaded machine.

PyTorch on CPU allocates every intermediate tensor with malloc. glibc serves blocks above its mmap threshold with a
fresh mmap and hands them back to the OS when freed (and trims the heap top above its trim threshold), so each
layer of a long prefill pages its intermediates in again: one minor page fault per 4 KiB touched. The allocator
settings compared keep that memory in the process instead; they are environment variables of the process, which
this library never sets for you:

- `glibc`: the defaults (mmap threshold 128 KiB, rising dynamically; trim threshold 128 KiB);
- `glibc-tuned`: `MALLOC_MMAP_THRESHOLD_` at glibc's largest accepted value (32 MiB on 64-bit) and
  `MALLOC_TRIM_THRESHOLD_` at 4 GiB, so freed blocks stay on the heap;
- `jemalloc`: `LD_PRELOAD` of Debian's libjemalloc2 (`apt-get install libjemalloc2`), when installed.

These three inherit the caller's `OMP_WAIT_POLICY`. Two more settings compare that variable itself (glibc
defaults): `omp-default` (unset: a thread that finishes its share of a parallel operation spins a while before it
sleeps) and `omp-passive` (`OMP_WAIT_POLICY=PASSIVE`: it sleeps at once). On a machine whose cores are all busy a
spinning thread takes the core that the thread it waits for needs, so every parallel operation costs a scheduler
slice: the more operations, the more it costs (version 1's chunked attention runs many small ones).

Each setting runs in its own process: build the model of `perf.py`'s CPU preset (`--model`), one warm-up prefill,
then timed prefills; the process reports minor page faults (`getrusage`'s `ru_minflt`) and seconds per prefill.
Processes alternate between settings, so background load hits them alike; the median over processes is reported.

    python benchmarks/malloc_env.py                        # allocators: a Llama, 2,048 tokens, 3 processes each
    python benchmarks/malloc_env.py --settings omp-default omp-passive --model diff-paired --out OUT
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

from perf import DTYPES, MODELS, PRESETS, build, cpu_description, prefill  # noqa: E402

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": None, "LD_PRELOAD": None}  # None: unset
SETTINGS = {  # the environment each setting's process gets on top of the caller's
    "glibc": ALLOCATOR,
    "glibc-tuned": {**ALLOCATOR, "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)},
    "jemalloc": {**ALLOCATOR, "LD_PRELOAD": str(JEMALLOC)},
    "omp-default": {**ALLOCATOR, "OMP_WAIT_POLICY": None},
    "omp-passive": {**ALLOCATOR, "OMP_WAIT_POLICY": "PASSIVE"},
}


def child(model_name: str, preset: str, length: int, dtype: str, prefills: int) -> dict:
    """In the measured process: faults and seconds per prefill, after one warm-up."""
    torch.manual_seed(0)
    model = build(model_name, PRESETS[preset], DTYPES[dtype], "cpu").eval()
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
    env = dict(os.environ)
    for name, value in SETTINGS[setting].items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    command = [sys.executable, __file__, "--child", "--model", args.model, "--preset", args.preset]
    command += ["--length", str(args.length)]
    command += ["--dtype", args.dtype, "--prefills", str(args.prefills)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{setting}: the measured process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="llama")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=["glibc", "glibc-tuned", "jemalloc"])
    parser.add_argument("--preset", choices=PRESETS, default="cpu-100m")
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens per prefill")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--prefills", type=int, default=3, help="timed prefills per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting, alternating")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "malloc")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.preset, args.length, args.dtype, args.prefills)))
        return 0

    settings = [s for s in args.settings if s != "jemalloc" or JEMALLOC.exists()]
    if "jemalloc" in args.settings and "jemalloc" not in settings:
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
    base = summary[settings[0]]
    caller = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    lines = [
        f"{args.model} prefill of {args.length} tokens ({args.preset}, {args.dtype}, {torch.get_num_threads()} "
        f"threads, caller's environment {caller}), median of {args.rounds} processes × {args.prefills} prefills:\n",
        f"| setting | minor page faults per prefill | seconds per prefill | time vs {settings[0]} |",
        "|---|---:|---:|---:|",
    ]
    for s, row in summary.items():
        ratio = row["seconds_per_prefill"] / base["seconds_per_prefill"]
        faults, seconds = row["minor_faults_per_prefill"], row["seconds_per_prefill"]
        lines.append(f"| {s} | {faults:,.0f} | {seconds:.3f} | {ratio:.2f}× |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu_description(),
            "load_average_at_end": os.getloadavg()}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
