"""The engine's Backend over AUTOMATIC1111's loaded SD2 model (shared.sd_model).

Every ``modules.*`` import is inside a function, so this file imports outside A1111 too.

- Text encoder: ldm's FrozenOpenCLIPEmbedder (A1111 wraps it in FrozenOpenCLIPEmbedderWithCustomWords,
  reachable as ``cond_stage_model.wrapped``); its ``.model`` is open_clip's CLIP with the text transformer.
  Attention q/k/v are reached through ``a1111_mapping.split_attention`` (views of the fused in_proj,
  swapped in for the run and restored in finally: ``OpenClipBackend.session()``).
- Token embedding: A1111's hijack wraps ``model.token_embedding`` in EmbeddingsWithFixes (``.wrapped``
  is the nn.Embedding); the engine hooks the inner nn.Embedding.
- Conditioning: ``encode_with_transformer(ids)`` of the embedder (penultimate layer + ln_final), as
  A1111's FrozenOpenCLIPEmbedderWithCustomWords.encode_with_transformers does.
- Tokens: open_clip's SimpleTokenizer, [start] + tokens + [end] then 0s (A1111's process_tokens pads with
  id_pad=0 after the first end token for SD2); one 75-token chunk, no emphasis parsing.
"""
from __future__ import annotations

import os as _os
import sys as _sys

# A1111 loads every scripts/*.py by file path (alphabetically): make scripts/ and the repo root importable
for _path in (_os.path.dirname(_os.path.abspath(__file__)), _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))):
    if _path not in _sys.path:
        _sys.path.insert(0, _path)

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

import a1111_mapping as mapping
from unlearn_core.backend import NoiseSchedule, UnsupportedModelError
from unlearn_core.targets import Target

CHUNK = 75


def inner_embedding(module: nn.Module) -> nn.Module:
    """The nn.Embedding under A1111's EmbeddingsWithFixes wrapper (or the module itself)."""
    while not isinstance(module, nn.Embedding) and hasattr(module, "wrapped"):
        module = module.wrapped
    return module


def open_clip_ids(encode: Callable[[str], list[int]], prompts: list[str], start: int, end: int,
                  pad: int = 0, length: int = 77) -> torch.Tensor:
    """Token ids as A1111 builds one chunk for SD2: start, up to 75 tokens, end, then pad."""
    rows = []
    for prompt in prompts:
        tokens = encode(prompt)[:length - 2]
        row = [start] + tokens + [end]
        rows.append(row + [pad] * (length - len(row)))
    return torch.tensor(rows, dtype=torch.long)


class OpenClipBackend:
    """Backend over an open_clip text transformer plus host callables for the UNet and VAE.

    ``embedder`` has ``.model`` (open_clip CLIP) and optionally ``encode_with_transformer``.
    Use ``with backend.session():`` around erase()/learn_token() so q/k/v exist as modules.
    """

    def __init__(self, embedder, tokenize: Callable[[list[str]], torch.Tensor], predict, encode_images,
                 schedule: NoiseSchedule, host_modules: list[nn.Module], device: torch.device,
                 skip_last: int = 1, latent_size: int = 64):
        self.embedder = embedder
        self.model = embedder.model
        blocks = mapping.resblocks(self.model)
        self.num_layers = len(blocks) - skip_last
        self.skip_last = skip_last
        self.width = int(self.model.token_embedding.weight.shape[1]) if isinstance(
            self.model.token_embedding, nn.Embedding) else int(inner_embedding(self.model.token_embedding).weight.shape[1])
        self._tokenize, self._predict, self._encode_images = tokenize, predict, encode_images
        self.schedule = schedule
        self._host_modules = host_modules
        self.device = device
        self.latent_size = latent_size
        self._active = False

    @contextmanager
    def session(self) -> Iterator["OpenClipBackend"]:
        with mapping.split_attention(self.model):
            self._active = True
            try:
                yield self
            finally:
                self._active = False

    def linear(self, target: Target) -> nn.Module:
        if target.layer >= self.num_layers:
            raise ValueError(f"the text encoder has no projection {target} (layers 0..{self.num_layers - 1})")
        if target.proj in ("q", "k", "v") and not self._active:
            raise RuntimeError("q/k/v targets need `with backend.session():` around the run")
        return mapping.linear_for(self.model, target)

    def token_embedding(self) -> nn.Module:
        return inner_embedding(self.model.token_embedding)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self._tokenize(list(prompts))

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if hasattr(self.embedder, "encode_with_transformer") and self.skip_last == 1:
            return self.embedder.encode_with_transformer(ids)
        return mapping.encode(self.model, ids, self.skip_last)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode_images(images)

    def predict(self, x_t, t, cond):
        return self._predict(x_t, t, cond)

    def modules(self) -> list[nn.Module]:
        return list(self._host_modules)


# ---------------------------------------------------------------------------- A1111

def check_sd_model(sd_model) -> object:
    """Return the FrozenOpenCLIPEmbedder of an SD2 model; one clear error otherwise."""
    if sd_model is None:
        raise UnsupportedModelError("no checkpoint is loaded: load a Stable Diffusion 2.x checkpoint first")
    if hasattr(sd_model, "forge_objects"):
        raise UnsupportedModelError("this is Forge (sd_model.forge_objects); Concept Unlearn's tab supports AUTOMATIC1111")
    if hasattr(sd_model, "conditioner") or getattr(sd_model, "is_sdxl", False):
        raise UnsupportedModelError("the loaded checkpoint is SDXL; Concept Unlearn supports SD 2.x only")
    cond = getattr(sd_model, "cond_stage_model", None)
    embedder = getattr(cond, "wrapped", cond)
    name = type(embedder).__name__
    if name == "FrozenCLIPEmbedder" or hasattr(embedder, "transformer") and not hasattr(embedder, "model"):
        raise UnsupportedModelError("the loaded checkpoint is Stable Diffusion 1.x (CLIP ViT-L, 768 wide); "
                                    "Concept Unlearn supports SD 2.x (OpenCLIP ViT-H, 1024 wide)")
    model = getattr(embedder, "model", None)
    if model is None or not hasattr(model, "transformer") or not hasattr(model.transformer, "resblocks"):
        raise UnsupportedModelError(f"text encoder {name} is not open_clip's (Forge and other forks are not supported); "
                                    "Concept Unlearn supports AUTOMATIC1111 with SD 2.x")
    width = inner_embedding(model.token_embedding).weight.shape[1]
    if width != 1024:
        raise UnsupportedModelError(f"text encoder width {width} is not SD 2.x's 1024")
    key = getattr(getattr(sd_model, "model", None), "conditioning_key", "crossattn")
    if key != "crossattn":
        raise UnsupportedModelError(f"this SD 2.x variant conditions with {key!r} (inpainting, depth or unCLIP); "
                                    "Concept Unlearn supports the text-to-image SD 2.x models")
    if getattr(embedder, "layer", "penultimate") != "penultimate":
        raise UnsupportedModelError(f"text encoder uses layer {embedder.layer!r}; SD 2.x uses the penultimate")
    return embedder


def check_memory_options() -> None:
    """--lowvram/--medvram move modules between CPU and GPU with forward hooks while sampling; a training
    run needs the text encoder, UNet and VAE in place with gradients, so those modes are refused."""
    from modules import shared

    cmd = shared.cmd_opts
    for flag in ("lowvram", "medvram", "medvram_sdxl"):
        if getattr(cmd, flag, False) and (flag != "medvram_sdxl" or getattr(shared.sd_model, "is_sdxl", False)):
            raise RuntimeError(f"--{flag.replace('_', '-')} is on: it swaps model parts between CPU and GPU during "
                               "sampling, which a training run cannot follow; restart without it to erase concepts")


def check_no_merged_networks(module: nn.Module) -> None:
    """A1111's built-in Lora (extensions-builtin/Lora/networks.py) adds LoRA weights into the modules in place and
    records them in ``network_current_names``; they stay merged until a later generation without them. Training on
    top of them would erase from a different base, so refuse."""
    for name, sub in module.named_modules():
        current = getattr(sub, "network_current_names", ())
        if current:
            raise RuntimeError(f"a LoRA from the last generation is still merged into the text encoder ({name}); "
                               "generate once without <lora:...> in the prompt, then erase")


def from_shared() -> OpenClipBackend:
    """A Backend over shared.sd_model (A1111 only)."""
    from modules import devices, shared

    sd_model = shared.sd_model
    check_memory_options()
    embedder = check_sd_model(sd_model)
    check_no_merged_networks(embedder.model)
    parameterization = getattr(sd_model, "parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise UnsupportedModelError(f"unsupported parameterization {parameterization!r}")
    schedule = NoiseSchedule(sd_model.alphas_cumprod.detach().float().cpu(),
                             "epsilon" if parameterization == "eps" else "v_prediction")
    device = devices.device

    import open_clip

    tokenizer = open_clip.tokenizer._tokenizer
    start, end = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]

    def tokenize(prompts):
        return open_clip_ids(tokenizer.encode, prompts, start, end)

    def predict(x_t, t, cond):
        dtype = next(sd_model.model.parameters()).dtype
        with devices.autocast():
            out = sd_model.apply_model(x_t.to(device, dtype), t.to(device), cond.to(device, dtype))
        return out.float()

    def encode_images(images):
        with devices.autocast():
            posterior = sd_model.encode_first_stage((images * 2 - 1).to(device, devices.dtype_vae))
            return sd_model.get_first_stage_encoding(posterior).float()

    return OpenClipBackend(embedder, tokenize, predict, encode_images, schedule,
                           [sd_model.cond_stage_model, sd_model.model, sd_model.first_stage_model], device)
