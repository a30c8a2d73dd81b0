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


def anchor(prediction: torch.Tensor, anchor_prediction: torch.Tensor) -> torch.Tensor:
    """Bounded erase: the concept prompt should predict what the frozen model predicts for the anchor."""
    return F.mse_loss(prediction.float(), anchor_prediction.detach().float())


def preserve(conditioning: torch.Tensor, frozen_conditioning: torch.Tensor) -> torch.Tensor:
    """Keep other prompts' conditioning where the frozen text encoder put it."""
    return F.mse_loss(conditioning.float(), frozen_conditioning.detach().float())
