"""Small bridges to ComfyUI services (imported lazily, so node declarations load without ComfyUI)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..unlearn_core.adapter_io import NAMESPACE, adapter_metadata, parse_fingerprint
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

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        # exactly what the saved file holds (write_adapter: float16; a stack: its own float32 tensors), so applying
        # this equals loading the saved file
        if self.stored is not None:
            return self.stored.tensors
        return self.deltas.to_kohya(torch.float16)

    def as_stored(self) -> StoredAdapter:
        """The file contents Save Erasure Adapter writes for this adapter (what a stack keeps of it)."""
        if self.stored is not None:
            return self.stored
        return StoredAdapter(self.kohya_tensors(), adapter_metadata(self.deltas, self.fingerprint, self.info))

    @classmethod
    def from_stored(cls, stored: StoredAdapter, source: str = "") -> "ErasureAdapter":
        """A stack (or the one adapter a stack came back to) on a wire; Save writes it as it is."""
        prefix = NAMESPACE + "."
        info = {k[len(prefix):]: _decoded(v) for k, v in stored.metadata.items()
                if k.startswith(prefix) and k != prefix + "base_fingerprint"}
        return cls(Deltas.from_kohya(stored.tensors), parse_fingerprint(stored.info("base_fingerprint")), info,
                   source=source, stored=stored)

    def with_info(self, **extra) -> "ErasureAdapter":
        return replace(self, info={**self.info, **extra})

    def summary(self) -> dict:
        keep = ("concept", "synonyms", "token", "method", "steps", "targets", "final_losses", "seconds", "audit")
        out = {k: self.info[k] for k in keep if k in self.info}
        out["rank"] = self.deltas.rank if self.deltas.mode == "lora" else "full"
        out["modules"] = len(self.deltas.targets)
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


def progress_callback(node_id, title: str):
    """Engine callback: ComfyUI's progress bar, live losses to the front end, and ComfyUI's interrupt."""
    import comfy.model_management
    import comfy.utils

    state = {"bar": None}

    def callback(info):
        if state["bar"] is None:
            state["bar"] = comfy.utils.ProgressBar(info.total, node_id=node_id)
        state["bar"].update_absolute(info.step, info.total)
        send(PROGRESS_EVENT, {"node": str(node_id) if node_id is not None else None, "title": title,
                              "step": info.step, "total": info.total,
                              "losses": {k: (v if math.isfinite(v) else None) for k, v in info.losses.items()}})
        comfy.model_management.throw_exception_if_processing_interrupted()

    return callback


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
