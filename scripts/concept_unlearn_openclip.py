"""open_clip (AUTOMATIC1111's SD2 text encoder) <-> the engine's canonical projection names.

No A1111 or open_clip import here: this works on any module with open_clip's structure, so CI tests it on
a small model of the same shape. Checked against (read, not imported):
- open_clip 2.20 transformer.py: ``transformer.resblocks[N]`` = ResidualAttentionBlock with ``ln_1``,
  ``attn`` (torch nn.MultiheadAttention, fused ``in_proj_weight`` [3E, E] = q; k; v stacked, ``in_proj_bias``,
  ``out_proj``), ``ls_1``, ``ln_2``, ``mlp`` (``c_fc``, gelu, ``c_proj``), ``ls_2``; it calls
  ``self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]`` on [L, N, E] (batch_first=False).
- A1111 extensions-builtin/Lora/lora_convert / networks.py: for SD2, kohya ``lora_te_text_model_encoder_layers_N_
  {mlp_fc1, mlp_fc2, self_attn_X_proj}`` -> ``model_transformer_resblocks_N_{mlp_c_fc, mlp_c_proj, attn_X_proj}``; the
  q/k/v/out names point at the MultiheadAttention, and q/k/v are merged into ``in_proj_weight`` only when all of
  q, k, v and out are present (tests/a1111_reference.py re-implements these rules to check our files against them).

Routing: the engine adds deltas through forward hooks on ``backend.linear(target)``. Inside
``routed_attention(resblocks)`` each MultiheadAttention's forward is replaced (an instance attribute, removed
in ``finally``) by the same computation as torch's ``F.multi_head_attention_forward`` for this call, where the
fused projection is still one ``F.linear`` over ``in_proj_weight`` but its q, k and v thirds and the output
projection each pass through a small proxy module; hooks on the proxies change the outputs. Weights are only
read (the proxies' ``weight`` are views of the same storage), so the model is bit-identical afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = ("q", "k", "v", "out")
OPEN_CLIP_MLP = {"fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}


def split_in_proj(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v views of a fused [3E, ...] in_proj weight or bias (no copy)."""
    if weight.shape[0] % 3:
        raise ValueError(f"in_proj has {weight.shape[0]} rows, not a multiple of 3")
    e = weight.shape[0] // 3
    return weight[:e], weight[e:2 * e], weight[2 * e:]


class _Slice(nn.Module):
    """One of q/k/v of a fused in_proj: forward(x) returns that third of the fused projection of x.

    Called inside the routed attention, it returns the slice computed there (so the stock computation is
    reproduced exactly); hooks see (x,) as input and may change the output. ``weight`` is a view."""

    def __init__(self, attn: nn.MultiheadAttention, index: int):
        super().__init__()
        self._attn = [attn]  # not a submodule
        self.index = index
        self._pending: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return split_in_proj(self._attn[0].in_proj_weight)[self.index]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self._attn[0].in_proj_bias
        return None if b is None else split_in_proj(b)[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None:
            return pending
        return F.linear(x, self.weight, self.bias)


class _OutProj(nn.Module):
    """The attention's output projection as a hookable module (F.linear on out_proj's own weight)."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self._attn = [attn]

    @property
    def weight(self) -> torch.Tensor:
        return self._attn[0].out_proj.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self._attn[0].out_proj.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SplitAttention:
    """Hookable q/k/v/out proxies of one nn.MultiheadAttention and the forward that routes through them."""

    def __init__(self, attn: nn.MultiheadAttention):
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(f"expected torch.nn.MultiheadAttention, got {type(attn).__name__}")
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            raise ValueError("the attention has separate q/k/v weights, not open_clip's fused in_proj")
        if attn.batch_first:
            raise ValueError("batch_first attention is not the open_clip 2.20 layout A1111 uses")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("attention with bias_k / add_zero_attn is not supported")
        self.attn = attn
        self.q, self.k, self.v = (_Slice(attn, i) for i in range(3))
        self.out = _OutProj(attn)

    def proxy(self, proj: str) -> nn.Module:
        return {"q": self.q, "k": self.k, "v": self.v, "out": self.out}[proj]

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """torch's F.multi_head_attention_forward for self-attention without weights, via the proxies."""
        if not (query is key and key is value) or key_padding_mask is not None or need_weights:
            raise RuntimeError("Concept Unlearn's routed attention supports open_clip's self-attention call only "
                               "(need_weights=False, no key_padding_mask)")
        a = self.attn
        tgt_len, bsz, embed_dim = query.shape
        heads = a.num_heads
        head_dim = embed_dim // heads
        proj = F.linear(query, a.in_proj_weight, a.in_proj_bias)
        proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        parts = []
        for i, module in enumerate((self.q, self.k, self.v)):
            module._pending = proj[i]
            parts.append(module(query))
            module._pending = None
        q, k, v = parts
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, tgt_len)
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, tgt_len, head_dim)
        k = k.view(tgt_len, bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, tgt_len, head_dim)
        v = v.view(tgt_len, bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, tgt_len, head_dim)
        dropout = a.dropout if a.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout, is_causal)
        out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
        out = self.out(out)
        return out.view(tgt_len, bsz, out.size(1)), None


def attention_of(block: nn.Module) -> nn.MultiheadAttention:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        raise ValueError(f"{type(block).__name__} has no open_clip attention (.attn MultiheadAttention)")
    return attn


def mlp_linear(block: nn.Module, proj: str) -> nn.Module:
    module = block
    for part in OPEN_CLIP_MLP[proj].split("."):
        module = getattr(module, part)
    return module


@contextmanager
def routed_attention(resblocks, splits: list[SplitAttention] | None = None) -> Iterator[list[SplitAttention]]:
    """For the block, every resblock's attention runs through hookable q/k/v/out proxies; restored after.

    ``splits`` (one per resblock, e.g. made earlier so the engine could hook them) are reused when given."""
    blocks = list(resblocks)
    if splits is None:
        splits = [SplitAttention(attention_of(b)) for b in blocks]
    if len(splits) != len(blocks) or any(s.attn is not attention_of(b) for s, b in zip(splits, blocks)):
        raise ValueError("splits do not belong to these resblocks")
    patched = []
    try:
        for split in splits:
            if "forward" in split.attn.__dict__:
                raise RuntimeError("the text encoder's attention is already patched (another extension?): "
                                   "Concept Unlearn cannot route it; disable that extension and retry")
            split.attn.forward = split.forward
            patched.append(split)
        yield splits
    finally:
        for split in patched:
            split.attn.__dict__.pop("forward", None)

