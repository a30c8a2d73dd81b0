"""What AUTOMATIC1111's Lora extension does with our adapter files on an SD2 (open_clip) text encoder, re-implemented
for the tests (test-only: nothing in scripts/ uses it). Read from (not imported) A1111 v1.10 extensions-builtin/Lora
(networks.py, network.py, network_lora.py, lyco_helpers.py); tests/test_a1111_real.py runs the real files against
this module when A1111_PATH points at them:

- networks.py ``convert_diffusers_name_to_compvis`` (SD2 branch): ``lora_te_text_model_encoder_layers_(\\d+)_(.+)`` ->
  ``model_transformer_resblocks_N_...`` with mlp_fc1 -> mlp_c_fc, mlp_fc2 -> mlp_c_proj, self_attn -> attn (the
  layer number is any run of Unicode digits, read by ``int``); ``assign_network_names_to_compvis_modules`` names every
  module of ``cond_stage_model.wrapped`` by its path with '.' -> '_', and ``re_x_proj`` sends q/k/v names to the
  block's MultiheadAttention. ``load_network`` drops every key whose name matches no module, silently (a debug log).
- network.py ``calc_scale`` (alpha / dim, per module) and ``finalize_updown``; network_lora.py: lora_up / lora_down are
  cast to ``devices.dtype`` (float16 on a GPU unless --no-half) and multiplied in that dtype (lyco_helpers
  ``rebuild_conventional``), then scaled by alpha / rank and the multiplier; network_full.py: ``diff`` in the
  weight's dtype, scale 1.
- networks.py ``network_apply_weights``: a Linear (c_fc, c_proj) becomes ``(W.to(updown.dtype) + updown).to(W.dtype)``;
  a MultiheadAttention gets ``in_proj_weight += [q; k; v]`` and ``out_proj.weight += out`` only when all four of q, k,
  v and out are in the file: with any missing, nothing is applied to that attention (no error). out_proj alone
  never applies either: MultiheadAttention's forward reads out_proj.weight without calling out_proj.
"""
from __future__ import annotations

import re

import torch

# canonical projection -> the part of A1111's network_layer_name after ``model_transformer_resblocks_N_``
A1111_SUFFIX = {"q": "attn_q_proj", "k": "attn_k_proj", "v": "attn_v_proj", "out": "attn_out_proj",
                "fc1": "mlp_c_fc", "fc2": "mlp_c_proj"}
_MLP = {"fc1": "c_fc", "fc2": "c_proj"}  # open_clip's block.mlp children
_ATTENTION = ("q", "k", "v", "out")
_TE_KEY = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")


def a1111_layer_name(layer: int, proj: str) -> str:
    """The name A1111's Lora extension gives this projection of an SD2 (open_clip) text encoder."""
    return f"model_transformer_resblocks_{layer}_{A1111_SUFFIX[proj]}"


def join_in_proj(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v stacked as open_clip's fused in_proj (the inverse of scripts' split_in_proj)."""
    return torch.cat([q, k, v], dim=0)


def _converted(base: str) -> str | None:
    """convert_diffusers_name_to_compvis for an SD2 text-encoder key (None: not one)."""
    match = _TE_KEY.match(base)
    if not match:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if "mlp_fc1" in rest:
        rest = rest.replace("mlp_fc1", "mlp_c_fc")
    elif "mlp_fc2" in rest:
        rest = rest.replace("mlp_fc2", "mlp_c_proj")
    else:
        rest = rest.replace("self_attn", "attn")
    return f"model_transformer_resblocks_{layer}_{rest}"


def _known_names(layers: int) -> set[str]:
    """The names A1111 can match on an open_clip text encoder with ``layers`` resblocks (the linear layers and the
    q/k/v names that re_x_proj sends to a block's attention)."""
    return {a1111_layer_name(n, p) for n in range(layers) for p in A1111_SUFFIX}


def kohya_to_a1111(tensors: dict[str, torch.Tensor], layers: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Group file tensors by the A1111 network-layer name each key converts to (SD2 rules); keys A1111 would not
    match (on a text encoder of ``layers`` resblocks, when given) are left out, as A1111 drops them."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        base, _, part = key.partition(".")
        name = _converted(base)
        if name is None or not name.endswith(tuple(A1111_SUFFIX.values())) or (
                layers is not None and name not in _known_names(layers)):
            continue
        grouped.setdefault(name, {})[part] = value
    return grouped


def unmatched_keys(tensors: dict[str, torch.Tensor], layers: int) -> list[str]:
    """The keys A1111 drops without a word (they match no module of a ``layers``-block text encoder)."""
    known = _known_names(layers)
    return sorted(key for key in tensors if _converted(key.partition(".")[0]) not in known)


def merged_weights(resblocks, tensors: dict[str, torch.Tensor], strength: float = 1.0,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What A1111's Lora extension writes into each open_clip weight for these kohya tensors.

    ``dtype`` is A1111's ``devices.dtype``, the dtype the update is computed in (float16 on a GPU unless --no-half).
    Returns new tensors keyed by parameter path (``N.attn.in_proj_weight``...), in the weights' own dtype; the model
    is not modified. Attention is updated only in blocks whose file has all of q, k, v and out."""
    grouped = kohya_to_a1111(tensors, len(resblocks))
    result = {}

    def updown(name, weight):
        w = grouped[name]
        if "diff" in w:  # network_full.py: the difference in the weight's own dtype, scale 1
            return w["diff"].to(weight.device, weight.dtype) * strength
        down, up = w["lora_down.weight"].to(dtype), w["lora_up.weight"].to(dtype)
        scale = float(w["alpha"]) / down.shape[0] if "alpha" in w else 1.0
        return ((up @ down) * scale * strength).to(weight.device)

    for n, block in enumerate(resblocks):
        names = {p: a1111_layer_name(n, p) for p in A1111_SUFFIX}
        if all(names[p] in grouped for p in _ATTENTION):
            in_proj, out_proj = block.attn.in_proj_weight.detach(), block.attn.out_proj.weight.detach()
            qkv = join_in_proj(*(updown(names[p], in_proj) for p in ("q", "k", "v")))
            # in place in the weight's dtype: in_proj_weight += updown_qkv
            result[f"{n}.attn.in_proj_weight"] = in_proj.clone().add_(qkv)
            result[f"{n}.attn.out_proj.weight"] = out_proj.clone().add_(updown(names["out"], out_proj))
        for p, child in _MLP.items():
            if names[p] in grouped:
                weight = getattr(block.mlp, child).weight.detach()
                delta = updown(names[p], weight)
                result[f"{n}.mlp.{child}.weight"] = (weight.to(delta.dtype) + delta).to(weight.dtype)
    return result
