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


def causal_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    scores = q @ k.T / math.sqrt(q.shape[-1])
    seq_len = scores.shape[0]
    future = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def _weights(attention):
    return {name: p.detach().double() for name, p in attention.named_parameters()}


def _project(x, w, name):
    out = x @ w[f"{name}.weight"].T
    return out + w[f"{name}.bias"] if f"{name}.bias" in w else out


def reference_v1(attention, x: torch.Tensor, theta: float, rms_norm_eps: float) -> torch.Tensor:
    """(B, T, hidden) -> (B, T, hidden), the paper's formula head by head."""
    w = _weights(attention)
    h, h_kv, d = attention.num_heads, attention.num_key_value_heads, attention.head_dim
    lambda_init = attention.lambda_init
    lam = (
        math.exp(float(w["lambdas.lambda_q1"] @ w["lambdas.lambda_k1"]))
        - math.exp(float(w["lambdas.lambda_q2"] @ w["lambdas.lambda_k2"]))
        + lambda_init
    )
    outputs = []
    for xb in x.double():
        q, k, v = _project(xb, w, "q_proj"), _project(xb, w, "k_proj"), _project(xb, w, "v_proj")
        heads = []
        for i in range(h):
            g = i // (h // h_kv)
            q1, q2 = (rotary(q[:, (2 * i + s) * d : (2 * i + s + 1) * d], theta) for s in (0, 1))
            k1, k2 = (rotary(k[:, (2 * g + s) * d : (2 * g + s + 1) * d], theta) for s in (0, 1))
            value = v[:, g * 2 * d : (g + 1) * 2 * d]
            head = (causal_softmax(q1, k1) - lam * causal_softmax(q2, k2)) @ value
            if "head_norm.weight" in w:
                rms = torch.sqrt(head.pow(2).mean(-1, keepdim=True) + rms_norm_eps)
                head = head / rms * w["head_norm.weight"] * (1 - lambda_init)
            heads.append(head)
        outputs.append(_project(torch.cat(heads, dim=-1), w, "o_proj"))
    return torch.stack(outputs)


def reference_v2(attention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """(B, T, hidden) -> (B, T, hidden), the 2026 revision's formula head by head."""
    w = _weights(attention)
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
