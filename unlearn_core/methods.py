"""The one table of erase methods that the CLI, the ComfyUI nodes and the A1111 tab all offer.

Each host passes what its user set (``None``: the method's default) to ``method_config``; a method's fixed
settings (the published presets) win over the user's and are listed in ``ignores`` so hosts can say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import EraseConfig, LoraConfig


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_images: bool
    defaults: dict = field(default_factory=dict)  # EraseConfig fields (and "preset", "rank", "mode" for LoRA)
    fixed: dict = field(default_factory=dict)  # settings the user cannot change (faithful presets)

    @property
    def ignores(self) -> tuple[str, ...]:
        return tuple(sorted(self.fixed))


# the UNet key/value edit needs the contextual method's targets: the hosts' one switch is ignored by the others
_NO_KV = dict(unet_kv_edit=False)
METHODS = {m.name: m for m in (
    Method("contextual", "default: the concept is mapped, inside its contexts (your captions, their cross-overs, "
           "templates), onto its nearest neighbour there (the keep word nearest the concept), pushed as far again "
           "past it (negative guidance 1; or onto the anchor) by a LoRA on the text encoder's "
           "first-layer MLP; neighbours (keep list) and the empty prompt are held. "
           "Then a closed-form edit of the UNet's cross-attention keys/values (unet_kv_edit, on by default) maps the "
           "concept's text directions onto their targets. No UNet pass. Images are optional (their captions help).",
           needs_images=False, defaults=dict(steps=200, lr=1e-3, preset="first", rank=4, unet_kv_edit=True,
                                             negative_guidance=1.0, kv_preserve_weight=10.0,
                                             neighbour_target="nearest")),
    Method("weighted", "seed 000's method: gradient ascent on the example images (bounded by the anchor's loss) "
           "plus the anchor term (the concept predicts what 'a photo' predicts); needs images.",
           needs_images=True, defaults=dict(steps=60, lr=1e-3, preset="fewshot", rank=4), fixed=_NO_KV),
    Method("anchor", "the concept's prompts predict what the anchor prompt predicts (UNet loss); no images needed.",
           needs_images=False, defaults=dict(steps=60, lr=1e-3, preset="fewshot", rank=4), fixed=_NO_KV),
    Method("fewshot", "unbounded gradient ascent on the example images' denoising loss (Fuchi & Takagi 2024's "
           "objective with this tool's LoRA and preserve term); needs images.",
           needs_images=True, defaults=dict(steps=60, lr=1e-3, preset="fewshot", rank=4), fixed=_NO_KV),
    Method("fewshot-paper", "seed 001's preset, Fuchi & Takagi 2024 exactly: full weights of fc1/fc2 of every layer "
           "+ the last layer's self-attention, Adam lr 1e-5 betas (0.9, 0.98), batch 2, 10 steps, no preserve "
           "term; the full delta is saved as a LoRA of the chosen rank by SVD so every host loads it.",
           needs_images=True, defaults=dict(rank=4),
           fixed=dict(method="fewshot", steps=10, lr=1e-5, betas=(0.9, 0.98), batch_size=2, preserve_weight=0.0,
                      preset="fewshot", mode="full", unet_kv_edit=False)),
)}
DEFAULT_METHOD = "contextual"
ROBUST_ROUNDS = 2  # the hosts' "robust" switch: adversarial tokens learned against the adapter and erased too
_LORA_FIELDS = ("preset", "rank", "mode", "last_k", "targets", "alpha", "compress_rank")


def method_config(method: str, concept: str, **settings) -> EraseConfig:
    """An EraseConfig for ``method`` from the user's settings; ``None`` values take the method's defaults.

    LoRA settings (preset, rank, mode, last_k, targets, alpha) may be given flat; the rest are EraseConfig fields."""
    if method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    spec = METHODS[method]
    chosen = spec.defaults | {k: v for k, v in settings.items() if v is not None} | spec.fixed
    lora = {k: chosen.pop(k) for k in _LORA_FIELDS if k in chosen}
    if method == "fewshot-paper":
        lora["compress_rank"] = lora.pop("rank")
    chosen.setdefault("method", method)
    return EraseConfig(concept=concept.strip(), lora=LoraConfig(**lora), **chosen)
