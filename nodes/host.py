"""Small bridges to ComfyUI services (imported lazily, so node declarations load without ComfyUI)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..unlearn_core.adapter_io import NAMESPACE, adapter_metadata, parse_fingerprint, split_unet
from ..unlearn_core.kv_edit import KVDeltas
from ..unlearn_core.lora import Deltas
from ..unlearn_core.stacking import StoredAdapter

PROGRESS_EVENT = "concept_unlearn.progress"


@dataclass(frozen=True)
class ErasureAdapter:
    """What flows on an ERASURE_ADAPTER wire: the deltas, the base fingerprint and what the file records."""

    deltas: Deltas
    fingerprint: dict | None
    info: dict = field(default_factory=dict)
    source: str = ""  # file name when loaded from disk
    stored: StoredAdapter | None = None  # a stack's exact file contents: applied and saved as they are
    unet: KVDeltas | None = None  # the UNet cross-attention key/value edit (lora_unet_* keys), when there is one

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        # exactly what the saved file holds (write_adapter: float16; a stack: its own float32 tensors), so applying
        # this equals loading the saved file
        if self.stored is not None:
            return self.stored.tensors
        return self.deltas.to_kohya(torch.float16) | (self.unet.to_kohya(torch.float16) if self.unet else {})

    @property
    def edits_unet(self) -> bool:
        """The file has UNet keys: applying it patches the MODEL as well as the CLIP."""
        if self.stored is not None:
            return any(k.startswith("lora_unet_") for k in self.stored.tensors)
        return self.unet is not None

    def as_stored(self) -> StoredAdapter:
        """The file contents Save Erasure Adapter writes for this adapter (what a stack keeps of it)."""
        if self.stored is not None:
            return self.stored
        return StoredAdapter(self.kohya_tensors(), adapter_metadata(self.deltas, self.fingerprint, self.info,
                                                                    self.unet))

    @classmethod
    def from_stored(cls, stored: StoredAdapter, source: str = "") -> "ErasureAdapter":
        """A stack (or the one adapter a stack came back to) on a wire; Save writes it as it is."""
        prefix = NAMESPACE + "."
        info = {k[len(prefix):]: _decoded(v) for k, v in stored.metadata.items()
                if k.startswith(prefix) and k != prefix + "base_fingerprint"}
        text, unet = split_unet(stored.tensors)
        return cls(Deltas.from_kohya(text), parse_fingerprint(stored.info("base_fingerprint")), info,
                   source=source, stored=stored, unet=KVDeltas.from_kohya(unet) if unet else None)

    def with_info(self, **extra) -> "ErasureAdapter":
        return replace(self, info={**self.info, **extra})

    def summary(self) -> dict:
        keep = ("concept", "synonyms", "token", "method", "steps", "targets", "final_losses", "seconds", "audit")
        out = {k: self.info[k] for k in keep if k in self.info}
        out["rank"] = self.deltas.rank if self.deltas.mode == "lora" else "full"
        out["modules"] = len(self.deltas.targets)
        if self.unet is not None:
            out["unet_modules"] = len(self.unet.names)
        if self.source:
            out["file"] = self.source
        return out


def _decoded(value: str):
    import json

    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # plain strings (concept, method) are stored as they are
        return value


def images_to_engine(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> [B, 3, r, r]: centre-cropped square, resized (0 = keep size)."""
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("no example images: connect a batch of 1 or more images of the concept (e.g. Load Image)")
    x = images.detach().float()[..., :3].permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top:top + side, left:left + side]
    size = resolution or max(8, side // 8 * 8)
    if size != side:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).contiguous()


def pil_to_image(picture) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE [1, H, W, 3]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def image_to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def split_list(text: str) -> tuple[str, ...]:
    """Comma- or newline-separated entries, stripped, empties dropped."""
    parts = [p.strip() for line in (text or "").splitlines() for p in line.split(",")]
    return tuple(p for p in parts if p)


def split_lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())


def _interrupt_check():
    import comfy.model_management

    return comfy.model_management.throw_exception_if_processing_interrupted


def duration(seconds: float) -> str:
    """3 s, 4 min 10 s, 1 h 31 min."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class Estimate:
    """What the rest of a run will cost, from the seconds its steps measured so far."""

    def __init__(self, clock=None):
        import time

        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.first = None  # seconds of step 1 (setup included)
        self.after_first = None  # clock at step 1

    def update(self, step: int, total: int) -> float:
        """Seconds left after ``step`` of ``total`` (mean of the steps after the first once there are some)."""
        now = self.clock()
        if self.first is None:
            self.first, self.after_first = now - self.start, now
        per_step = self.first if step <= 1 else (now - self.after_first) / (step - 1)
        return per_step * (total - step)


def progress_callback(node_id, title: str, check=None, log=None, clock=None):
    """Engine callback: ComfyUI's progress bar, live losses to the front end, ComfyUI's interrupt, and after the
    first step a line saying what the whole run will cost (steps x measured seconds per step)."""
    import comfy.utils

    check = check or _interrupt_check()
    log = log or _log
    state = {"bar": None, "estimate": Estimate(clock)}

    def callback(info):
        if state["bar"] is None:
            state["bar"] = comfy.utils.ProgressBar(info.total, node_id=node_id)
        left = state["estimate"].update(info.step, info.total)
        if info.step == 1 and info.total > 1:
            first = state["estimate"].first
            log(f"{title}: step 1 of {info.total} took {duration(first)} (setup included); the run will take "
                f"about {duration(first + left)} in all (Cancel stops it)")
        state["bar"].update_absolute(info.step, info.total)
        send(PROGRESS_EVENT, {"node": str(node_id) if node_id is not None else None, "title": title,
                              "step": info.step, "total": info.total, "seconds_left": round(left, 1),
                              "losses": {k: (v if math.isfinite(v) else None) for k, v in info.losses.items()}})
        check()

    return callback


def _log(message: str) -> None:
    import logging

    logging.getLogger("concept_unlearn").info(message)  # ComfyUI's console shows INFO lines


class Progress:
    """One ComfyUI progress bar over several phases (samplings, a token re-learning); every update also
    checks ComfyUI's interrupt, so Cancel stops the node within one sampling step."""

    def __init__(self, total: int, node_id, check=None):
        import comfy.utils

        self.total, self.done = max(1, int(total)), 0
        self.bar = comfy.utils.ProgressBar(self.total, node_id=node_id)
        self.check = check or _interrupt_check()

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        self.bar.update_absolute(self.done, self.total)
        self.check()

    def sampler_callback(self):
        """For comfy.sample.sample(callback=...): called once per sampling step."""
        return lambda step, x0, x, total_steps: self.advance()

    def engine_callback(self):
        """For the engine's training loops: one count per optimisation step."""
        return lambda info: self.advance()


class Interruptible:
    """The engine's Backend with ComfyUI's interrupt checked before every UNet and text-encoder pass, so Cancel
    lands between the passes of a training step (one step of a UNet-loss method can take a minute on a CPU)."""

    def __init__(self, backend, check=None):
        self._backend = backend
        self._check = check or _interrupt_check()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def predict(self, x_t, t, cond):
        self._check()
        return self._backend.predict(x_t, t, cond)

    def encode_ids(self, ids):
        self._check()
        return self._backend.encode_ids(ids)

    def encode_images(self, images):
        self._check()
        return self._backend.encode_images(images)


def on_cpu() -> bool:
    """True when ComfyUI runs on the CPU (its --cpu flag or no GPU); False outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    try:
        return mm.get_torch_device().type == "cpu"
    except Exception:  # a broken GPU setup: ComfyUI reports that itself
        return False


def display_lines(info: dict) -> list[str]:
    """The text the front end draws under a node, one line per entry (the front end only bounds and draws it)."""
    lines = []
    for key in ("concept", "synonyms", "token", "method", "steps", "rank", "modules", "unet_modules", "strength",
                "seconds", "seconds_per_step", "final_loss", "warnings"):
        value = info.get(key)
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        lines.append(f"{key.replace('_', ' ')}: {_number(value)}")
    losses = info.get("final_losses")
    if isinstance(losses, dict) and losses:
        terms = dict(losses)
        total = terms.pop("loss", None)
        parts = ", ".join(f"{name} {_number(value)}" for name, value in terms.items())
        if total is None:
            lines.append(f"final losses: {parts}")
        else:
            lines.append(f"final loss: {_number(total)}" + (f" ({parts})" if parts else ""))
    audit = info.get("audit")
    if isinstance(audit, dict):
        for prompt, shift in (audit.get("conditioning_shift") or {}).items():
            lines.append(f"shift {prompt}: {_number(shift)}")
        if audit.get("attack"):
            attack = audit["attack"]
            lines.append(f"attack: {attack.get('steps')} steps, final loss {_number(attack.get('final_loss'))}"
                         if isinstance(attack, dict) else f"attack: {attack}")
    for key in ("removed", "saved", "file"):
        if info.get(key):
            lines.append(f"{key}: {info[key]}")
    return lines


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # running outside the ComfyUI server (scripts, tests)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data)


def models_folder(kind: str) -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths(kind)[0])


def file_list(kind: str) -> list[str]:
    try:
        import folder_paths
    except ImportError:
        return []
    return [name for name in folder_paths.get_filename_list(kind) if name.endswith(".safetensors")]


def full_path(kind: str, name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise(kind, name)


def apply_to_clip(clip, adapter: ErasureAdapter, strength: float):
    """A patched clone of the CLIP, through ComfyUI's own LoRA loading (as LoraLoader does)."""
    import comfy.sd

    _, patched = comfy.sd.load_lora_for_models(None, clip, adapter.kohya_tensors(), 0.0, strength)
    return patched


def apply_to_models(model, clip, adapter: ErasureAdapter, strength: float):
    """(MODEL, CLIP): patched clones through ComfyUI's own LoRA loading (as LoraLoader does, at one strength for
    both). The UNet keys patch the MODEL's cross-attention to_k/to_v; ``model`` is None: only the CLIP (an adapter
    that edits the UNet then needs the MODEL: half of its erasure would be silently dropped)."""
    if model is None:
        if adapter.edits_unet:
            raise ValueError("this adapter also edits the UNet's cross-attention (unet_kv_edit): connect the MODEL "
                             "input and use the MODEL output, or the erasure is only partly applied")
        return None, apply_to_clip(clip, adapter, strength)
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, adapter.kohya_tensors(), strength, strength)
