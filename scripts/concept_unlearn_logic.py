"""What the Concept Unlearn tab does, without gradio or A1111: each button is one function over a ``Host``.

``Host`` carries what the functions need from A1111 (the model, folders, shared.state, flags); the tab builds
it from ``modules.shared`` (see ``a1111_host``), tests build it around a small model. Every function returns
(message, outputs...) and turns expected failures into one line: what is wrong, what to do.
"""

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from unlearn_core import Cancelled, EraseConfig, LoraConfig, TokenConfig, erase, learn_token  # noqa: E402
from unlearn_core.adapter_io import (AdapterFileError, base_fingerprint, read_adapter, read_token,  # noqa: E402
                                     write_adapter, write_token)
from unlearn_core.backend import UnsupportedModelError  # noqa: E402
from unlearn_core.images import ImageInputError, prepare  # noqa: E402
from unlearn_core.plots import loss_curve  # noqa: E402

_here = Path(__file__).with_name("concept_unlearn_a1111_backend.py")
if "concept_unlearn_a1111_backend" not in sys.modules:
    import importlib.util

    _spec = importlib.util.spec_from_file_location("concept_unlearn_a1111_backend", _here)
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["concept_unlearn_a1111_backend"] = _mod
    _spec.loader.exec_module(_mod)
backend_module = sys.modules["concept_unlearn_a1111_backend"]

METHODS = {"Weighted (images + anchor)": "weighted", "Few-shot (images, gradient ascent)": "fewshot",
           "Anchor (no images needed)": "anchor"}
PRESETS = {"Few-shot layers (MLP of all + last attention)": "fewshot", "Last layer": "final", "All layers": "all"}
EXPECTED = (ValueError, UnsupportedModelError, FileExistsError, AdapterFileError, ImageInputError, OSError)


@dataclass
class Host:
    sd_model: Any
    lora_dir: Path
    embeddings_dir: Path
    state: Any = None  # A1111's shared.state (job, interrupted, sampling_step(s), begin/end)
    lowvram: bool = False
    medvram: bool = False
    autocast: Callable | None = None
    tokenizer: Callable | None = None  # only for models without A1111's hijack (tests)
    resolution: int = 512
    overwrite: bool = False
    lr: float | None = None
    extra: dict = field(default_factory=dict)

    def backend(self):
        return backend_module.A1111Backend(self.sd_model, lowvram=self.lowvram, medvram=self.medvram,
                                           tokenizer=self.tokenizer, autocast=self.autocast,
                                           latent_size=self.resolution // 8)


def busy(state) -> str | None:
    """Why the tab must wait, or None. A1111 sets state.job while any job (txt2img, train...) runs."""
    job = getattr(state, "job", "") if state is not None else ""
    if job:
        return f"another job ({job}) is running: wait for it to finish or interrupt it, then press the button again"
    return None


def split_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for line in (text or "").splitlines() for p in line.split(",") if p.strip())


def file_stem(text: str, prefix: str = "unlearn_") -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", (text or "").strip()).strip("._")
    if not stem:
        raise ValueError("name: give the concept (or an adapter name) using letters or digits")
    return stem if stem.startswith(prefix) else prefix + stem


def gallery_images(items, size: int) -> torch.Tensor:
    """Uploaded images (gradio File paths / tempfile objects / dicts / PIL images) -> [N, 3, size, size]."""
    from PIL import Image

    tensors = []
    for item in items or []:
        if isinstance(item, (list, tuple)):
            item = item[0]
        if isinstance(item, dict):
            item = item.get("name") or item.get("path")
        item = getattr(item, "name", item)
        if isinstance(item, (str, Path)):
            try:
                with Image.open(item) as picture:
                    picture.load()
                    tensor, _ = prepare(picture, size, Path(item).name)
            except OSError:
                raise ImageInputError(f"cannot read image {Path(item).name}: upload PNG/JPEG/WebP files") from None
        else:
            tensor, _ = prepare(item, size)
        tensors.append(tensor)
    if not tensors:
        raise ImageInputError("no example images: upload 4-5 images of the concept (or use the Anchor method)")
    return torch.stack(tensors)


def callback_for(state, progress=None, title: str = ""):
    """Engine callback: A1111's progress fields, an optional gradio progress, and A1111's Interrupt button."""
    def callback(info):
        if state is not None:
            state.sampling_steps, state.sampling_step = info.total, info.step
            state.textinfo = f"{title} {info.step}/{info.total}"
        if progress is not None:
            progress((info.step, info.total), desc=title)
        if state is not None and (getattr(state, "interrupted", False) or getattr(state, "skipped", False)):
            raise Cancelled("interrupted")
    return callback


def _job(state, name: str):
    class Job:
        def __enter__(self):
            if state is not None and hasattr(state, "begin"):
                state.begin(job=name)
            return self

        def __exit__(self, *exc):
            if state is not None and hasattr(state, "end"):
                state.end()
            return False
    return Job()


def _guard(fn):
    def run(host: Host, *args, **kwargs):
        waiting = busy(host.state)
        if waiting:
            return (f"Busy: {waiting}",) + (None,) * (run.outputs - 1)
        try:
            with _job(host.state, "concept_unlearn"):
                return fn(host, *args, **kwargs)
        except Cancelled:
            return ("Interrupted: nothing was saved and the model is unchanged.",) + (None,) * (run.outputs - 1)
        except EXPECTED as error:
            return (f"Error: {error}",) + (None,) * (run.outputs - 1)
    run.outputs = 3
    run.__name__ = fn.__name__
    return run


@_guard
def do_erase(host: Host, images, concept: str, synonyms: str, token_file: str, method_label: str,
             preset_label: str, steps: int, rank: int, seed: int, name: str = "", progress=None):
    """Train an erasure adapter and save it to models/Lora. Returns (message, adapter path, loss curve)."""
    method = METHODS.get(method_label, method_label)
    preset = PRESETS.get(preset_label, preset_label)
    extra = {"lr": host.lr} if host.lr else {}
    config = EraseConfig(concept=(concept or "").strip(), synonyms=split_list(synonyms), method=method,
                         steps=int(steps), seed=int(seed), lora=LoraConfig(preset=preset, rank=int(rank)), **extra)
    stem = file_stem(name or config.concept)
    path = Path(host.lora_dir) / f"{stem}.safetensors"
    if path.exists() and not host.overwrite:
        raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another name "
                              "(or allow overwriting in Settings > Concept Unlearn)")
    pictures = gallery_images(images, host.resolution) if images else None
    backend = host.backend()
    token = read_token(token_file, backend) if token_file else None
    with backend.session():
        result = erase(backend, config, images=pictures, token=token,
                       callback=callback_for(host.state, progress, "Erase"))
    write_adapter(path, result.deltas, base_fingerprint(backend), result.info(), overwrite=host.overwrite)
    return (f"Saved {path.name} ({result.seconds:.0f} s): use <lora:{stem}:1> in a prompt (refresh the Lora tab).",
            str(path), loss_curve(result.history, f"erase {config.concept}"))


@_guard
def do_learn_token(host: Host, images, token_name: str, init_word: str, kind: str, steps: int, seed: int,
                   progress=None):
    """Learn a concept token and save it to embeddings/. Returns (message, token path, loss curve)."""
    config = TokenConfig(token=(token_name or "").strip(), init_word=(init_word or "object").strip(),
                         kind=kind or "object", steps=int(steps), seed=int(seed))
    path = Path(host.embeddings_dir) / f"{config.token}.safetensors"
    if path.exists() and not host.overwrite:
        raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another token name")
    pictures = gallery_images(images, host.resolution)
    backend = host.backend()
    with backend.session():
        result = learn_token(backend, pictures, config, callback=callback_for(host.state, progress, "Token"))
    write_token(path, result.token, base_fingerprint(backend), overwrite=host.overwrite)
    return (f"Saved {path.name}: write {config.token} in prompts (A1111 loads embeddings/ automatically).",
            str(path), loss_curve(result.history, f"token {config.token}"))


@_guard
def do_audit(host: Host, images, adapter_file: str, steps: int, seed: int, progress=None):
    """Re-learning attack: learn a token for the images on the base model and on the erased one.

    If the erased model's token loss comes down to the base model's, the concept is recoverable by textual
    inversion (shallow erasure). Returns (message, None, loss curve of the attack on the erased model)."""
    if not adapter_file:
        raise ValueError("adapter: pick an erasure adapter file to audit")
    pictures = gallery_images(images, host.resolution)
    backend = host.backend()
    adapter = read_adapter(adapter_file, backend)
    config = TokenConfig(token="<audit>", steps=int(steps), seed=int(seed))
    with backend.session():
        base = learn_token(backend, pictures, config, callback=callback_for(host.state, progress, "Audit base"))
        with adapter.deltas.to(backend.device).inject(backend.linear):
            attacked = learn_token(backend, pictures, config, callback=callback_for(host.state, progress, "Audit"))
    tail = max(1, len(base.history) // 5)
    b = sum(h["loss"] for h in base.history[-tail:]) / tail
    a = sum(h["loss"] for h in attacked.history[-tail:]) / tail
    verdict = "recoverable (shallow erasure)" if a <= b * 1.05 else "not recovered in this budget"
    return (f"Audit: re-learned token loss {a:.4f} on the erased model vs {b:.4f} on the base model: {verdict}.",
            None, loss_curve(attacked.history, "re-learning attack on the erased model"))


def a1111_host() -> Host:
    """The Host for the running A1111 (imports modules.* here only)."""
    from modules import devices, paths, shared

    lora_dir = getattr(shared.cmd_opts, "lora_dir", None) or str(Path(paths.models_path) / "Lora")
    embeddings_dir = getattr(shared.cmd_opts, "embeddings_dir", None) or str(Path(paths.data_path) / "embeddings")
    opts = shared.opts
    return Host(sd_model=shared.sd_model, lora_dir=Path(lora_dir), embeddings_dir=Path(embeddings_dir),
                state=shared.state, lowvram=bool(shared.cmd_opts.lowvram), medvram=bool(shared.cmd_opts.medvram),
                autocast=devices.autocast, resolution=int(getattr(opts, "concept_unlearn_resolution", 512)),
                overwrite=bool(getattr(opts, "concept_unlearn_overwrite", False)),
                lr=float(getattr(opts, "concept_unlearn_lr", 0) or 0) or None)
