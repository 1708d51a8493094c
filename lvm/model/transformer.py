"""The P6 transformer: K context vectors in, one raw vector and its unit prediction out.

Input Linear(D -> d_model), sinusoidal positions, causal transformer blocks (post-LN), the last
position through Linear -> GELU -> LayerNorm -> Linear(d_model -> D) = raw; pred = normalize(raw).
`block="decoder"` uses decoder layers (causal self-attention plus causal cross-attention over the
embedded context): that is the layout whose size matches the original's ~17.9 M parameters at
D = 768 (encoder layers give ~13.7 M).

Two scales, 1.0 in the original: `input_scale` multiplies the embedded input before the positions
are added (Vaswani et al. use sqrt(d_model): at default init the unit-vector content is ~20x
smaller than the sinusoids, and a short run spends its first thousand steps growing it);
`out_init_scale` scales the output layer's initial weights.

Attention is `ShortAttention`: nn.MultiheadAttention's parameters and state_dict, computed with two
batched matmuls, because PyTorch's fused kernel is slow at a context of five (docs/performance.md).

`context_skip` (off in the original) adds a learned weighted sum of the context vectors to raw,
starting as their mean: the network then learns a correction to the mean-of-context baseline
instead of rebuilding an identity-like map from data, which small real corpora cannot teach
(docs/data.md, "Training on it").
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lvm.runtime.errors import require

Block = Literal["decoder", "encoder"]


class ShortAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention (batch-first; same parameters, init and state_dict) computed as
    softmax(QK^T / sqrt(d) + mask) V with two batched matmuls. Hand-rolled for a measured reason:
    on the CPU, scaled_dot_product_attention takes its flash kernel, whose cost per (window, head)
    dominates at five tokens (the timings: docs/performance.md, "Speed at the original's scale").
    Only what the P6 layers pass is supported: no key padding mask, no attention weights returned."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None or need_weights or key is not value or not self.batch_first:
            raise ValueError("ShortAttention supports batch-first attention without key padding masks or weights, with key is value")
        if is_causal and attn_mask is None:
            raise ValueError("ShortAttention: is_causal needs the causal attn_mask (as nn.MultiheadAttention)")
        b, n, e = query.shape
        h = self.num_heads
        w, bias = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: one projection for Q, K and V
            q, k, v = F.linear(query, w, bias).view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
        else:
            q = F.linear(query, w[:e], bias[:e]).view(b, n, h, e // h).transpose(1, 2)
            k, v = F.linear(key, w[e:], bias[e:]).view(b, key.shape[1], 2, h, e // h).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (e // h) ** -0.5
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training).to(v.dtype)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, e)), None


def short_attention(mha: nn.MultiheadAttention) -> ShortAttention:
    """`mha`'s parameters (the tensors themselves, on any device, meta too) in a ShortAttention,
    built without initialisation: the RNG stream, and so every seeded model, is the one
    nn.MultiheadAttention gives."""
    short = ShortAttention(mha.embed_dim, mha.num_heads, dropout=mha.dropout, batch_first=True, device="meta")
    short.load_state_dict(mha.state_dict(), assign=True)
    return short


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """[length, d_model] fixed sinusoidal position encodings (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return pe


class P6Transformer(nn.Module):
    """Predicts a later chunk's vector from K context vectors ([B, K, D] -> raw, pred [B, D])."""

    def __init__(
        self,
        dim: int,
        d_model: int,
        layers: int,
        heads: int,
        ffn: int,
        dropout: float,
        max_context: int,
        block: Block,
        input_scale: float = 1.0,
        out_init_scale: float = 1.0,
        context_skip: bool = False,
    ) -> None:
        super().__init__()
        require(
            (
                d_model >= 1 and heads >= 1 and d_model % heads == 0,
                f"model.d_model ({d_model}) must be a positive multiple of model.heads ({heads})",
            ),
            (layers >= 1 and ffn >= 1, f"model.layers and model.ffn must be >= 1 (got {layers}, {ffn})"),
            (0 <= dropout < 1, f"model.dropout must be in [0, 1) (got {dropout})"),
            (block in ("decoder", "encoder"), f"model.block must be decoder or encoder (got {block!r})"),
            (math.isfinite(input_scale) and input_scale > 0, f"model.input_scale must be > 0 (got {input_scale})"),
            (math.isfinite(out_init_scale) and out_init_scale > 0, f"model.out_init_scale must be > 0 (got {out_init_scale})"),
        )
        self.dim = dim
        self.block = block
        self.input_scale = input_scale
        self.input = nn.Linear(dim, d_model)
        self.register_buffer("positions", sinusoidal_positions(max_context, d_model), persistent=False)
        self.register_buffer("causal", torch.triu(torch.full((max_context, max_context), float("-inf")), diagonal=1), persistent=False)
        if block == "decoder":
            layer = nn.TransformerDecoderLayer(d_model, heads, ffn, dropout, batch_first=True, norm_first=False)
            layer.multihead_attn = short_attention(layer.multihead_attn)
            layer.self_attn = short_attention(layer.self_attn)
            self.blocks = nn.TransformerDecoder(layer, layers)
        else:
            layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout, batch_first=True, norm_first=False)
            layer.self_attn = short_attention(layer.self_attn)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model), nn.Linear(d_model, dim))
        self.skip_weights = nn.Parameter(torch.full((max_context,), 1.0 / max_context)) if context_skip else None
        if out_init_scale != 1.0:
            # Default init makes |raw| ~ sqrt(d_model / 3) against unit targets; the first steps of
            # raw-MSE then only shrink it. A smaller start lets short runs learn direction at once.
            with torch.no_grad():
                self.head[-1].weight.mul_(out_init_scale)
                self.head[-1].bias.zero_()

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, pred): the un-normalised output and its unit-length version, both [B, D]."""
        k = context.shape[1]
        x = self.input(context) * self.input_scale + self.positions[:k]
        mask = self.causal[:k, :k]
        if self.block == "decoder":
            h = self.blocks(x, x, tgt_mask=mask, memory_mask=mask, tgt_is_causal=True, memory_is_causal=True)
        else:
            h = self.blocks(x, mask=mask, is_causal=True)
        raw = self.head(h[:, -1])
        if self.skip_weights is not None:
            raw = raw + torch.einsum("bkd,k->bd", context, self.skip_weights[-k:])
        raw = raw.float()  # under bf16 autocast too: the loss, metrics and guard statistics stay fp32
        return raw, F.normalize(raw, dim=-1)
