"""Peak memory and throughput of a streaming conversion, on a synthetic multi-shard Llama checkpoint.

Writes a random bf16 Llama of about 2.1 GB in 400 MB shards into a temporary folder, converts it (`widened`, the
strategy that grows every attention tensor) in a child process, and reports the child's peak resident memory above
the fixed overhead of a process that has imported torch, transformers and `conversion` and read the config. The
claim checked: that excess stays under 1.5x the largest source shard. Everything it writes is deleted afterwards;
the measurement goes to benchmarks/results/convert_memory.json.

    python benchmarks/convert_memory.py
"""

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conversion.writer import Entry, StreamingWriter, parse_size

# About 1.07 B parameters: Llama-like proportions (attention a fifth of a layer), 2.1 GB in bf16.
CONFIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    dtype="bfloat16",
    architectures=["LlamaForCausalLM"],
)

BASELINE = """
import sys
sys.path.insert(0, {root!r})
from conversion import sources, weight_map
sources.resolve({source!r})
"""


def write_source(folder: Path, shard_size: str) -> int:
    """A random Llama checkpoint, written tensor by tensor (never all in memory); returns its size in bytes."""
    config = LlamaConfig(**CONFIG)
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in LlamaForCausalLM(config).state_dict().items()}
    entries = [Entry(key, shape, torch.bfloat16) for key, shape in shapes.items()]
    writer = StreamingWriter(folder, entries, parse_size(shard_size))
    generator = torch.Generator().manual_seed(0)
    for entry in entries:
        writer.write(entry.key, (torch.randn(entry.shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(folder)
    # Conversion carries the tokenizer over, so the source needs one; its vocabulary is irrelevant here.
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    return sum(entry.nbytes for entry in entries)


def peak_rss_of(command: list[str]) -> tuple[int, float]:
    """Peak resident set size (bytes) and wall time of a child process, alone in its own measuring process."""
    probe = (
        "import resource, subprocess, sys, time;"
        "t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter() - t)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    peak, seconds = result.stdout.split()
    return int(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-size", default="400MB")
    parser.add_argument("--strategy", default="widened")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "convert_memory.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        source, target = work / "source", work / "converted"
        source.mkdir()
        start = time.perf_counter()
        total = write_source(source, args.shard_size)
        print(f"wrote {total / 1e9:.2f} GB synthetic Llama in {time.perf_counter() - start:.1f} s")
        shards = sorted(source.glob("*.safetensors"))
        largest = max(path.stat().st_size for path in shards)

        baseline, _ = peak_rss_of([sys.executable, "-c", BASELINE.format(root=str(ROOT), source=str(source))])
        command = [
            sys.executable,
            "-m",
            "conversion",
            str(source),
            str(target),
            "--strategy",
            args.strategy,
            "--no-verify",
            "--no-progress",
        ]
        peak, seconds = peak_rss_of(command)
        written = sum(path.stat().st_size for path in target.glob("*.safetensors"))
        excess = peak - baseline
        result = {
            "strategy": args.strategy,
            "source_bytes": total,
            "source_shards": len(shards),
            "largest_shard_bytes": largest,
            "output_bytes": written,
            "baseline_peak_rss_bytes": baseline,
            "conversion_peak_rss_bytes": peak,
            "excess_over_baseline_bytes": excess,
            "excess_over_largest_shard": excess / largest,
            "limit_over_largest_shard": 1.5,
            "seconds_including_startup": seconds,
            "throughput_gb_per_s": total / 1e9 / seconds,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, value in result.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")
    verdict = "within" if result["excess_over_largest_shard"] < 1.5 else "OVER"
    print(
        f"peak RSS {peak / 1e9:.2f} GB, {excess / 1e9:.2f} GB above the {baseline / 1e9:.2f} GB baseline = "
        f"{result['excess_over_largest_shard']:.2f}x the largest shard ({verdict} the 1.5x limit); "
        f"{result['throughput_gb_per_s']:.2f} GB/s"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
