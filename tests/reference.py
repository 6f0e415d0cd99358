"""A plain, independent implementation of differential attention, for checking the model against.

Written from the papers' formulas, not from `modeling_diff`: loops over heads, float64, its own rotary embedding,
its own causal softmax. Only the weights are shared with the module under test.
"""

import math

import torch


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on (T, d) at positions 0..T-1."""
    seq_len, d = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, d/2)
    cos, sin = angles.cos(), angles.sin()
    first, second = x[:, : d // 2], x[:, d // 2 :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def rotary_interleaved(x: torch.Tensor, theta: float) -> torch.Tensor:
    """GPT-J style RoPE, as in the paper's released code: rotates dimension pairs (2j, 2j+1)."""
    seq_len, d = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[:, 0::2], x[:, 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(1)


def causal_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    scores = q @ k.T / math.sqrt(q.shape[-1])
    seq_len = scores.shape[0]
    future = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def _weights(attention, differentiable=False):
    """The layer's parameters in float64 by name; differentiable: still attached to the layer's autograd graph, so a
    backward pass through the reference reaches the parameters' gradients."""
    return {name: (p if differentiable else p.detach()).double() for name, p in attention.named_parameters()}


def _project(x, w, name):
    out = x @ w[f"{name}.weight"].T
    return out + w[f"{name}.bias"] if f"{name}.bias" in w else out


def differential_v1(w, h, h_kv, d, lambda_init, x, rope, rms_norm_eps, names=None):
    """The paper's attention from a dict of float64 weights; `names` renames o_proj / head_norm / lambdas."""
    names = {"o_proj": "o_proj", "head_norm": "head_norm", "lambda": "lambdas.lambda", **(names or {})}
    lam_q1, lam_k1, lam_q2, lam_k2 = (w[f"{names['lambda']}_{n}"] for n in ("q1", "k1", "q2", "k2"))
    lam = torch.exp(lam_q1 @ lam_k1) - torch.exp(lam_q2 @ lam_k2) + lambda_init  # a tensor: differentiable
    gain = w.get(f"{names['head_norm']}.weight")
    outputs = []
    for xb in x.double():
        q, k, v = _project(xb, w, "q_proj"), _project(xb, w, "k_proj"), _project(xb, w, "v_proj")
        heads = []
        for i in range(h):
            g = i // (h // h_kv)
            q1, q2 = (rope(q[:, (2 * i + s) * d : (2 * i + s + 1) * d]) for s in (0, 1))
            k1, k2 = (rope(k[:, (2 * g + s) * d : (2 * g + s + 1) * d]) for s in (0, 1))
            value = v[:, g * 2 * d : (g + 1) * 2 * d]
            head = (causal_softmax(q1, k1) - lam * causal_softmax(q2, k2)) @ value
            if gain is not None:
                rms = torch.sqrt(head.pow(2).mean(-1, keepdim=True) + rms_norm_eps)
                head = head / rms * gain * (1 - lambda_init)
            heads.append(head)
        outputs.append(_project(torch.cat(heads, dim=-1), w, names["o_proj"]))
    return torch.stack(outputs)


def reference_v1(attention, x: torch.Tensor, theta: float, rms_norm_eps: float, differentiable=False) -> torch.Tensor:
    """(B, T, hidden) -> (B, T, hidden), the paper's formula head by head."""
    return differential_v1(
        _weights(attention, differentiable),
        attention.num_heads,
        attention.num_key_value_heads,
        attention.head_dim,
        attention.lambda_init,
        x,
        lambda t: rotary(t, theta),
        rms_norm_eps,
    )


def reference_paper_layout(state, prefix, h, h_kv, d, lambda_init, x, theta, rms_norm_eps):
    """One attention layer given in the paper's released layout: out_proj, subln, interleaved rotary."""
    w = {k[len(prefix) :]: v.double() for k, v in state.items() if k.startswith(prefix)}
    names = {"o_proj": "out_proj", "head_norm": "subln", "lambda": "lambda"}
    rope = lambda t: rotary_interleaved(t, theta)  # noqa: E731
    return differential_v1(w, h, h_kv, d, lambda_init, x, rope, rms_norm_eps, names)


def reference_v2(attention, x: torch.Tensor, theta: float, differentiable=False) -> torch.Tensor:
    """(B, T, hidden) -> (B, T, hidden), the 2026 revision's formula head by head."""
    w = _weights(attention, differentiable)
    h, h_kv, d = attention.num_heads, attention.num_key_value_heads, attention.head_dim
    outputs = []
    for xb in x.double():
        q, k, v = _project(xb, w, "q_proj"), _project(xb, w, "k_proj"), _project(xb, w, "v_proj")
        gate = torch.sigmoid(xb @ w["lambda_proj.weight"].T)  # (T, h)
        heads = []
        for i in range(h):
            g = i // (h // h_kv)
            q1, q2 = (rotary(q[:, (2 * i + s) * d : (2 * i + s + 1) * d], theta) for s in (0, 1))
            key = rotary(k[:, g * d : (g + 1) * d], theta)
            value = v[:, g * d : (g + 1) * d]
            heads.append(causal_softmax(q1, key) @ value - gate[:, i : i + 1] * (causal_softmax(q2, key) @ value))
        outputs.append(_project(torch.cat(heads, dim=-1), w, "o_proj"))
    return torch.stack(outputs)
