"""Loss terms as small pure functions of model outputs. Lower is better for every term."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def denoise(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The diffusion training loss: learn to reproduce the images (textual inversion)."""
    return F.mse_loss(prediction.float(), target.float())


def ascent(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the denoising loss: unlearn the images (Fuchi & Takagi 2024)."""
    return -denoise(prediction, target)


def bounded_ascent(prediction: torch.Tensor, target: torch.Tensor, reference_prediction: torch.Tensor) -> torch.Tensor:
    """Ascent that stops where it should: each sample's denoising loss rises until it equals the loss the frozen
    model has with the anchor prompt on the same x_t (a hinge), never beyond into adversarial conditioning."""
    def per_sample(p):
        return (p.float() - target.float()).pow(2).flatten(1).mean(1)
    return F.relu(per_sample(reference_prediction.detach()) - per_sample(prediction)).mean()


def anchor(prediction: torch.Tensor, anchor_prediction: torch.Tensor) -> torch.Tensor:
    """Bounded erase: the concept prompt should predict what the frozen model predicts for the anchor."""
    return F.mse_loss(prediction.float(), anchor_prediction.detach().float())


def preserve(conditioning: torch.Tensor, frozen_conditioning: torch.Tensor) -> torch.Tensor:
    """Keep other prompts' conditioning where the frozen text encoder put it."""
    return F.mse_loss(conditioning.float(), frozen_conditioning.detach().float())


def negative_target(anchor_conditioning: torch.Tensor, concept_conditioning: torch.Tensor,
                    guidance: float) -> torch.Tensor:
    """Where the concept's conditioning should go: the anchor's, pushed ``guidance`` times further from the
    concept (ESD's negative guidance, taken in conditioning space)."""
    return anchor_conditioning - guidance * (concept_conditioning - anchor_conditioning)


def conditioning_match(conditioning: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared distance to a fixed target conditioning, relative to ``scale`` (the conditionings' mean
    square), so its size means the same on every text encoder. Zero exactly when the conditioning is the target."""
    return F.mse_loss(conditioning.float(), target.detach().float()) / scale
