"""Side-by-side speed and memory of differential attention against the models it would replace.

In one process, with the same hidden size, layers, MLP and dtype:

- `llama`: `LlamaForCausalLM` with H heads of width d (the baseline every figure is divided by);
- `diff-paired`: our version 1 in the paper's parameter-matched layout (H/2 differential heads, maps of width d);
- `diff-widened`: our version 1 with H differential heads (each source head kept, second maps added);
- `diff-v2`: our version 2 (H output heads, 2H query maps over the Llama's keys and values);
- `builtin-diffllama`: transformers' own `diffllama`, parameter-matched (H sub-heads).

Measures prefill latency, decode tokens per second with the KV cache, one training step (forward and backward),
peak memory of each, and the attention layer alone; warms up, repeats round-robin over the models (background
load then hits them alike), reports the median, and writes JSON, a
markdown table and a PNG plot. Every figure is also printed as a ratio to the Llama's.

Peak training memory (`train_peak_N`) comes from a fresh process per model, which builds the model and takes one
training step of N tokens: its peak resident set (the kernel's high-water mark of its address space, VmHWM) above
its resident set before the model existed, so weights, gradients and activations, and nothing an earlier workload
left in the allocator; glibc's mmap threshold is fixed at 64 KiB in that process, so that freed tensors leave the
resident set at once and the peak is that of live memory. On CUDA: the allocator's peak in that process.

    python benchmarks/perf.py                      # the ~100M-parameter CPU preset, fp32 and bf16
    python benchmarks/perf.py --preset tiny        # a seconds-long smoke run
    python benchmarks/perf.py --profile --only prefill_2048 --models llama diff-v2   # where the time goes
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modeling_diff  # noqa: E402
from configuration_diff import DiffLlamaConfig  # noqa: E402
from transformers import DiffLlamaConfig as BuiltinDiffLlamaConfig  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.diffllama.modeling_diffllama import DiffLlamaForCausalLM as BuiltinDiffLlama  # noqa: E402

MODELS = ("llama", "diff-paired", "diff-widened", "diff-v2", "builtin-diffllama")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_description() -> str:
    """The processor and the vector units PyTorch uses on it: bf16 timings differ several-fold between CPUs with and
    without AMX, so every result records them."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    units = [unit for unit in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if unit in flags]
    return f"{name}; torch {torch.backends.cpu.get_cpu_capability()}" + (f"; {' '.join(units)}" if units else "")


@dataclass
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    prefill_lengths: tuple[int, ...]
    decode_prompt: int
    decode_tokens: int
    train_length: int
    attention_length: int
    repeats: int
    train_peak_length: int


PRESETS = {
    # ~100M parameters (tied embeddings): hidden 768, 12 layers, 12 heads of 64 over 4 KV heads
    "cpu-100m": Preset(768, 12, 12, 4, 2048, 32000, (512, 2048, 4096), 512, 128, 1024, 2048, 3, 2048),
    # ~1B parameters, for a GPU
    "gpu-1b": Preset(2048, 16, 32, 8, 8192, 32000, (512, 2048, 4096), 512, 128, 4096, 4096, 5, 4096),
    "tiny": Preset(64, 2, 4, 2, 128, 256, (32, 64), 16, 8, 32, 64, 2, 64),
}


def build(name: str, preset: Preset, dtype: torch.dtype, device: str) -> torch.nn.Module:
    d = preset.hidden_size // preset.num_heads
    common = dict(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        head_dim=d,
    )
    heads, kv_heads = preset.num_heads, preset.num_kv_heads
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=heads, num_key_value_heads=kv_heads, **common))
    elif name == "diff-paired":
        config = DiffLlamaConfig(num_attention_heads=heads // 2, num_key_value_heads=kv_heads // 2, **common)
        model = modeling_diff.DiffLlamaForCausalLM(config)
    elif name == "diff-widened":
        config = DiffLlamaConfig(num_attention_heads=heads, num_key_value_heads=kv_heads, **common)
        model = modeling_diff.DiffLlamaForCausalLM(config)
    elif name == "diff-v2":
        config = DiffLlamaConfig(diff_version=2, num_attention_heads=heads, num_key_value_heads=kv_heads, **common)
        model = modeling_diff.DiffLlamaForCausalLM(config)
    elif name == "builtin-diffllama":
        config = BuiltinDiffLlamaConfig(num_attention_heads=heads, num_key_value_heads=kv_heads, **common)
        model = BuiltinDiffLlama(config)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model.config._attn_implementation = "sdpa"
    return model.to(device=device, dtype=dtype)


class PeakMemory:
    """Peak memory above the starting point: CUDA's allocator counter, or the process RSS sampled every 2 ms."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import psutil

            self.process = psutil.Process()
            self.start = self.peak = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, self.process.memory_info().rss) - self.start


def _time_once(fn, device: str) -> float:
    """Seconds of one call; a workload that times itself (decode) returns its own figure."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    own = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return own if isinstance(own, float) else time.perf_counter() - start


def prefill(model, length: int, device: str):
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    return lambda: model(ids, use_cache=False, logits_to_keep=1)


def decode(model, prompt: int, tokens: int, device: str):
    """Prefill a prompt, then greedy single-token steps with the KV cache; returns the seconds of the steps only."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device)

    def run() -> float:
        out = model(ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        step = out.logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(step, cache=out.cache, use_cache=True)
            step = out.logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def train_step(model, length: int, device: str):
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)

    def run():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    return run


def attention_alone(model, length: int, device: str):
    layer = model.model.layers[0].self_attn
    dtype = next(model.parameters()).dtype
    hidden = torch.randn(1, length, model.config.hidden_size, device=device, dtype=dtype)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(length, device=device)[None])
    return lambda: layer(hidden, position_embeddings=position_embeddings, attention_mask=None)


def training_peak_bytes(name: str, preset_name: str, dtype_name: str, device: str) -> int:
    """Peak memory of one training step of `train_peak_length` tokens, measured in a fresh process (module
    docstring)."""
    command = [sys.executable, __file__, "--train-peak-child", name, "--preset", preset_name, "--dtypes", dtype_name]
    env = dict(os.environ)
    if device == "cpu":
        # A fixed mmap threshold turns off glibc's dynamic one: every block of 64 KiB or more is mapped when allocated
        # and unmapped when freed, so the peak resident set is the peak of live tensors. With the dynamic threshold
        # freed blocks may stay on the heap or not, and the same step's peak varied by 10% from process to process.
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 2**10)
    child = subprocess.run(command + ["--device", device], capture_output=True, text=True, env=env)
    if child.returncode != 0:
        raise RuntimeError(f"the peak-memory process for {name} failed:\n{child.stderr[-3000:]}")
    return int(json.loads(child.stdout.strip().splitlines()[-1])["peak_bytes"])


def _peak_resident_bytes() -> int:
    """This process's peak resident set: VmHWM, the high-water mark of its own address space. Not getrusage's
    ru_maxrss, which Linux keeps across exec: a child started from a large process would report its parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: ru_maxrss, KiB on Linux


def _train_peak_child(name: str, preset: Preset, dtype_name: str, device: str) -> None:
    """In the fresh process: build the model, take one training step, print the peak above the start as JSON."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        import psutil

        start = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    model = build(name, preset, DTYPES[dtype_name], device).train()
    train_step(model, preset.train_peak_length, device)()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_resident_bytes()
    print(json.dumps({"peak_bytes": peak - start}))


@dataclass
class Result:
    model: str
    dtype: str
    parameters: int
    kv_cache_bytes_per_token: int
    figures: dict = field(default_factory=dict)  # name -> {"value": float, "unit": str, "peak_bytes": int}


def kv_cache_bytes_per_token(model, device: str) -> int:
    ids = torch.randint(0, model.config.vocab_size, (1, 8), device=device)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    total = sum(layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
    total += sum(layer.values.numel() * layer.values.element_size() for layer in cache.layers)
    return total // ids.shape[1]


def workloads(preset: Preset, device: str, skip_train: bool, only: tuple[str, ...] = ()):
    """(figure, unit, training?, factory) for every measurement, the training step last; `only` keeps the figures
    whose names start with one of its prefixes."""
    for figure in _all_workloads(preset, device, skip_train):
        if not only or figure[0].startswith(only):
            yield figure


def _all_workloads(preset: Preset, device: str, skip_train: bool):
    for length in preset.prefill_lengths:
        yield f"prefill_{length}", "s", False, lambda m, n=length: prefill(m, n, device)
    yield "decode_tokens_per_s", "tok/s", False, lambda m: decode(m, preset.decode_prompt, preset.decode_tokens, device)
    yield f"attention_{preset.attention_length}", "s", False, lambda m: attention_alone(m, preset.attention_length, device)
    if not skip_train:
        yield f"train_step_{preset.train_length}", "s", True, lambda m: train_step(m, preset.train_length, device)


def measure(
    names: list[str],
    preset_name: str,
    preset: Preset,
    dtype_name: str,
    device: str,
    skip_train: bool,
    only: tuple[str, ...] = (),
    skip_train_peak: bool = False,
    progress=None,
) -> list[Result]:
    """Every model on every workload, repeats taken round-robin so that background load hits all models alike; then
    peak training memory, one fresh process per model. `progress` gets the results so far after every figure."""
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build(name, preset, DTYPES[dtype_name], device).eval()
    results = {
        name: Result(name, dtype_name, sum(p.numel() for p in m.parameters()), kv_cache_bytes_per_token(m, device))
        for name, m in models.items()
    }
    for figure, unit, training, factory in tqdm(list(workloads(preset, device, skip_train, only)), desc=dtype_name):
        runs, peaks = {}, {}
        for name, model in models.items():
            model.train(training)
            # Inference runs without autograd (a factory's own `no_grad` would cover only the setup, not the call)
            runs[name] = factory(model) if training else torch.no_grad()(factory(model))
            runs[name]()  # warm-up
            gc.collect()
            with PeakMemory(device) as memory:
                runs[name]()
            peaks[name] = memory.bytes
        seconds = {name: [] for name in models}
        for _ in range(preset.repeats):
            for name, run in runs.items():
                seconds[name].append(_time_once(run, device))
        for name in models:
            median = statistics.median(seconds[name])
            value = preset.decode_tokens / median if unit == "tok/s" else median
            results[name].figures[figure] = {
                "value": value,
                "unit": unit,
                "peak_bytes": peaks[name],
                "seconds": [round(s, 6) for s in seconds[name]],  # every repeat, for the spread
            }
        del runs
        for model in models.values():
            model.zero_grad(set_to_none=True)
        gc.collect()
        if progress:
            progress(list(results.values()))
    figure = f"train_peak_{preset.train_peak_length}"
    if not (skip_train or skip_train_peak) and (not only or figure.startswith(only)):
        for name in tqdm(models, desc=f"{dtype_name} {figure}"):
            peak = training_peak_bytes(name, preset_name, dtype_name, device)
            results[name].figures[figure] = {"value": peak, "unit": "B", "peak_bytes": peak, "seconds": []}
            if progress:
                progress(list(results.values()))
    return list(results.values())


def profile(names: list[str], preset: Preset, dtype_name: str, device: str, only: tuple[str, ...], rows: int) -> str:
    """Where each model's time goes: self time per operation (torch.profiler) over one call of each figure, after a
    warm-up. Figures as for timing (`only` selects them); no repeats, so the shares, not the totals, are the point."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    tables = []
    for figure, _, training, factory in workloads(preset, device, skip_train=False, only=only):
        for name in names:
            torch.manual_seed(0)
            model = build(name, preset, DTYPES[dtype_name], device).train(training)
            run = factory(model) if training else torch.no_grad()(factory(model))
            run()
            with profiler(activities=[ProfilerActivity.CPU]) as prof:
                run()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            tables.append(f"{figure}, {name} ({dtype_name}):\n{table}")
            del model, run
            gc.collect()
    return "\n".join(tables)


def ratio(result: Result, baseline: Result, figure: str) -> float:
    """How many times the Llama's cost: time ratio, or for a rate the baseline's rate over ours."""
    ours, base = result.figures[figure]["value"], baseline.figures[figure]["value"]
    return base / ours if result.figures[figure]["unit"] == "tok/s" else ours / base


def markdown(results: list[Result]) -> str:
    lines = []
    for dtype in dict.fromkeys(r.dtype for r in results):
        group = [r for r in results if r.dtype == dtype]
        baseline = next(r for r in group if r.model == "llama")
        figures = list(baseline.figures)
        lines.append(f"\n**{dtype}** — each cell: value (cost relative to Llama; below 1 is cheaper)\n")
        lines.append("| model | params | KV bytes/token | " + " | ".join(figures) + " |")
        lines.append("|---" * (len(figures) + 3) + "|")
        for r in group:
            cells = []
            for f in figures:
                if f not in r.figures:
                    cells.append("n/a")
                    continue
                value, unit = r.figures[f]["value"], r.figures[f]["unit"]
                texts = {"tok/s": f"{value:.3g} tok/s", "B": f"{value / 2**20:.0f} MiB"}
                text = texts.get(unit, f"{value * 1e3:.3g} ms")
                cells.append(f"{text} ({ratio(r, baseline, f):.2f}×)")
            lines.append(
                f"| {r.model} | {r.parameters / 1e6:.1f}M | {r.kv_cache_bytes_per_token} | " + " | ".join(cells) + " |"
            )
        timed = [f for f in figures if baseline.figures[f]["unit"] != "B"]  # train_peak is its own figure above
        if not timed:
            continue
        lines.append("\nPeak memory above the start of each measurement (MiB, ratio to Llama):\n")
        lines.append("| model | " + " | ".join(timed) + " |")
        lines.append("|---" * (len(timed) + 1) + "|")
        for r in group:
            cells = []
            for f in timed:
                peak, base = r.figures[f]["peak_bytes"], baseline.figures[f]["peak_bytes"]
                # On CPU this is RSS growth: memory the allocator already holds from an earlier workload does not
                # show, so a ratio against a near-zero baseline would mean nothing.
                enough = base > 16 * 2**20
                cells.append(f"{peak / 2**20:.0f} ({peak / base:.2f}×)" if enough else f"{peak / 2**20:.0f}")
            lines.append(f"| {r.model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r.dtype for r in results))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        group = [r for r in results if r.dtype == dtype]
        baseline = next(r for r in group if r.model == "llama")
        figures = list(baseline.figures)
        width = 0.8 / len(group)
        for k, r in enumerate(group):
            values = [ratio(r, baseline, f) if f in r.figures else float("nan") for f in figures]
            ax.bar([i + k * width for i in range(len(figures))], values, width, label=r.model)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(figures))])
        ax.set_xticklabels(figures, rotation=30, ha="right")
        ax.set_ylabel("cost relative to Llama (lower is better)")
        ax.set_title(dtype)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-100m")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="override the preset's repeat count")
    parser.add_argument("--skip-train", action="store_true", help="leave out the training step and its peak memory")
    parser.add_argument("--skip-train-peak", action="store_true", help="leave out the peak training memory only")
    parser.add_argument("--only", nargs="+", default=[], help="measure only figures starting with these, e.g. decode")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "perf")
    parser.add_argument("--profile", action="store_true", help="print where the time goes per operation, no timing")
    parser.add_argument("--train-peak-child", choices=MODELS, help=argparse.SUPPRESS)  # see training_peak_bytes
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.train_peak_child:
        _train_peak_child(args.train_peak_child, preset, args.dtypes[0], args.device)
        return 0
    if args.repeats:
        preset.repeats = args.repeats
    models = ["llama"] + [m for m in args.models if m != "llama"]
    if args.profile:
        text = "\n".join(profile(models, preset, dtype, args.device, tuple(args.only), 14) for dtype in args.dtypes)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.txt").write_text(text)
        print(text)
        print(f"wrote {args.out}/profile.txt")
        return 0

    def write_json(results: list[Result], complete: bool) -> None:
        """After every figure too, so that a long run stopped midway keeps what it measured."""
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "preset": asdict(preset),
            "device": args.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_")},
            "machine": cpu_description(),
            "load_average_at_end": os.getloadavg(),
            "complete": complete,
        }
        data = {"meta": meta, "results": [asdict(r) for r in results]}
        (args.out / "results.json").write_text(json.dumps(data, indent=1))

    results = []
    for dtype in args.dtypes:
        group = measure(
            models, args.preset, preset, dtype, args.device, args.skip_train, tuple(args.only), args.skip_train_peak,
            progress=lambda partial: write_json(results + partial, complete=False),
        )
        results += group
        for result in group:
            summary = ", ".join(f"{f} {ratio(result, group[0], f):.2f}×" for f in result.figures)
            print(f"[{dtype}] {result.model:18s} {result.parameters / 1e6:6.1f}M params  {summary}", flush=True)

    write_json(results, complete=True)
    (args.out / "results.md").write_text(markdown(results))
    plot(results, args.out / "results.png")
    print(markdown(results))
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
