"""open_clip text transformer (SD2 in AUTOMATIC1111) <-> the engine's canonical names.

No AUTOMATIC1111 or open_clip import: everything works on the module structure that
open_clip's ``TextTransformer`` / ldm's ``FrozenOpenCLIPEmbedder.model`` has:

    model.token_embedding            nn.Embedding
    model.positional_embedding       [77, W]
    model.transformer.resblocks[N]   .ln_1, .attn (nn.MultiheadAttention: fused in_proj_weight [3W, W]
                                      = q;k;v, in_proj_bias, out_proj Linear), .ln_2, .mlp.c_fc, .mlp.c_proj
    model.ln_final
    model.attn_mask                  causal mask [77, 77]

SD2 conditions on the penultimate layer: resblocks 0..22 of 24, then ln_final.

``split_attention(model)`` swaps every resblock's ``attn`` for ``SplitAttention`` for the
duration of a run: the same math, with q, k, v as separate Linear *views* of the fused
in_proj weight (no copies, nothing written), so ``linear(Target(N, "q"))`` is a module whose
output the engine's forward hooks can add a delta to. The originals are restored in finally.
"""
from __future__ import annotations

import os as _os
import sys as _sys

# A1111 loads every scripts/*.py by file path (alphabetically): make scripts/ and the repo root importable
for _path in (_os.path.dirname(_os.path.abspath(__file__)), _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))):
    if _path not in _sys.path:
        _sys.path.insert(0, _path)

import re
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_core.targets import ATTENTION, Target

HF_PREFIX = "text_model."


class LinearView(nn.Module):
    """y = x @ weight.T + bias, where weight/bias are slices (views) of a host tensor; never copied or written."""

    def __init__(self, source: nn.Module, weight_name: str, bias_name: str | None, rows: slice | None):
        super().__init__()
        # plain attributes (not parameters/submodules): the view must not show up as a second owner
        object.__setattr__(self, "_source", source)
        self._weight_name, self._bias_name, self._rows = weight_name, bias_name, rows

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self._source, self._weight_name)
        return w if self._rows is None else w[self._rows]

    @property
    def bias(self) -> torch.Tensor | None:
        if self._bias_name is None:
            return None
        b = getattr(self._source, self._bias_name)
        if b is None:
            return None
        return b if self._rows is None else b[self._rows]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SplitAttention(nn.Module):
    """Stands in for an ``nn.MultiheadAttention`` (self-attention, no dropout at eval) with q/k/v split.

    Same signature as open_clip calls it: ``attn(x, x, x, need_weights=False, attn_mask=mask)[0]``.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not getattr(mha, "_qkv_same_embed_dim", True) or mha.in_proj_weight is None:
            raise ValueError("attention with separate q/k/v weights is not an open_clip SD2 text encoder")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("attention with bias_k/add_zero_attn is not an open_clip SD2 text encoder")
        object.__setattr__(self, "mha", mha)  # not a submodule: the host module keeps owning its weights
        w = mha.embed_dim
        self.q = LinearView(mha, "in_proj_weight", "in_proj_bias", slice(0, w))
        self.k = LinearView(mha, "in_proj_weight", "in_proj_bias", slice(w, 2 * w))
        self.v = LinearView(mha, "in_proj_weight", "in_proj_bias", slice(2 * w, 3 * w))
        object.__setattr__(self, "out", mha.out_proj)
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, key_padding_mask=None,
                **_ignored):
        if key is not None and key is not query or value is not None and value is not query:
            raise ValueError("SplitAttention supports self-attention only (query is key is value)")
        if key_padding_mask is not None:
            raise ValueError("SplitAttention does not support key_padding_mask (open_clip's text encoder has none)")
        x = query if self.batch_first else query.transpose(0, 1)  # [B, L, W]
        b, length, width = x.shape
        h = self.num_heads

        def heads(t):
            return t.reshape(b, length, h, width // h).transpose(1, 2)  # [B, h, L, d]

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        mask = attn_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        dropout = self.mha.dropout if self.mha.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = self.out(y.transpose(1, 2).reshape(b, length, width))
        if not self.batch_first:
            y = y.transpose(0, 1)
        return y, None


def resblocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.resblocks


@contextmanager
def split_attention(model: nn.Module) -> Iterator[list[SplitAttention]]:
    """For the duration: every resblock's ``attn`` is a SplitAttention over the same weights."""
    blocks = resblocks(model)
    originals = [block.attn for block in blocks]
    split = [SplitAttention(attn) for attn in originals]
    try:
        for block, s in zip(blocks, split):
            block._modules["attn"] = s
        yield split
    finally:
        for block, attn in zip(blocks, originals):
            block._modules["attn"] = attn


def linear_for(model: nn.Module, target: Target) -> nn.Module:
    """The module for a canonical target; attention targets need ``split_attention`` to be active."""
    blocks = resblocks(model)
    if target.layer >= len(blocks):
        raise ValueError(f"the text encoder has no layer {target.layer} (it has {len(blocks)})")
    block = blocks[target.layer]
    if target.proj == "fc1":
        return block.mlp.c_fc
    if target.proj == "fc2":
        return block.mlp.c_proj
    if not isinstance(block.attn, SplitAttention):
        if target.proj == "out":
            return block.attn.out_proj
        raise RuntimeError("q/k/v of open_clip's fused attention are only reachable inside split_attention()")
    return getattr(block.attn, target.proj)


def encode(model: nn.Module, ids: torch.Tensor, skip_last: int = 1) -> torch.Tensor:
    """ldm's FrozenOpenCLIPEmbedder.encode_with_transformer for layer="penultimate" (skip_last=1)."""
    x = model.token_embedding(ids) + model.positional_embedding
    blocks = resblocks(model)
    batch_first = getattr(model.transformer, "batch_first", False)
    if not batch_first:
        x = x.permute(1, 0, 2)
    mask = getattr(model, "attn_mask", None)
    for block in list(blocks)[: len(blocks) - skip_last]:
        x = block(x, attn_mask=mask)
    if not batch_first:
        x = x.permute(1, 0, 2)
    return model.ln_final(x)


# ------------------------------------------------------------------- kohya keys and layouts

def kohya_keys_for_block(layer: int) -> dict[str, str]:
    """open_clip module path inside resblocks.N -> kohya LoRA key (q/k/v all map onto attn.in_proj_weight)."""
    return {f"attn.in_proj_weight[{p}]": Target(layer, p).kohya_name for p in ("q", "k", "v")} | {
        "attn.out_proj": Target(layer, "out").kohya_name,
        "mlp.c_fc": Target(layer, "fc1").kohya_name,
        "mlp.c_proj": Target(layer, "fc2").kohya_name,
    }


_OC_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_OC_TO_HF = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_HF_TO_OC = {v: k for k, v in _OC_TO_HF.items()}


def open_clip_to_hf(state: dict[str, torch.Tensor], prefix: str = HF_PREFIX) -> dict[str, torch.Tensor]:
    """open_clip text-transformer state dict -> transformers CLIPTextModel layout (``prefix`` + names:
    ``text_model.`` as in SD2 files and transformers 4.x; transformers 5's CLIPTextModel.state_dict has none).

    Fused in_proj is split exactly (slices); text_projection / logit_scale / attn_mask have no HF
    text-model counterpart and are dropped.
    """
    out = {}
    HF = prefix  # noqa: N806
    for key, value in state.items():
        if key == "token_embedding.weight":
            out[HF + "embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out[HF + "embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out[HF + "final_layer_norm." + key.split(".", 1)[1]] = value
        elif (m := _OC_RE.match(key)):
            n, rest = m.group(1), m.group(2)
            base = f"{HF}encoder.layers.{n}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part
            elif rest in _OC_TO_HF:
                out[base + _OC_TO_HF[rest]] = value
            else:
                raise KeyError(f"unexpected open_clip key {key}")
    return out


_HF_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def hf_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of open_clip_to_hf (q;k;v joined into in_proj in that order); with or without ``text_model.``."""
    out, fused = {}, {}
    HF_PREFIX = ""  # noqa: N806  keys are normalised below
    for key, value in state.items():
        key = key[len("text_model."):] if key.startswith("text_model.") else key
        if key == HF_PREFIX + "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == HF_PREFIX + "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith(HF_PREFIX + "final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == HF_PREFIX + "embeddings.position_ids":
            continue
        elif (m := _HF_RE.match(key)):
            n, rest = m.group(1), m.group(2)
            qkv = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if qkv:
                fused.setdefault((n, qkv.group(2)), {})[qkv.group(1)] = value
            elif rest in _HF_TO_OC:
                out[f"transformer.resblocks.{n}.{_HF_TO_OC[rest]}"] = value
            else:
                raise KeyError(f"unexpected CLIPTextModel key {key}")
        else:
            raise KeyError(f"unexpected CLIPTextModel key {key}")
    for (n, kind), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {n}: {kind} of q/k/v incomplete ({sorted(parts)})")
        out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


__all__ = ["ATTENTION", "LinearView", "SplitAttention", "split_attention", "linear_for", "encode",
           "kohya_keys_for_block", "open_clip_to_hf", "hf_to_open_clip"]
