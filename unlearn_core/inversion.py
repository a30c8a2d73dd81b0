"""Learn Concept Token: textual inversion of a new token from a few images."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import objectives
from .backend import Backend
from .config import TokenConfig
from .prompts import sample_prompts
from .tokens import ConceptToken, encode, init_vectors
from .train import Callback, PassCounter, grad_scaler, noisy_batch, run, training_context


@dataclass
class TokenResult:
    token: ConceptToken
    history: list[dict[str, float]]
    seconds: float
    unet_calls: int
    unet_samples: int


def encode_latents(backend: Backend, images: torch.Tensor) -> torch.Tensor:
    if images is None or len(images) == 0:
        raise ValueError("no example images: give 1 or more images of the concept")
    with torch.no_grad():
        return backend.encode_images(images.to(backend.device)).detach()


def learn_token(backend: Backend, images: torch.Tensor, config: TokenConfig,
                callback: Callback | None = None) -> TokenResult:
    """Learn ``config.n_vectors`` vectors for ``config.token`` so the frozen model reproduces the images."""
    if config.captions and (images is None or len(config.captions) != len(images)):
        raise ValueError(f"captions: got {len(config.captions)} for {0 if images is None else len(images)} images; "
                         "give one caption per image (or none to use the templates)")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    counter = PassCounter(backend)
    with training_context(backend):
        latents = encode_latents(backend, images)
        vectors = torch.nn.Parameter(init_vectors(backend, config.init_word, config.n_vectors).to(backend.device))
        token = ConceptToken(config.token, vectors)

        def loss_fn(_step):
            if config.captions:
                index = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
                x0, noise, t, x_t = noisy_batch(latents, backend.schedule, config.batch_size, generator, index)
                prompts = [config.captions[i].format(config.token) for i in index.tolist()]
            else:
                x0, noise, t, x_t = noisy_batch(latents, backend.schedule, config.batch_size, generator)
                prompts = sample_prompts([config.token], config.kind, config.batch_size, generator)
            prediction = counter(x_t, t, encode(backend, prompts, token))
            return {"loss": objectives.denoise(prediction, backend.schedule.target(x0, noise, t))}

        optimizer = torch.optim.AdamW([vectors], lr=config.lr, weight_decay=0.0)
        history = run(loss_fn, [vectors], optimizer, config.steps, callback, scaler=grad_scaler(backend))
    learned = ConceptToken(config.token, vectors.detach().float().cpu().clone())
    return TokenResult(learned, history, time.perf_counter() - start, counter.calls, counter.samples)
