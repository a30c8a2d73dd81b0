"""Canonical names for text-encoder projections and their kohya file keys.

A target is one linear projection of one transformer layer of the SD2 text
encoder: ``Target(layer=5, proj="fc1")``. Every host maps these names onto its
own modules; every file uses the kohya key derived from them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ATTENTION = ("q", "k", "v", "out")
MLP = ("fc1", "fc2")
PROJECTIONS = ATTENTION + MLP

_KOHYA_SUFFIX = {
    "q": "self_attn_q_proj",
    "k": "self_attn_k_proj",
    "v": "self_attn_v_proj",
    "out": "self_attn_out_proj",
    "fc1": "mlp_fc1",
    "fc2": "mlp_fc2",
}
_PROJ_FROM_SUFFIX = {suffix: proj for proj, suffix in _KOHYA_SUFFIX.items()}
# layer numbers as hosts write and match them: ASCII decimal, no leading zeros (diffusers skips "layers_00_" and
# "layers_\u0663_", which int() would read as 0 and 3); \Z, not $: "$" also matches before a final newline
_LAYER_NUMBER = r"(0|[1-9][0-9]*)"
_KOHYA_RE = re.compile(r"^lora_te_text_model_encoder_layers_" + _LAYER_NUMBER + "_(" + "|".join(_PROJ_FROM_SUFFIX)
                       + r")\Z")

PRESETS = ("fewshot", "first", "final", "all")


@dataclass(frozen=True, order=True)
class Target:
    layer: int
    proj: str

    def __post_init__(self):
        if self.proj not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.proj!r}; expected one of {', '.join(PROJECTIONS)}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")

    @property
    def kohya_name(self) -> str:
        return f"lora_te_text_model_encoder_layers_{self.layer}_{_KOHYA_SUFFIX[self.proj]}"

    def __str__(self) -> str:
        return f"{self.layer}.{self.proj}"

    @classmethod
    def parse(cls, text: str) -> "Target":
        """Parse ``"LAYER.PROJ"`` as written on the command line, e.g. ``"22.q"``."""
        layer, _, proj = text.strip().partition(".")
        if not re.fullmatch(_LAYER_NUMBER, layer) or not proj:
            raise ValueError(f"target {text!r} is not of the form LAYER.PROJ (e.g. 22.fc1)")
        return cls(int(layer), proj)

    @classmethod
    def from_kohya(cls, name: str) -> "Target":
        match = _KOHYA_RE.match(name)
        if not match:
            raise ValueError(f"{name!r} is not a text-encoder LoRA key of the form lora_te_text_model_encoder_layers_N_<proj>")
        return cls(int(match.group(1)), _PROJ_FROM_SUFFIX[match.group(2)])


def complete_attention(targets) -> list[Target]:
    """Add the missing q/k/v/out of every layer that has any attention target.

    A1111 applies attention LoRA to its fused in_proj only when all of q, k, v are present.
    """
    result = set(targets)
    for t in list(result):
        if t.proj in ATTENTION:
            result.update(Target(t.layer, p) for p in ATTENTION)
    return sorted(result)


def resolve_targets(preset: str, num_layers: int, last_k: int = 1, explicit=()) -> list[Target]:
    """Targets for a preset, on a text encoder whose conditioning uses ``num_layers`` layers.

    fewshot: mlp fc1/fc2 of every layer + self-attention of the last layer (Fuchi & Takagi 2024).
    first:   mlp fc1/fc2 of the first layer, where a word's position still holds little but the word itself (the
             contextual method's default: on the benchmark's dev split it kept more neighbours than fewshot at
             the same erasure, bench/RESULTS.md 3.1).
    final:   every projection of the last ``last_k`` layers.
    all:     every projection of every layer.
    explicit targets (``Target`` or "LAYER.PROJ") replace the preset when given.
    """
    if explicit:
        targets = [t if isinstance(t, Target) else Target.parse(t) for t in explicit]
    elif preset == "fewshot":
        targets = [Target(n, p) for n in range(num_layers) for p in MLP]
        targets += [Target(num_layers - 1, p) for p in ATTENTION]
    elif preset == "first":
        targets = [Target(0, p) for p in MLP]
    elif preset == "final":
        if not 1 <= last_k <= num_layers:
            raise ValueError(f"last_k must be between 1 and {num_layers}, got {last_k}")
        targets = [Target(n, p) for n in range(num_layers - last_k, num_layers) for p in PROJECTIONS]
    elif preset == "all":
        targets = [Target(n, p) for n in range(num_layers) for p in PROJECTIONS]
    else:
        raise ValueError(f"unknown target preset {preset!r}; expected one of {', '.join(PRESETS)}")
    for t in targets:
        if t.layer >= num_layers:
            raise ValueError(f"target {t} is outside the text encoder's conditioning layers 0..{num_layers - 1}")
    return complete_attention(targets)
