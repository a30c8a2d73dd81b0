"""What the AUTOMATIC1111 tab does, without gradio or A1111: inputs -> engine -> (message, files, image).

The tab (concept_unlearn_tab.py) passes a backend factory, A1111's folders and its shared.state
hooks; tests pass a backend over a tiny model. Every failure becomes one line of text.
"""

import os as _os
import sys as _sys

# A1111 loads every scripts/*.py by file path (alphabetically): make scripts/ and the repo root importable
for _path in (_os.path.dirname(_os.path.abspath(__file__)), _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))):
    if _path not in _sys.path:
        _sys.path.insert(0, _path)

import re
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from unlearn_core.adapter_io import base_fingerprint, write_adapter, write_token
from unlearn_core.config import EraseConfig, LoraConfig, TokenConfig
from unlearn_core.erase import erase
from unlearn_core.images import prepare
from unlearn_core.inversion import learn_token
from unlearn_core.plots import loss_curve
from unlearn_core.train import Cancelled, StepInfo

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class Host:
    """What the logic needs from A1111 (or a test)."""

    backend: Callable[[], object]            # builds the Backend (may raise a one-line error)
    lora_dir: Path                           # models/Lora
    embeddings_dir: Path                     # embeddings/
    interrupted: Callable[[], bool] = lambda: False
    progress: Callable[[StepInfo], None] = lambda info: None
    job: Callable[[str, int], object] = field(default=lambda name, steps: nullcontext())  # shared.state begin/end


@dataclass
class Outcome:
    message: str
    adapter: Path | None = None
    token: Path | None = None
    curve: object = None  # PIL image of the loss curve


def check_name(name: str, what: str) -> str:
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME_RE.match(name):
        raise ValueError(f"{what} name {name!r} must be letters, digits, '_', '-' or '.', e.g. erase_red_square")
    return name


def images_tensor(images, size: int | None) -> torch.Tensor | None:
    """PIL images (gradio gallery / file list) -> [N, 3, size, size]."""
    if not images:
        return None
    from PIL import Image

    tensors = []
    for i, item in enumerate(images):
        image = item if isinstance(item, Image.Image) else Image.open(getattr(item, "name", item))
        tensors.append(prepare(image, size or 512, f"image {i + 1}")[0])
    return torch.stack(tensors)


def _callback(host: Host):
    def callback(info: StepInfo):
        host.progress(info)
        if host.interrupted():
            raise Cancelled(f"interrupted at step {info.step}/{info.total}")
    return callback


def _run(host: Host, steps: int, job_name: str, body):
    try:
        backend = host.backend()
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(host.job(job_name, steps))
            if hasattr(backend, "session"):
                stack.enter_context(backend.session())
            return body(backend)
    except Cancelled as error:
        return Outcome(f"Cancelled: {error}; nothing was saved")
    except (ValueError, FileExistsError, RuntimeError, OSError) as error:
        return Outcome(f"Error: {str(error).splitlines()[0] if str(error) else error.__class__.__name__}")


def erase_concept(host: Host, name: str, concept: str, synonyms: str = "", method: str = "anchor",
                  kind: str = "object", anchor: str = "a photo", preserve: str = "", steps: int = 60,
                  lr: float = 1e-3, preset: str = "fewshot", rank: int = 4, seed: int = 0,
                  images=None, image_size: int | None = None) -> Outcome:
    try:
        name = check_name(name, "adapter")
        path = host.lora_dir / f"{name}.safetensors"
        if path.exists():
            raise FileExistsError(f"{path} already exists: choose another name")
        extra = {"preserve": tuple(p.strip() for p in preserve.split(",") if p.strip())} if preserve.strip() else {}
        config = EraseConfig(concept=concept, synonyms=tuple(s.strip() for s in synonyms.split(",") if s.strip()),
                             method=method, kind=kind, anchor=anchor, steps=int(steps), lr=float(lr), seed=int(seed),
                             lora=LoraConfig(preset=preset, rank=int(rank)), **extra)
    except (ValueError, FileExistsError) as error:
        return Outcome(f"Error: {error}")

    def body(backend):
        size = image_size or getattr(backend, "latent_size", 64) * 8
        result = erase(backend, config, images_tensor(images, size), callback=_callback(host))
        saved = write_adapter(path, result.deltas, base_fingerprint(backend), result.info(), overwrite=False)
        return Outcome(f"Saved {saved.name} ({result.seconds:.0f} s, final loss {result.history[-1]['loss']:.4g}); "
                       f"use <lora:{name}:1> in a prompt", adapter=saved, curve=loss_curve(result.history, name))

    return _run(host, int(steps), "Concept Unlearn: erase", body)


def learn_concept_token(host: Host, token: str, images, n_vectors: int = 1, init_word: str = "object",
                        kind: str = "object", steps: int = 200, lr: float = 5e-3, seed: int = 0,
                        image_size: int | None = None) -> Outcome:
    try:
        config = TokenConfig(token=token, n_vectors=int(n_vectors), init_word=init_word, kind=kind,
                             steps=int(steps), lr=float(lr), seed=int(seed))
        file_name = check_name(token.strip("<>"), "token")
        path = host.embeddings_dir / f"{file_name}.safetensors"
        if path.exists():
            raise FileExistsError(f"{path} already exists: choose another token name")
        if not images:
            raise ValueError("learning a token needs example images of the concept")
    except (ValueError, FileExistsError) as error:
        return Outcome(f"Error: {error}")

    def body(backend):
        size = image_size or getattr(backend, "latent_size", 64) * 8
        result = learn_token(backend, images_tensor(images, size), config, callback=_callback(host))
        saved = write_token(path, result.token, base_fingerprint(backend), overwrite=False)
        return Outcome(f"Saved {saved.name}; write {file_name} in a prompt (A1111 names embeddings by file)",
                       token=saved, curve=loss_curve(result.history, token))

    return _run(host, int(steps), "Concept Unlearn: token", body)
