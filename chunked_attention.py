"""Differential attention in query chunks of matrix products: the CPU path of `DiffLlamaAttention` for inference and
training over a plain causal mask.

Per chunk of queries: the maps as matrix products over the keys the chunk may see, softmax, A1 − λ·A2, one product
with the value. The two maps share that product (a fused attention kernel multiplies each map by the value), the
maps are never wider than one chunk, and keys past the chunk's last token are skipped.

Training runs the same chunks forward and keeps only the inputs; the backward pass recomputes each chunk's maps, as
flash attention does, and with P_s = softmax(S_s), M = P_1 − λ·P_2, O = M V and the output gradient dO:

    dV = Mᵀ dO,   dM = dO Vᵀ,   e_s = rowsum(P_s ∘ dM),   dλ = −e_2
    dS_1 = P_1 ∘ (dM − e_1)/√d,   dS_2 = −λ·P_2 ∘ (dM − e_2)/√d,   dQ_s = dS_s K_s,   dK_s = Σ dS_sᵀ Q_s

(dλ summed over every row for version 1's one λ per layer, per token and head for version 2's gate).

This file travels with `modeling_diff.py` as remote code: it imports only `torch`.
"""

import torch

# Query rows (tokens × query maps per key map) in one chunk, as bytes of one row of queries per element: 192 rows in
# fp32, 384 in bf16 (the fastest of 384–3072 bytes measured at 1,024–4,096 tokens on CPU, inference and training).
CHUNK_ROW_BYTES = 768


def chunked_attention(module, query, key, value, attention_mask, lambda_) -> tuple[torch.Tensor, None]:
    r"""The differential attention of a causal, unpadded call, in query chunks; differentiable. Returns the output
    (B, T, h, w) and no maps (they never exist whole).

    module: the attention layer, for its version and scaling. query (B, T, 2h, d) after rotary, T > 1; key
    (B, h_kv, S, 2d or d) and value (B, h_kv, S, w); lambda\_ a 0-dim tensor (version 1) or (B, T, h, 1) (version
    2). Head counts come from these shapes: a tensor-parallel rank holds only its share of the heads.

    attention_mask must be None, which means SDPA's `is_causal`, as transformers passes it: query t sees keys 0..t.
    The call starts the sequence, and a static cache's free slots lie beyond T, never read.
    """
    if attention_mask is not None:
        raise ValueError("chunked_attention computes a plain causal mask only; pass attention_mask=None.")
    shape = (module.version, query.shape[2] // 2, key.shape[1], module.scaling)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, lambda_)):
        return _ChunkedAttention.apply(query, key, value, lambda_, *shape), None
    return _Chunks(query, key, value, lambda_, *shape).forward(), None


class _ChunkedAttention(torch.autograd.Function):
    """Forward in chunks keeping only the inputs; backward recomputes each chunk's maps."""

    @staticmethod
    def forward(ctx, query, key, value, lambda_, version, num_heads, num_key_value_heads, scaling):
        ctx.save_for_backward(query, key, value, lambda_)
        ctx.shape = (version, num_heads, num_key_value_heads, scaling)
        return _Chunks(query, key, value, lambda_, *ctx.shape).forward()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        query, key, value, lambda_ = ctx.saved_tensors
        grads = _Chunks(query, key, value, lambda_, *ctx.shape).backward(grad_output)
        return *grads, None, None, None, None


class _Chunks:
    """One call's queries, keys and values as slabs, the batch of every product of queries and keys.

    Version 1: map s of each head reads key map s of its KV head, so a slab is (sample, KV head, key map) and its
    rows are (token, head). Version 2: both maps of every head of a group read the group's one key, so a slab is
    (sample, KV head) and its rows are (token, head, map).
    """

    def __init__(self, query, key, value, lambda_, version, num_heads, num_key_value_heads, scaling):
        batch, seq_len, _, d = query.shape
        h_kv, length = num_key_value_heads, key.shape[2]  # a static cache's length, not T
        groups = num_heads // h_kv  # differential heads per KV head
        self.version, self.scaling = version, scaling
        self.map_axis = 1 if version == 1 else 4  # of `_pairs`
        self.shape = (batch, seq_len, num_heads, h_kv, groups, d)
        if version == 1:
            self.key_maps, self.per_token = 2, groups
            query = query.view(batch, seq_len, h_kv, groups, 2, d).permute(0, 2, 4, 1, 3, 5)  # (B, h_kv, 2, T, G, d)
            self.lambda_ = lambda_
        else:
            self.key_maps, self.per_token = 1, 2 * groups
            # (B, h_kv, 1, T, 2G, d)
            query = query.view(batch, seq_len, h_kv, 1, 2 * groups, d).permute(0, 2, 3, 1, 4, 5)
            self.lambda_ = lambda_.view(batch, seq_len, h_kv, groups, 1).transpose(1, 2)  # (B, h_kv, T, G, 1)
        self.query = query.reshape(-1, seq_len * self.per_token, d)  # (slabs, T·maps per key map, d), a copy
        # (slabs, S, d): version 1 copies [K1 | K2] apart, version 2 is a view of the key
        self.key = key.view(batch, h_kv, length, self.key_maps, d).transpose(2, 3).reshape(-1, length, d)
        self.value = value.reshape(batch * h_kv, length, -1)  # (B·h_kv, S, w)
        self.chunk_tokens = min(seq_len, max(1, CHUNK_ROW_BYTES // self.query.element_size() // self.per_token))
        # The maps of one chunk live in buffers made once per call and reused by every chunk, so the chunks do not
        # allocate (and page in) megabytes of fresh memory each.
        rows = self.chunk_tokens * seq_len
        self.scores = self.query.new_empty(self.query.shape[0] * self.per_token * rows)
        self.maps = self.query.new_empty(batch * h_kv * groups * rows)

    def chunks(self):
        """Per chunk of queries: (start, stop, probs, maps), probs the softmax maps (slabs, rows·maps per key map,
        seen) and maps A1 − λ·A2 (B·h_kv, rows·G, seen), both in the reused buffers."""
        batch, seq_len, _, h_kv, groups, _ = self.shape
        slabs, per_token = self.query.shape[0], self.per_token
        lowest = torch.finfo(self.query.dtype).min
        # Within a chunk each token sees itself and those before it; a shorter last chunk takes the top-left corner
        future = torch.ones(self.chunk_tokens, self.chunk_tokens, dtype=torch.bool, device=self.query.device).triu(1)
        for start in range(0, seq_len, self.chunk_tokens):
            stop = min(start + self.chunk_tokens, seq_len)
            rows, seen = stop - start, stop  # the keys this chunk's last token sees
            probs = self.scores[: slabs * rows * per_token * seen].view(slabs, rows * per_token, seen)
            chunk = self.query[:, start * per_token : stop * per_token]
            # Q Kᵀ/√d, no other values read
            probs.baddbmm_(chunk, self.key[:, :seen].transpose(1, 2), beta=0, alpha=self.scaling)
            if rows > 1:
                probs.view(-1, rows, per_token, seen)[..., start:].masked_fill_(future[:rows, None, :rows], lowest)
            torch.softmax(probs, dim=-1, out=probs)  # in place: the kernel reads a row whole before writing it
            pairs = self._pairs(probs, rows)
            first, second = pairs.select(self.map_axis, 0), pairs.select(self.map_axis, 1)
            maps = self.maps[: batch * h_kv * rows * groups * seen].view(first.shape)
            torch.addcmul(first, self._lambda(start, stop), second, value=-1, out=maps)  # A1 − λ·A2
            yield start, stop, probs, maps.view(batch * h_kv, rows * groups, seen)

    def _lambda(self, start: int, stop: int) -> torch.Tensor:
        return self.lambda_ if self.version == 1 else self.lambda_[:, :, start:stop]

    def forward(self) -> torch.Tensor:
        batch, seq_len, h, h_kv, groups, _ = self.shape
        output = self.value.new_empty(batch * h_kv, seq_len * groups, self.value.shape[-1])  # rows (token, head)
        for start, stop, _, maps in self.chunks():
            torch.bmm(maps, self.value[:, :stop], out=output[:, start * groups : stop * groups])
        return output.view(batch, h_kv, seq_len, groups, -1).transpose(1, 2).reshape(batch, seq_len, h, -1)

    def backward(self, grad_output: torch.Tensor):
        """Gradients of (query, key, value, λ) in their own shapes, for grad_output (B, T, h, w)."""
        batch, seq_len, h, h_kv, groups, d = self.shape
        per_token, slabs, length = self.per_token, self.query.shape[0], self.key.shape[1]
        width = self.value.shape[-1]
        grad_output = grad_output.reshape(batch, seq_len, h_kv, groups, width).transpose(1, 2)
        grad_output = grad_output.reshape(batch * h_kv, seq_len * groups, width)  # rows (token, head), as the maps
        # dS_s = scale_s · P_s ∘ (dM − e_s) with scale 1/√d for map 1 and −λ/√d for map 2: the scale goes on the rows
        # of Q (for dK) and of dQ, not on the maps. Version 1: (2, 1, 1), version 2: (B, h_kv, T, G, 2, 1).
        lambda_ = self.lambda_
        if self.version == 1:
            scale = torch.stack((torch.ones_like(lambda_), -lambda_)).view(2, 1, 1) * self.scaling
        else:
            scale = torch.cat((torch.ones_like(lambda_), -lambda_), dim=-1).unsqueeze(-1) * self.scaling
        scaled_query = (self._pairs(self.query, seq_len) * scale).view_as(self.query)
        # Keys and values gather contributions from every chunk: accumulate them in at least fp32
        accumulate = torch.promote_types(self.query.dtype, torch.float32)
        grad_query = torch.empty_like(self.query)
        grad_key = self.key.new_zeros(self.key.shape, dtype=accumulate)
        grad_value = self.value.new_zeros(self.value.shape, dtype=accumulate)
        rowsums = self._pairs(self.query.new_empty(slabs, seq_len * per_token, 1), seq_len)  # e_s of every row
        products = torch.empty_like(self.scores)  # P ∘ dM, then dS
        # One chunk's share of dK or dV, (slabs, seen, d or w): a product into a contiguous buffer, then one addition,
        # is two operations where accumulating into the strided slice directly would be one per slab (and a copy)
        shares = self.query.new_empty(slabs * seq_len * max(d, width))
        for start, stop, probs, maps in self.chunks():
            rows, seen = stop - start, stop
            output_rows = grad_output[:, start * groups : stop * groups]  # (B·h_kv, rows·G, w)
            share = shares[: batch * h_kv * seen * width].view(batch * h_kv, seen, width)
            grad_value[:, :seen] += torch.bmm(maps.transpose(1, 2), output_rows, out=share)  # dV += Mᵀ dO
            torch.bmm(output_rows, self.value[:, :seen].transpose(1, 2), out=maps)  # dM = dO Vᵀ, over M
            grads = products[: probs.numel()].view_as(probs)
            # Both maps of a head against their one dM: (B·h_kv, 2, rows·G, seen) or (B, h_kv, rows, G, 2, seen)
            by_map, grads_by_map = self._pairs(probs, rows), self._pairs(grads, rows)
            torch.mul(by_map, self._pairs(maps, rows, maps=1), out=grads_by_map)
            chunk_rowsums = self._rows(rowsums, start, stop)
            torch.sum(grads_by_map, dim=-1, keepdim=True, out=chunk_rowsums)  # e_s = rowsum(P_s ∘ dM)
            grads_by_map.addcmul_(by_map, chunk_rowsums, value=-1)  # P_s ∘ (dM − e_s)
            chunk = slice(start * per_token, stop * per_token)
            share = shares[: slabs * seen * d].view(slabs, seen, d)
            grad_key[:, :seen] += torch.bmm(grads.transpose(1, 2), scaled_query[:, chunk], out=share)  # dK += dSᵀ Q
            torch.bmm(grads, self.key[:, :seen], out=grad_query[:, chunk])  # dQ = dS K, scaled below
        self._pairs(grad_query, seq_len).mul_(scale)

        grad_lambda = -rowsums.select(self.map_axis, 1)  # dλ = −e_2
        if self.version == 1:
            grad_query = grad_query.view(batch, h_kv, 2, seq_len, groups, d).permute(0, 3, 1, 4, 2, 5)
            grad_key = grad_key.view(batch, h_kv, 2, length, d).transpose(2, 3)  # (B, h_kv, S, 2, d)
            grad_lambda = grad_lambda.sum(dtype=accumulate)
        else:
            grad_query = grad_query.view(batch, h_kv, 1, seq_len, 2 * groups, d).permute(0, 3, 1, 2, 4, 5)
            grad_lambda = grad_lambda.transpose(1, 2).reshape(batch, seq_len, h, 1)  # (B, h_kv, T, G, 1) before
        return (
            grad_query.reshape(batch, seq_len, 2 * h, d),
            grad_key.reshape(batch, h_kv, length, -1).to(self.key.dtype),
            grad_value.view(batch, h_kv, length, width).to(self.value.dtype),
            grad_lambda.to(self.lambda_.dtype),
        )

    def _rows(self, by_map: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The rows of tokens start..stop of a `_pairs` view over all tokens."""
        groups = self.shape[4]
        return by_map[:, :, start * groups : stop * groups] if self.version == 1 else by_map[:, :, start:stop]

    def _pairs(self, rows_by_slab: torch.Tensor, rows: int, maps: int = 2) -> torch.Tensor:
        """(slabs, rows·maps per key map, n) with the map axis made explicit: version 1 (B·h_kv, maps, rows·G, n),
        version 2 (B, h_kv, rows, G, maps, n); maps=1 for a tensor with one row per head (dM)."""
        batch, _, _, h_kv, groups, _ = self.shape
        n = rows_by_slab.shape[-1]
        if self.version == 1:
            return rows_by_slab.view(-1, maps, rows * groups, n)
        return rows_by_slab.view(batch, h_kv, rows, groups, maps, n)
