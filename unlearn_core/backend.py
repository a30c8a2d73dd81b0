"""The seam between the engine and a host (diffusers, ComfyUI, AUTOMATIC1111).

A host hands the engine a ``Backend``: it knows the host's module types, the engine
does not. Everything the engine trains is a set of deltas added to the outputs of
``backend.linear(target)`` through forward hooks, so the host's modules and weights
are never replaced nor written.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from .targets import Target

PREDICTION_TYPES = ("epsilon", "v_prediction")


class UnsupportedModelError(ValueError):
    """The loaded model is not one the engine can work on (e.g. SD1.x or SDXL)."""


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete DDPM schedule as used for training SD2."""

    alphas_cumprod: torch.Tensor  # [T], float32, on CPU
    prediction_type: str

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.alphas_cumprod.ndim != 1 or len(self.alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with one value per timestep")

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1ma = self._coefficients(t, x0)
        return sqrt_a * x0 + sqrt_1ma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output at timestep t."""
        if self.prediction_type == "epsilon":
            return noise
        sqrt_a, sqrt_1ma = self._coefficients(t, x0)
        return sqrt_a * noise - sqrt_1ma * x0


@runtime_checkable
class Backend(Protocol):
    """What a host must provide. Attributes:

    num_layers  transformer layers that feed the conditioning (SD2: 23, the last is skipped)
    width       text-encoder hidden size (SD2: 1024)
    device      where training runs
    schedule    the UNet's NoiseSchedule

    Optional (the contextual method's frozen-layer cache, ``prompt_cache``; without them every step runs the
    whole text encoder): ``encode_capturing(ids, layer) -> (conditioning, input hidden states of that layer)``
    and ``encode_from(hidden, layer) -> conditioning`` (the diffusers backend has them).
    """

    num_layers: int
    width: int
    device: torch.device
    schedule: NoiseSchedule

    def linear(self, target: Target) -> nn.Module:
        """A module whose forward maps x[..., in] to y[..., out] for that projection.

        The engine registers forward hooks on it that add a delta to its output. Its
        ``weight`` (shape [out, in]) is read (shapes, base fingerprint), never written.
        """

    def token_embedding(self) -> nn.Module:
        """The module mapping token ids [B, L] to embeddings [B, L, width]; hooked to splice concept tokens.

        Its ``weight`` [vocab, width] is read (init words, base fingerprint), never written."""

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, L] exactly as the host tokenizes these prompts for conditioning."""

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Conditioning [B, L, width] for token ids, differentiable w.r.t. hooked deltas and spliced vectors."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (already multiplied by the VAE scaling factor) for images [B, 3, H, W] in [0, 1]."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's output for noisy latents x_t at integer timesteps t [B] under conditioning cond."""

    def modules(self) -> list[nn.Module]:
        """Every host module a run passes through (text encoder, UNet, VAE).

        The engine turns their requires_grad off for the run and restores the flags after.
        """


ENCODE_BATCH = 4  # images per VAE pass: the VAE's activations at 512 px take about 1 GB per image in float32


def encode_in_batches(encode, images: torch.Tensor, batch_size: int = ENCODE_BATCH) -> torch.Tensor:
    """``encode`` (images -> latents) applied ``batch_size`` images at a time, so memory does not grow with the
    number of example images."""
    return torch.cat([encode(images[start:start + batch_size]) for start in range(0, len(images), batch_size)])


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on every parameter of module; restore the flags afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def spliced_embeddings(embedding: nn.Module, mask: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """Replace the embedding output at ``mask`` positions [B, L] by ``vectors`` [n, width], in order.

    Each prompt's masked positions take vectors 0..n-1 per occurrence of the token, so
    ``mask.sum(1)`` must be a multiple of n for every row.
    """
    counts = mask.sum(dim=1)
    n = vectors.shape[0]
    if bool((counts % n).any()):
        raise ValueError("every prompt must contain whole copies of the concept token")
    order = torch.cat([torch.arange(int(c), device=mask.device) % n for c in counts]) if len(counts) else None

    def hook(_module, _inputs, output):
        out = output.clone()
        out[mask.to(out.device)] = vectors.to(out.dtype).to(out.device)[order.to(out.device)]
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
