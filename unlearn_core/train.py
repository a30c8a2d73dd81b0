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
    # decided on the device (no host read): the projection coefficient is 0 unless the gradients conflict
    coefficient = torch.where((dot < 0) & (norm > 0), dot / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                              torch.zeros_like(dot))
    for p, e, k in zip(trainable, erase, keep):
        p.grad = e - coefficient * k + k


def run(loss_fn: Callable[[int], dict[str, torch.Tensor]], params: Iterable[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer, steps: int, callback: Callback | None = None,
        backward: Callable = plain_backward, scaler: "torch.amp.GradScaler | None" = None) -> list[dict[str, float]]:
    """Minimise ``loss_fn(step)["loss"]`` for ``steps`` steps; returns the per-step loss terms.

    ``callback`` runs after every step and may raise (e.g. ``Cancelled``) to stop the run.
    ``backward(terms, params)`` fills the gradients (default: ``terms["loss"].backward()``).
    ``scaler`` (see ``grad_scaler``) scales the loss terms before backward and unscales the gradients before the
    optimizer step, which it skips when they overflowed (float16 host weights).

    The device is read once per step: the loss terms and the finiteness of the loss and of every parameter travel
    to the host in one transfer, after the optimizer step (a non-finite loss is still reported as such; the
    parameters it spoiled are the run's own and are discarded with the exception).
    """
    params = list(params)
    history = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        terms = loss_fn(step)
        loss = terms["loss"]
        if scaler is None:
            backward(terms, params)
            optimizer.step()
        else:
            backward({name: scaler.scale(value) for name, value in terms.items()}, params)
            scaler.step(optimizer)
            scaler.update()
        values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
        finite = torch.stack([torch.isfinite(loss.detach()).all()] + [torch.isfinite(p.detach()).all() for p in params])
        host = torch.cat([values, finite.float().to(values.device)]).cpu().tolist()  # the step's one device -> host transfer
        record = dict(zip(terms, host[:len(values)]))
        loss_finite, params_finite = host[len(values)], host[len(values) + 1:]
        if not loss_finite:
            raise TrainingDiverged(
                f"the loss became {record['loss']} at step {step + 1}: lower the learning rate or the erase weight"
            )
        if not all(params_finite):
            raise TrainingDiverged(f"the weights became NaN/inf at step {step + 1}: lower the learning rate")
        history.append(record)
        if callback is not None:
            callback(StepInfo(step + 1, steps, record))
    return history


def grad_scaler(backend: Backend) -> "torch.amp.GradScaler | None":
    """A loss scaler when the host's weights are float16, else None.

    Gradients flowing back through float16 activations flush to zero below 6e-8 (and overflow above 65504);
    A1111's own textual-inversion trainer scales the loss for this reason. bfloat16 has float32's exponent range
    and needs no scaling. torch < 2.3 (A1111 v1.10's default venv) has a scaler for CUDA only.
    """
    half = any(p.dtype == torch.float16 for module in backend.modules() for p in module.parameters())
    if not half:
        return None
    device = torch.device(backend.device).type
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device)
    return torch.cuda.amp.GradScaler() if device == "cuda" else None


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
