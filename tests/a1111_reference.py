"""What AUTOMATIC1111's Lora extension does with our adapter files on an SD2 (open_clip) text encoder, re-implemented
for the tests (test-only: nothing in scripts/ uses it). Read from (not imported) A1111 extensions-builtin/Lora:

- networks.py ``convert_diffusers_name_to_compvis`` (SD2 branch): kohya ``lora_te_text_model_encoder_layers_N_
  {mlp_fc1, mlp_fc2, self_attn_X_proj}`` -> ``model_transformer_resblocks_N_{mlp_c_fc, mlp_c_proj, attn_X_proj}``;
  ``assign_network_names_to_compvis_modules`` names every module of ``cond_stage_model.wrapped`` by its path with
  '.' -> '_', and ``re_x_proj`` sends the q/k/v names to the block's MultiheadAttention.
- networks.py ``network_apply_weights`` for a LoRA (network_lora: lora_down / lora_up / alpha): the update is
  up @ down * alpha / rank * strength; on a MultiheadAttention the q, k, v updates are concatenated into
  ``in_proj_weight`` and out goes to ``out_proj.weight``, only when all of q, k, v and out are present.

The kohya key parsing is the engine's (``Target.from_kohya``), so a key the engine would not write is refused here.
"""
from __future__ import annotations

import torch

from unlearn_core.targets import ATTENTION, Target

# canonical projection -> the part of A1111's network_layer_name after ``model_transformer_resblocks_N_``
A1111_SUFFIX = {"q": "attn_q_proj", "k": "attn_k_proj", "v": "attn_v_proj", "out": "attn_out_proj",
                "fc1": "mlp_c_fc", "fc2": "mlp_c_proj"}
_MLP = {"fc1": "c_fc", "fc2": "c_proj"}  # open_clip's block.mlp children


def a1111_layer_name(layer: int, proj: str) -> str:
    """The name A1111's Lora extension gives this projection of an SD2 (open_clip) text encoder."""
    return f"model_transformer_resblocks_{layer}_{A1111_SUFFIX[proj]}"


def join_in_proj(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v stacked as open_clip's fused in_proj (the inverse of scripts' split_in_proj)."""
    return torch.cat([q, k, v], dim=0)


def kohya_to_a1111(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group file tensors by the A1111 network-layer name each kohya key converts to (SD2 rules)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        base, _, part = key.partition(".")
        target = Target.from_kohya(base)  # ValueError: not a text-encoder LoRA key
        grouped.setdefault(a1111_layer_name(target.layer, target.proj), {})[part] = value
    return grouped


def merged_weights(resblocks, tensors: dict[str, torch.Tensor], strength: float = 1.0) -> dict[str, torch.Tensor]:
    """What A1111's Lora extension writes into each open_clip weight for these kohya tensors.

    Returns new tensors keyed by parameter path (``N.attn.in_proj_weight``...); the model is not modified."""
    grouped = kohya_to_a1111(tensors)
    result = {}

    def updown(name):
        w = grouped[name]
        down, up = w["lora_down.weight"].float(), w["lora_up.weight"].float()
        alpha = float(w["alpha"]) if "alpha" in w else down.shape[0]
        return (up @ down) * (alpha / down.shape[0]) * strength

    for n, block in enumerate(resblocks):
        names = {p: a1111_layer_name(n, p) for p in A1111_SUFFIX}
        present = [p for p in ATTENTION if names[p] in grouped]
        if present and len(present) < 4:
            raise ValueError(f"layer {n} has attention LoRA for {present} only; A1111 needs q, k, v and out together")
        if present:
            qkv = join_in_proj(*(updown(names[p]) for p in ("q", "k", "v")))
            in_proj = block.attn.in_proj_weight
            result[f"{n}.attn.in_proj_weight"] = in_proj.float() + qkv.to(in_proj.device)
            result[f"{n}.attn.out_proj.weight"] = block.attn.out_proj.weight.float() + updown(names["out"])
        for p, child in _MLP.items():
            if names[p] in grouped:
                linear = getattr(block.mlp, child)
                result[f"{n}.mlp.{child}.weight"] = linear.weight.float() + updown(names[p])
    return result
