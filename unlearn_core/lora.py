"""Trainable deltas on text-encoder projections, added through forward hooks.

Verbs: ``inject`` (hooks on, in a with-block), ``off`` (compute the frozen model),
``to_kohya`` / ``from_kohya`` (file tensors), ``compress`` (full -> LoRA by randomised SVD).
The hooked modules and their weights are never replaced or written.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .targets import Target

MODES = ("lora", "full")


class Deltas(nn.Module):
    """Additive deltas ``y += delta_W @ x`` on a set of targets.

    lora: delta_W = (alpha / rank) * up @ down, down [rank, in] random, up [out, rank] zero. ``alpha`` is
          per module (``alphas``): trained deltas share one, files may give each module its own (kohya stores
          one ``.alpha`` per module, and every host scales each module by its own).
    full: delta_W is a dense [out, in] tensor starting at zero (training it is full fine-tuning
          of that weight, without touching the weight itself).
    """

    def __init__(self, shapes: dict[Target, tuple[int, int]], mode: str = "lora", rank: int = 4,
                 alpha: float | None = None, seed: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not shapes:
            raise ValueError("no targets: the adapter would have no parameters")
        if mode == "lora" and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.mode = mode
        self.rank = rank if mode == "lora" else 0
        self.alpha = float(alpha if alpha is not None else rank) if mode == "lora" else 0.0
        self.targets = sorted(shapes)
        self.shapes = dict(shapes)
        self.alphas = {_key(t): self.alpha for t in self.targets}
        # set by compress(): relative Frobenius error of the LoRA against the full deltas it approximates
        self.compression_error: dict[str, float] | None = None
        self.active = True
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        self.diff = nn.ParameterDict()
        generator = torch.Generator().manual_seed(seed)
        for t in self.targets:
            out_features, in_features = shapes[t]
            if mode == "lora":
                bound = 1 / math.sqrt(in_features)
                down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
                self.down[_key(t)] = nn.Parameter(down)
                self.up[_key(t)] = nn.Parameter(torch.zeros(out_features, rank))
            else:
                self.diff[_key(t)] = nn.Parameter(torch.zeros(out_features, in_features))

    def scale(self, target: Target) -> float:
        """This module's LoRA scale, its own alpha / rank (1 for full deltas)."""
        return self.alphas[_key(target)] / self.rank if self.mode == "lora" else 1.0

    @property
    def uniform_alpha(self) -> float | None:
        """The alpha every module shares, or None when modules have their own (files made elsewhere)."""
        values = set(self.alphas.values())
        return values.pop() if len(values) == 1 else None

    def delta_weight(self, target: Target) -> torch.Tensor:
        k = _key(target)
        if self.mode == "lora":
            return self.scale(target) * self.up[k] @ self.down[k]
        return self.diff[k]

    def squared_norm(self) -> torch.Tensor:
        """The sum over targets of ||delta_W||_F^2, differentiable (a LoRA's from its rank x rank Gram matrices:
        ||U D||^2 = sum((U^T U) * (D D^T)), without forming delta_W)."""
        total = []
        for t in self.targets:
            k = _key(t)
            if self.mode == "lora":
                up, down = self.up[k], self.down[k]
                total.append(self.scale(t) ** 2 * ((up.t() @ up) * (down @ down.t())).sum())
            else:
                total.append(self.diff[k].pow(2).sum())
        return torch.stack(total).sum()

    def apply(self, target: Target, x: torch.Tensor) -> torch.Tensor:
        """The delta added to the projection's output for input x."""
        k = _key(target)
        x = x.to(torch.float32)
        if self.mode == "lora":
            y = (x @ self.down[k].t()) @ self.up[k].t() * self.scale(target)
        else:
            y = x @ self.diff[k].t()
        return y

    @contextmanager
    def inject(self, linear_for) -> Iterator["Deltas"]:
        """Hook every target's module (``linear_for(target)``, e.g. ``backend.linear``) for the block."""
        handles = []
        try:
            for t in self.targets:
                module = linear_for(t)
                handles.append(module.register_forward_hook(self._hook(t)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, target: Target):
        def hook(_module, inputs, output):
            if not self.active:
                return output
            return output + self.apply(target, inputs[0]).to(output.dtype)
        return hook

    @contextmanager
    def off(self) -> Iterator[None]:
        """Inside the block hooked modules behave like the frozen base model."""
        previous = self.active
        self.active = False
        try:
            yield
        finally:
            self.active = previous

    def to_kohya(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """File tensors: kohya text-encoder keys (``.lora_down/.lora_up/.alpha`` or ``.diff``)."""
        tensors = {}
        for t in self.targets:
            k = _key(t)
            if self.mode == "lora":
                tensors |= kohya_lora_tensors(t.kohya_name, self.down[k], self.up[k], self.alphas[k], dtype)
            else:
                tensors[f"{t.kohya_name}.diff"] = self.diff[k].detach().to(dtype).contiguous().cpu()
        return tensors

    @classmethod
    def from_kohya(cls, tensors: dict[str, torch.Tensor]) -> "Deltas":
        """Rebuild deltas from file tensors (already validated by adapter_io); each module keeps its own alpha."""
        names = {}
        for key in tensors:
            base, _, suffix = key.partition(".")
            names.setdefault(base, {})[suffix] = tensors[key]
        if not names:
            raise ValueError("the adapter holds no tensors")
        parts = next(iter(names.values()))
        if "diff" in parts:
            shapes = {Target.from_kohya(n): tuple(p["diff"].shape) for n, p in names.items()}
            deltas = cls(shapes, mode="full")
            for n, p in names.items():
                deltas.diff[_key(Target.from_kohya(n))].data.copy_(p["diff"].float())
            return deltas
        rank = parts["lora_down.weight"].shape[0]
        shapes = {Target.from_kohya(n): (p["lora_up.weight"].shape[0], p["lora_down.weight"].shape[1])
                  for n, p in names.items()}
        deltas = cls(shapes, mode="lora", rank=rank, alpha=float(parts["alpha"]))
        for n, p in names.items():
            k = _key(Target.from_kohya(n))
            deltas.alphas[k] = float(p["alpha"])
            deltas.down[k].data.copy_(p["lora_down.weight"].float())
            deltas.up[k].data.copy_(p["lora_up.weight"].float())
        deltas.alpha = deltas.alphas[_key(deltas.targets[0])]
        return deltas

    def compress(self, rank: int, oversample: int = 8, power_iterations: int = 4, seed: int = 0) -> "Deltas":
        """A rank-``rank`` LoRA close (in Frobenius norm) to these deltas, on their device.

        A randomised low-rank SVD (``torch.svd_lowrank``: ``rank + oversample`` random directions refined by
        ``power_iterations`` power iterations) costs O(out * in * rank) per module where a full SVD costs
        O(out * in * min(out, in)); its result is measured, not assumed: ``compression_error`` of the returned
        deltas holds the relative error ||delta - LoRA||_F / ||delta||_F overall ("total") and the largest over
        the modules ("max_module"), computed exactly."""
        if rank < 1:
            raise ValueError(f"compress: rank must be >= 1, got {rank}")
        device = next(iter(self.parameters())).device
        lora = Deltas(self.shapes, mode="lora", rank=rank, alpha=rank).to(device)
        residual, energy, module_errors = [], [], []
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # svd_lowrank draws its random directions from the global generator
            for t in self.targets:
                delta = self.delta_weight(t).float()
                r = min(rank, *delta.shape)
                q = min(r + oversample, *delta.shape)
                u, s, v = torch.svd_lowrank(delta, q=q, niter=power_iterations)
                up = torch.zeros(self.shapes[t][0], rank, device=device)
                down = torch.zeros(rank, self.shapes[t][1], device=device)
                up[:, :r] = u[:, :r] * s[:r]
                down[:r] = v[:, :r].t()
                lora.up[_key(t)].copy_(up)
                lora.down[_key(t)].copy_(down)
                diff = (delta - up @ down).pow(2).sum()
                norm = delta.pow(2).sum()
                residual.append(diff)
                energy.append(norm)
                module_errors.append((diff / norm.clamp_min(torch.finfo(norm.dtype).tiny)).sqrt())
        total = (torch.stack(residual).sum() / torch.stack(energy).sum().clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
        total, worst = torch.stack([total, torch.stack(module_errors).max()]).cpu().tolist()  # one transfer
        lora.compression_error = {"total": total, "max_module": worst}
        return lora


def _key(target: Target) -> str:
    return f"{target.layer}_{target.proj}"


def kohya_lora_tensors(key: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One module's kohya LoRA file tensors: ``key.lora_down.weight``, ``key.lora_up.weight``, ``key.alpha``."""
    return {f"{key}.lora_down.weight": down.detach().to(dtype).contiguous().cpu(),
            f"{key}.lora_up.weight": up.detach().to(dtype).contiguous().cpu(),
            f"{key}.alpha": torch.tensor(float(alpha), dtype=dtype)}


def target_shapes(linear_for, targets) -> dict[Target, tuple[int, int]]:
    """[out, in] of each target's weight, read from the host's modules."""
    return {t: tuple(linear_for(t).weight.shape) for t in targets}
