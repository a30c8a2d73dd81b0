"""Example images: read, convert to RGB, centre-crop and resize, with notes on what was changed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageInputError(ValueError):
    """The example images cannot be used."""


def find_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"image folder {folder} does not exist: give a folder with 1 or more .png/.jpg images")
    # regular files only: a FIFO or device named a.png would block the reader forever
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ImageInputError(f"no images (.png/.jpg/.webp/.bmp) in {folder}: add 4-5 example images of the concept")
    return paths


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
BACKGROUND = (255, 255, 255)  # transparent areas become white, as A1111's training preprocessing makes them


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image, name: str) -> tuple[Image.Image, str]:
    """An 8-bit RGB image and a note saying how it was converted."""
    if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit greyscale (PNG/TIFF); convert("RGB") would clip it to white
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return (Image.fromarray(np.round(grey).astype(np.uint8), "L").convert("RGB"),
                f"{name}: converted from 16-bit greyscale ({image.mode}) to 8-bit RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return (Image.alpha_composite(background, rgba).convert("RGB"),
                f"{name}: converted from {image.mode} to RGB, transparent areas composited on white")
    return image.convert("RGB"), f"{name}: converted from {image.mode} to RGB"


def prepare(image: Image.Image, size: int, name: str = "image") -> tuple[torch.Tensor, list[str]]:
    """[3, size, size] float in [0, 1]; notes say what had to be converted."""
    notes = []
    if image.mode != "RGB":
        image, note = _to_rgb(image, name)
        notes.append(note)
    if image.size != (size, size):
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        notes.append(f"{name}: centre-cropped and resized from {w}x{h} to {size}x{size}")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), notes


def load_images(paths, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images [N, 3, size, size] in [0, 1] from files or a folder, plus conversion notes."""
    if isinstance(paths, (str, Path)):
        paths = find_images(paths)
    if not paths:
        raise ImageInputError("no example images given: pass 4-5 images of the concept")
    tensors, notes = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                tensor, image_notes = prepare(image, size, Path(path).name)
        except Image.DecompressionBombError:
            raise ImageInputError(f"image {path} is too large to decode safely (more than "
                                  f"{2 * Image.MAX_IMAGE_PIXELS} pixels): resize it, e.g. to 1024x1024") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ImageInputError(f"cannot read image {path}: {error.__class__.__name__}; remove or replace it") from None
        tensors.append(tensor)
        notes.extend(image_notes)
    return torch.stack(tensors), notes


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL image."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)
