"""The one training loop: optimizer steps over a loss function, with callbacks and guards."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from .backend import Backend, frozen


class Cancelled(Exception):
    """Raised by a callback (or the user) to stop a run; nothing is written, the model is untouched."""


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or infinite."""


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based
    total: int
    losses: dict[str, float]


Callback = Callable[[StepInfo], None]


def plain_backward(terms: dict[str, torch.Tensor], _params: list[torch.nn.Parameter]) -> None:
    terms["loss"].backward()


def conflict_free_backward(terms: dict[str, torch.Tensor], params: list[torch.nn.Parameter]) -> None:
    """Gradient surgery (DoCo): when the erase gradient points against the keep gradient
    (cos < 0), remove its component along the keep gradient, then add both."""
    trainable = [p for p in params if p.requires_grad]
    erase = torch.autograd.grad(terms["erase"], trainable, retain_graph=True, allow_unused=True)
    keep = torch.autograd.grad(terms["keep"], trainable, allow_unused=True)
    erase = [torch.zeros_like(p) if g is None else g for p, g in zip(trainable, erase)]
    keep = [torch.zeros_like(p) if g is None else g for p, g in zip(trainable, keep)]
    dot = sum((e * k).sum() for e, k in zip(erase, keep))
    norm = sum((k * k).sum() for k in keep)
    if dot < 0 and norm > 0:
        erase = [e - dot / norm * k for e, k in zip(erase, keep)]
    for p, e, k in zip(trainable, erase, keep):
        p.grad = e + k


def run(loss_fn: Callable[[int], dict[str, torch.Tensor]], params: Iterable[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer, steps: int, callback: Callback | None = None,
        backward: Callable = plain_backward) -> list[dict[str, float]]:
    """Minimise ``loss_fn(step)["loss"]`` for ``steps`` steps; returns the per-step loss terms.

    ``callback`` runs after every step and may raise (e.g. ``Cancelled``) to stop the run.
    ``backward(terms, params)`` fills the gradients (default: ``terms["loss"].backward()``).
    """
    params = list(params)
    history = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        terms = loss_fn(step)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {float(loss)} at step {step + 1}: lower the learning rate or the erase weight"
            )
        backward(terms, params)
        optimizer.step()
        if not all(torch.isfinite(p).all() for p in params):
            raise TrainingDiverged(f"the weights became NaN/inf at step {step + 1}: lower the learning rate")
        record = {name: float(value.detach()) for name, value in terms.items()}
        history.append(record)
        if callback is not None:
            callback(StepInfo(step + 1, steps, record))
    return history


@contextmanager
def training_context(backend: Backend) -> Iterator[None]:
    """Gradients on (also inside a host's inference mode), host modules frozen and in eval mode; undone on exit."""
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for module in backend.modules():
            stack.enter_context(frozen(module))
            stack.enter_context(evaluating(module))
        yield


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block; every submodule's own mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


class PassCounter:
    """Counts UNet evaluations (the cost unit of every method): forward calls, and the samples they carry."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.calls = 0
        self.samples = 0

    def __call__(self, x_t, t, cond):
        self.calls += 1
        self.samples += x_t.shape[0]
        return self.backend.predict(x_t, t, cond)


def noisy_batch(latents: torch.Tensor, schedule, batch_size: int, generator: torch.Generator,
                index: torch.Tensor | None = None):
    """A seeded training batch: clean latents x0, noise, timesteps t (uniform) and noisy x_t.

    ``index`` picks the latents (when the caller needs to know which, e.g. for per-image captions)."""
    if index is None:
        index = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
    t = torch.randint(0, schedule.num_timesteps, (batch_size,), generator=generator)
    x0 = latents[index.to(latents.device)]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    return x0, noise, t, schedule.add_noise(x0, noise, t)
