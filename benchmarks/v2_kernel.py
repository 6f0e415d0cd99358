"""How close version 2's attention kernel comes to its FLOP floor on CPU: stock kernels against a compiled one.

Version 2 has 2h query maps over a Llama's h_kv keys and values. Its two QKᵀ products cannot be shared; its
product with the value can, if each head's maps are combined first, A1 − λ·A2, which needs both softmax rows
whole. So its attention does 1.5× the Llama's matrix-product FLOPs at best. Candidates, fp32, each computing
the layer's head outputs A1 V − λ·A2 V, (B, T, h, d):

- `sdpa-2h` (the model's path): one SDPA call with the 2h query maps, then the subtraction: 2× the FLOPs;
- `chunks-python` (`chunked_attention`, version 2): per chunk of queries, maps as matrix products, softmax, the
  combination, one product with the value;
- `chunks-cpp`: the same chunks as one C++ loop (compiled here with `torch.utils.cpp_extension`): MKL matrix
  products through ATen, each thread on its own chunk of one KV head with that chunk's maps in its L2 cache,
  AVX-512 (or AVX2) exponentials, the softmax's normalisation folded into the combination; four builds of it, each
  doing a prefix of the work, so the differences say where its time goes: `products only` (the two matrix
  products, no softmax: the floor any kernel built on these products can reach), `+ row max`, `+ exp`, and the whole `chunks-cpp`.

Training (`--train-lengths`): forward and backward of the Llama's call, `sdpa-2h` and the chunks under autograd,
whose backward recomputes each chunk's maps and shares the value's products too: 8 matrix products per block of
keys in the backward pass against SDPA's 10 for the two maps and the Llama's 5; with the forward pass 11, 14 and
7, so 1.57× the Llama's FLOPs at best.

Every candidate's output (and the chunks' gradients) is checked against `sdpa-2h` before it is timed, the partial
builds excepted. Ratios are to the Llama's SDPA call (h heads over h_kv), median of round-robin repeats. The
compiled kernel is a measurement, not a path of the model: it needs a C++ compiler and ninja at run time. CPU
only: on CUDA the question is a fused kernel's (`benchmarks/gpu_check.sh`).

    python benchmarks/v2_kernel.py                       # 1,024 / 2,048 / 4,096 tokens, the perf.py model's layer
    python benchmarks/v2_kernel.py --lengths 64 --repeats 1 --out /tmp/v2-kernel   # a smoke run
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attention_paths import measure  # noqa: E402
from chunked_attention import chunked_attention  # noqa: E402
from configuration_diff import DiffLlamaConfig  # noqa: E402
from lab import markdown_table, write_json  # noqa: E402
from modeling_diff import DiffLlamaAttention  # noqa: E402
from perf import cpu_description  # noqa: E402

# The chunk loop. query (slabs, T·R, d): slab = (sample, KV head), rows (token, map), R = 2G maps per token with
# map 2g+s being map s of head g; key (slabs, S, d); value (slabs, S, w); lam (slabs, T, G). Returns (slabs, T·G, w).
# `work` 0..3 stops after the matrix products, the row maxima, the exponentials, or runs everything.
KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <cmath>
#include <limits>

using Vec = at::vec::Vectorized<float>;

static float row_max(const float* x, int64_t n) {
  const int64_t vn = n - n % Vec::size();
  Vec acc(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < vn; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + j));
  float lanes[Vec::size()];
  acc.store(lanes);
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < Vec::size(); ++i) m = std::max(m, lanes[i]);
  for (int64_t j = vn; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x <- exp(x - m); returns the sum
static float row_exp(float* x, int64_t n, float m) {
  const int64_t vn = n - n % Vec::size();
  Vec acc(0.f), vm(m);
  for (int64_t j = 0; j < vn; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - vm).exp_u20();
    e.store(x + j);
    acc = acc + e;
  }
  float lanes[Vec::size()];
  acc.store(lanes);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  for (int64_t j = vn; j < n; ++j) { x[j] = std::exp(x[j] - m); s += x[j]; }
  return s;
}

// a <- a·ca − b·cb: the two maps' exponentials, normalised and combined in one pass
static void combine(float* a, const float* b, int64_t n, float ca, float cb) {
  const int64_t vn = n - n % Vec::size();
  Vec va(ca), vb(cb);
  for (int64_t j = 0; j < vn; j += Vec::size()) (Vec::loadu(a + j) * va - Vec::loadu(b + j) * vb).store(a + j);
  for (int64_t j = vn; j < n; ++j) a[j] = a[j] * ca - b[j] * cb;
}

torch::Tensor differential_chunks(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor lam,
                                  int64_t maps_per_token, double scale, int64_t chunk, int64_t work) {
  TORCH_CHECK(query.scalar_type() == at::kFloat, "the compiled chunks are fp32 only");
  query = query.contiguous(), key = key.contiguous(), value = value.contiguous(), lam = lam.contiguous();
  const int64_t slabs = query.size(0), R = maps_per_token, G = R / 2, T = query.size(1) / R, w = value.size(2);
  auto out = at::empty({slabs, T * G, w}, query.options());
  const int64_t chunks = (T + chunk - 1) / chunk;
  auto scores = at::empty({at::get_num_threads(), chunk * R, T}, query.options());  // one chunk's maps per thread
  at::parallel_for(0, slabs * chunks, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(true);  // worker threads do not inherit the caller's mode
    auto buffer = scores[at::get_thread_num()];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slab = item % slabs, c = chunks - 1 - item / slabs;  // the longest chunks first
      const int64_t start = c * chunk, stop = std::min(T, start + chunk), rows = stop - start, seen = stop;
      auto maps = buffer.narrow(0, 0, rows * R).narrow(1, 0, seen);
      at::addmm_out(maps, maps, query[slab].narrow(0, start * R, rows * R), key[slab].narrow(0, 0, seen).t(), 0,
                    scale);
      float* s = maps.data_ptr<float>();
      const int64_t ld = maps.stride(0);
      const float* lambda_ = lam[slab].data_ptr<float>();
      for (int64_t t = 0; t < rows && work > 0; ++t) {
        const int64_t sees = start + t + 1;  // keys 0..start+t
        for (int64_t g = 0; g < G; ++g) {
          float* first = s + (t * R + 2 * g) * ld;
          float* second = first + ld;
          const float m1 = row_max(first, sees), m2 = row_max(second, sees);
          float sum1 = 1.f, sum2 = 1.f;
          if (work > 1) { sum1 = row_exp(first, sees, m1); sum2 = row_exp(second, sees, m2); }
          if (work > 2) combine(first, second, sees, 1.f / sum1, lambda_[(start + t) * G + g] / sum2);
          for (int64_t j = sees; j < seen; ++j) first[j] = 0.f;
        }
      }
      // A1 − λ·A2 sits in the first map's rows: every other row of the chunk's maps
      auto combined = maps.as_strided({rows * G, seen}, {2 * ld, 1});
      auto rows_out = out[slab].narrow(0, start * G, rows * G);
      at::mm_out(rows_out, combined, value[slab].narrow(0, 0, seen));
    }
  });
  return out;
}
"""
WORK = {"chunks-cpp, products only": 0, "chunks-cpp, + row max": 1, "chunks-cpp, + exp": 2, "chunks-cpp": 3}


def compile_kernel():
    """The compiled chunk loop, or None and the reason it could not be built here (no compiler, no ninja)."""
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()  # the vector width ATen's own kernels chose here
    flags = ["-O3", "-march=native", "-fopenmp"]
    if capability in ("AVX512", "AVX2"):
        flags += [f"-DCPU_CAPABILITY_{capability}", f"-DCPU_CAPABILITY={capability}"]
    try:
        module = load_inline(
            "v2_kernel_chunks", cpp_sources=KERNEL, functions=["differential_chunks"], extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as error:
        return None, f"{type(error).__name__}: {str(error)[:300]}"
    return module, None


def v2_layer(h, h_kv, d) -> DiffLlamaAttention:
    """A version-2 attention layer of the given shape, for `chunked_attention`."""
    config = DiffLlamaConfig(diff_version=2, hidden_size=h * d, num_attention_heads=h, num_key_value_heads=h_kv,
                             head_dim=d, intermediate_size=64)
    return DiffLlamaAttention(config, layer_idx=0)


def llama_call(query, key, value):
    """The Llama's attention: one SDPA call, h query heads (B, h, T, d) over the KV heads."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)


def v2_call(query, key, value, lambda_):
    """Version 2's path: one SDPA call with the 2h query maps of `query` (B, T, 2h, d), then A1 V − λ·A2 V."""
    out = llama_call(query.transpose(1, 2), key, value).transpose(1, 2)
    out = out.unflatten(2, (-1, 2))  # (B, T, h, 2, d)
    return torch.addcmul(out[..., 0, :], lambda_, out[..., 1, :], value=-1)


def candidates(h, h_kv, d, T, kernel, chunk_tokens):
    """name -> zero-argument callable returning (B, T, h, d), over one layer's random inputs."""
    groups, scale = h // h_kv, d**-0.5
    query = torch.randn(1, T, 2 * h, d)  # the projection's layout, map 2i+s being map s of head i
    key, value = torch.randn(1, h_kv, T, d), torch.randn(1, h_kv, T, d)
    lambda_ = torch.rand(1, T, h, 1)
    llama_query = query[:, :, :h].transpose(1, 2).contiguous()
    layer = v2_layer(h, h_kv, d)

    def cpp(work):
        # (B·h_kv, T·2G, d) rows (token, map); λ (B·h_kv, T, G); the copies are part of the kernel's cost
        rows = query.view(1, T, h_kv, 2 * groups, d).transpose(1, 2).reshape(h_kv, T * 2 * groups, d)
        lam = lambda_.view(1, T, h_kv, groups).transpose(1, 2).reshape(h_kv, T, groups)
        out = kernel.differential_chunks(rows, key[0], value[0], lam, 2 * groups, scale, chunk_tokens, work)
        return out.view(1, h_kv, T, groups, d).transpose(1, 2).reshape(1, T, h, d)

    runs = {
        "llama": lambda: llama_call(llama_query, key, value),
        "sdpa-2h": lambda: v2_call(query, key, value, lambda_),
        "chunks-python": lambda: chunked_attention(layer, query, key, value, None, lambda_)[0],
    }
    if kernel is not None:
        runs.update({name: (lambda work=work: cpp(work)) for name, work in WORK.items()})
    return runs


def training_candidates(h, h_kv, d, T):
    """name -> zero-argument callable running forward and backward and returning the inputs' gradients, for the
    Llama's call, version 2's call and the chunks under autograd (their backward recomputes each chunk's maps)."""
    query = torch.randn(1, T, 2 * h, d, requires_grad=True)
    key, value = torch.randn(1, h_kv, T, d, requires_grad=True), torch.randn(1, h_kv, T, d, requires_grad=True)
    lambda_ = torch.rand(1, T, h, 1, requires_grad=True)
    llama_query = query.detach()[:, :, :h].transpose(1, 2).contiguous().requires_grad_()
    layer = v2_layer(h, h_kv, d)
    grad_output = torch.randn(1, T, h, d)

    def step(forward, inputs):
        def run():
            for tensor in inputs:
                tensor.grad = None
            forward().backward(grad_output)
            return [tensor.grad for tensor in inputs]

        return run

    inputs = (query, key, value, lambda_)
    return {
        "llama": step(lambda: llama_call(llama_query, key, value).transpose(1, 2), (llama_query, key, value)),
        "sdpa-2h": step(lambda: v2_call(query, key, value, lambda_), inputs),
        "chunks-python": step(lambda: chunked_attention(layer, query, key, value, None, lambda_)[0], inputs),
    }


def ratio_table(by_length: dict) -> str:
    """A markdown table of each kernel's ratio to the Llama's (rows) at each length (columns)."""
    rows = list(by_length.values())
    return markdown_table(
        ["kernel"] + [f"T={length}" for length in by_length],
        [[name] + [f"{row['ratio'][name]:.2f}" for row in rows] for name in rows[0]["ratio"]],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12, help="output heads h (the Llama's heads)")
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[1024, 2048],
                        help="lengths of the forward-and-backward comparison (Llama, sdpa-2h, chunks-python)")
    parser.add_argument("--chunk-tokens", type=int, default=32, help="tokens per chunk of the compiled loop")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "v2-kernel")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    kernel, unavailable = compile_kernel()
    if unavailable:
        print(f"[v2_kernel] the compiled chunks are left out: {unavailable}", file=sys.stderr, flush=True)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_description(),
              "shape": {"h": args.heads, "h_kv": args.kv_heads, "d": args.head_dim}, "chunk_tokens": args.chunk_tokens,
              "compiled": unavailable or "yes", "lengths": {}, "training": {}}
    for length in args.lengths:
        runs = candidates(args.heads, args.kv_heads, args.head_dim, length, kernel, args.chunk_tokens)
        with torch.inference_mode():
            expected = runs["sdpa-2h"]()
            errors = {name: (runs[name]() - expected).abs().max().item() for name in ("chunks-python", "chunks-cpp")
                      if name in runs}
        for name, error in errors.items():  # a fast wrong kernel is no result
            if error > 1e-4:
                raise AssertionError(f"{name} differs from sdpa-2h by {error:.2e} at T={length}")
        with torch.inference_mode():
            times = measure(runs, args.repeats)
        ratios = {name: round(t / times["llama"], 3) for name, t in times.items()}
        report["lengths"][str(length)] = {"llama_ms": times["llama"] * 1e3, "ratio": ratios, "max_error": errors}
        print(f"[v2_kernel] T={length}: llama {times['llama'] * 1e3:.1f} ms; {ratios}", flush=True)
    for length in args.train_lengths:
        runs = training_candidates(args.heads, args.kv_heads, args.head_dim, length)
        expected, chunked = runs["sdpa-2h"](), runs["chunks-python"]()
        error = max((a - b).abs().max().item() for a, b in zip(chunked, expected))
        if error > 1e-4:
            raise AssertionError(f"the chunks' gradients differ from sdpa-2h's by {error:.2e} at T={length}")
        times = measure(runs, args.repeats, grad=True)
        ratios = {name: round(t / times["llama"], 3) for name, t in times.items()}
        report["training"][str(length)] = {"llama_ms": times["llama"] * 1e3, "ratio": ratios, "max_error": error}
        print(f"[v2_kernel] forward and backward, T={length}: llama {times['llama'] * 1e3:.1f} ms; {ratios}",
              flush=True)
    report["load_average_at_end"] = os.getloadavg()
    write_json(args.out / "results.json", report)
    llama_ms = ", ".join(f"{r['llama_ms']:.1f} ms" for r in report["lengths"].values())
    text = (
        f"Version 2's attention kernel, fp32, {report['threads']} threads, {report['cpu']}: cost relative to the "
        f"Llama's SDPA call ({llama_ms}); h={args.heads}, h_kv={args.kv_heads}, d={args.head_dim}.\n\n"
        f"{ratio_table(report['lengths'])}\n"
    )
    if report["training"]:
        text += f"\nForward and backward:\n\n{ratio_table(report['training'])}\n"
    (args.out / "results.md").write_text(text)
    print(f"[v2_kernel] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
