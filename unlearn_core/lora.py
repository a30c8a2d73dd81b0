"""Trainable deltas on text-encoder projections, added through forward hooks.

Verbs: ``inject`` (hooks on, in a with-block), ``off`` (compute the frozen model),
``to_kohya`` / ``from_kohya`` (file tensors), ``compress`` (full -> LoRA by SVD).
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

    lora: delta_W = (alpha / rank) * up @ down, down [rank, in] random, up [out, rank] zero.
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

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank if self.mode == "lora" else 1.0

    def delta_weight(self, target: Target) -> torch.Tensor:
        k = _key(target)
        if self.mode == "lora":
            return self.lora_scale * self.up[k] @ self.down[k]
        return self.diff[k]

    def apply(self, target: Target, x: torch.Tensor) -> torch.Tensor:
        """The delta added to the projection's output for input x."""
        k = _key(target)
        x = x.to(torch.float32)
        if self.mode == "lora":
            y = (x @ self.down[k].t()) @ self.up[k].t() * self.lora_scale
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
                tensors[f"{t.kohya_name}.lora_down.weight"] = self.down[k].detach().to(dtype).contiguous().cpu()
                tensors[f"{t.kohya_name}.lora_up.weight"] = self.up[k].detach().to(dtype).contiguous().cpu()
                tensors[f"{t.kohya_name}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
            else:
                tensors[f"{t.kohya_name}.diff"] = self.diff[k].detach().to(dtype).contiguous().cpu()
        return tensors

    @classmethod
    def from_kohya(cls, tensors: dict[str, torch.Tensor]) -> "Deltas":
        """Rebuild deltas from file tensors (already validated by adapter_io)."""
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
        alpha = float(parts["alpha"])
        shapes = {Target.from_kohya(n): (p["lora_up.weight"].shape[0], p["lora_down.weight"].shape[1])
                  for n, p in names.items()}
        deltas = cls(shapes, mode="lora", rank=rank, alpha=alpha)
        for n, p in names.items():
            k = _key(Target.from_kohya(n))
            deltas.down[k].data.copy_(p["lora_down.weight"].float())
            deltas.up[k].data.copy_(p["lora_up.weight"].float())
        return deltas

    def compress(self, rank: int) -> "Deltas":
        """A LoRA of the given rank closest (in Frobenius norm) to these deltas, by truncated SVD."""
        lora = Deltas(self.shapes, mode="lora", rank=rank, alpha=rank)
        with torch.no_grad():
            for t in self.targets:
                u, s, vh = torch.linalg.svd(self.delta_weight(t).float(), full_matrices=False)
                r = min(rank, s.numel())
                up = torch.zeros(self.shapes[t][0], rank)
                down = torch.zeros(rank, self.shapes[t][1])
                up[:, :r] = u[:, :r] * s[:r]
                down[:r] = vh[:r]
                lora.up[_key(t)].copy_(up)
                lora.down[_key(t)].copy_(down)
        return lora


def _key(target: Target) -> str:
    return f"{target.layer}_{target.proj}"


def target_shapes(linear_for, targets) -> dict[Target, tuple[int, int]]:
    """[out, in] of each target's weight, read from the host's modules."""
    return {t: tuple(linear_for(t).weight.shape) for t in targets}
