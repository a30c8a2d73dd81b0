"""The engine's Backend over AUTOMATIC1111's loaded model (``shared.sd_model``, an ldm LatentDiffusion).

No ``modules.*`` import at module level: the host-specific facts come in as arguments, so CI tests this
class on small models of the same structure. Read from (not imported):
- A1111 modules/sd_hijack.py + sd_hijack_open_clip.py: for SD2, ``sd_model.cond_stage_model`` is
  FrozenOpenCLIPEmbedderWithCustomWords; its ``.wrapped`` is ldm's FrozenOpenCLIPEmbedder whose ``.model`` is the
  open_clip CLIP; the hijack replaces ``.model.token_embedding`` by EmbeddingsWithFixes (the real nn.Embedding
  is its ``.wrapped``); prompts are tokenized by ``tokenize_line`` (chunks of 75 + start/end, padded with
  id_end, then ``process_tokens`` writes id_pad after the first id_end) and encoded by
  ``wrapped.encode_with_transformer(tokens)``.
- ldm (stable-diffusion-stability-ai) ddpm.py LatentDiffusion: ``apply_model(x_noisy, t, cond)`` returns the
  raw UNet output, ``parameterization`` is "eps" or "v", ``alphas_cumprod`` the training schedule,
  ``encode_first_stage`` -> DiagonalGaussianDistribution, ``scale_factor``.
- modules/lowvram.py: with --lowvram/--medvram, forward pre-hooks move whole modules between CPU and GPU by
  ``module.to()``, which swaps ``param.data`` under tensors autograd saved for backward: refused.
- extensions-builtin/Lora/networks.py: a LoRA used by the last generation stays merged into the weights
  (``network_current_names``) until the next generation without it: refused (we would train against it).
- SD 2.x inpainting / depth / unCLIP load as the same classes but condition the UNet with
  ``sd_model.model.conditioning_key`` "hybrid" / "concat" / "crossattn-adm" (extra UNet inputs): refused.

Module loading: A1111 loads every ``scripts/*.py`` by file path (modules/script_loading.py ``load_module``:
``spec_from_file_location(basename, path)``, no ``sys.modules`` entry), alphabetically, with the extension folder
on ``sys.path`` only while loading. So siblings are loaded by path (``sibling``) and the engine is loaded by path
as the one name ``unlearn_core`` (``load_unlearn_core``); the repository root is never put on ``sys.path``, where
its ``nodes``, ``tests``, ``bench``, ``scripts`` folders and ComfyUI ``__init__.py`` could shadow other modules.
``_load`` is the one loader: the tab file loads this file by path (registered once loaded) and takes the logic
file from ``sibling("logic")``; the logic file finds this module registered.
"""
from __future__ import annotations

import importlib.util
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, init: Path, package: Path | None = None):
    """Load ``init`` as module ``name`` (a package when ``package`` is given) unless ``name`` is loaded already."""
    if name not in sys.modules:
        locations = [str(package)] if package is not None else None
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=locations)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
            raise
    return sys.modules[name]


def load_unlearn_core():
    """The engine package, registered as ``unlearn_core`` only (an already imported one is reused)."""
    return _load("unlearn_core", ROOT / "unlearn_core" / "__init__.py", ROOT / "unlearn_core")


def sibling(name: str):
    """Another file of scripts/ (``concept_unlearn_<name>.py``), loaded by path once and kept in sys.modules."""
    key = f"concept_unlearn_{name}"
    return _load(key, Path(__file__).with_name(f"{key}.py"))


load_unlearn_core()
from unlearn_core.backend import NoiseSchedule, UnsupportedModelError, encode_in_batches  # noqa: E402
from unlearn_core.targets import Target  # noqa: E402

oc = sibling("openclip")

WHAT_TO_DO = "load an SD 2.0/2.1 checkpoint (512-base or 768-v) in AUTOMATIC1111"


def check_model(sd_model, lowvram: bool = False, medvram: bool = False) -> None:
    """Raise UnsupportedModelError (one clear line) unless sd_model is an SD2 we can train on."""
    if sd_model is None:
        raise UnsupportedModelError(f"no model is loaded: {WHAT_TO_DO}")
    if hasattr(sd_model, "forge_objects"):
        raise UnsupportedModelError("this is Stable Diffusion WebUI Forge, whose model objects differ from "
                                    "AUTOMATIC1111's: use the ComfyUI nodes or the command line instead")
    cond = getattr(sd_model, "cond_stage_model", None)
    if hasattr(sd_model, "conditioner") or hasattr(cond, "embedders") or getattr(sd_model, "is_sdxl", False):
        raise UnsupportedModelError(f"the loaded model is SDXL; Concept Unlearn works on Stable Diffusion 2.x only: "
                                    f"{WHAT_TO_DO}")
    if cond is None:
        raise UnsupportedModelError(f"the loaded model has no text encoder (cond_stage_model): {WHAT_TO_DO}")
    embedder = getattr(cond, "wrapped", cond)
    clip = getattr(embedder, "model", None)
    if clip is None or not hasattr(getattr(clip, "transformer", None), "resblocks"):
        raise UnsupportedModelError(f"the loaded model's text encoder is {type(embedder).__name__} (Stable "
                                    f"Diffusion 1.x?); Concept Unlearn works on SD 2.x's OpenCLIP: {WHAT_TO_DO}")
    width = _embedding(clip).weight.shape[1]
    if width != 1024:
        raise UnsupportedModelError(f"the text encoder is {width} wide, SD 2.x's is 1024: {WHAT_TO_DO}")
    key = getattr(getattr(sd_model, "model", None), "conditioning_key", "crossattn")
    if key != "crossattn":
        raise UnsupportedModelError(f"this SD 2.x variant conditions the UNet with {key!r} (inpainting, depth or "
                                    f"unCLIP); Concept Unlearn works on the text-to-image models: {WHAT_TO_DO}")
    if getattr(embedder, "layer", "penultimate") != "penultimate" or getattr(embedder, "layer_idx", 1) != 1:
        raise UnsupportedModelError(f"the text encoder conditions on layer {getattr(embedder, 'layer', None)!r}; "
                                    f"SD 2.x uses the penultimate one: {WHAT_TO_DO}")
    if getattr(sd_model, "parameterization", None) not in ("eps", "v"):
        raise UnsupportedModelError(f"prediction type {getattr(sd_model, 'parameterization', None)!r} is not eps or v")
    if lowvram or medvram or getattr(sd_model, "lowvram", False):
        raise UnsupportedModelError("--lowvram/--medvram move model parts between CPU and GPU during a pass, which "
                                    "breaks training: restart AUTOMATIC1111 without them to use Concept Unlearn")


def _embedding(clip) -> nn.Embedding:
    emb = clip.token_embedding
    return getattr(emb, "wrapped", emb)  # A1111's EmbeddingsWithFixes wraps the real nn.Embedding


def merged_lora_names(module: nn.Module) -> list[str]:
    """Networks A1111's Lora extension left merged into these weights (from the last generation)."""
    names = set()
    for m in module.modules():
        for entry in getattr(m, "network_current_names", ()) or ():
            names.add(str(entry[0]) if isinstance(entry, tuple) else str(entry))
    return sorted(names)


class A1111Backend:
    """Backend protocol over an A1111 SD2 model. Use inside ``with backend.session():``.

    tokenizer: optional callable prompts -> [B, 77] ids, for a cond-stage model without A1111's hijack
               (tests); by default A1111's own tokenize_line is used.
    autocast:  context factory wrapped around the run (A1111: modules.devices.autocast)."""

    def __init__(self, sd_model, *, lowvram: bool = False, medvram: bool = False,
                 tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
                 autocast: Callable[[], object] | None = None, latent_size: int = 64):
        check_model(sd_model, lowvram, medvram)
        self.sd_model = sd_model
        self.cond = sd_model.cond_stage_model
        self.embedder = getattr(self.cond, "wrapped", self.cond)
        self.clip = self.embedder.model
        self.resblocks = self.clip.transformer.resblocks
        self.width = int(_embedding(self.clip).weight.shape[1])
        layer_idx = int(getattr(self.embedder, "layer_idx", 1))  # checked: penultimate
        self.num_layers = len(self.resblocks) - layer_idx
        self.splits = [oc.SplitAttention(oc.attention_of(b)) for b in self.resblocks]
        prediction = "v_prediction" if sd_model.parameterization == "v" else "epsilon"
        self.schedule = NoiseSchedule(sd_model.alphas_cumprod.detach().float().cpu().clone(), prediction)
        self.device = _embedding(self.clip).weight.device
        self._tokenizer = tokenizer
        self._autocast = autocast or nullcontext
        self.latent_size = latent_size

    # ------------------------------------------------------------------ session

    @contextmanager
    def session(self) -> Iterator["A1111Backend"]:
        """Make the text encoder trainable through hooks for the block; everything is restored afterwards."""
        merged = merged_lora_names(self.clip)
        if merged:
            raise UnsupportedModelError(f"LoRA {', '.join(merged)} from the last generation is still merged into the "
                                        "text encoder: generate once without <lora:...> in the prompt, then retry")
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(oc.routed_attention(self.resblocks, self.splits))
            stack.enter_context(self._autocast())
            yield self

    # ------------------------------------------------------------------ Backend protocol

    def linear(self, target: Target) -> nn.Module:
        if not 0 <= target.layer < self.num_layers:
            raise ValueError(f"the text encoder has no conditioning layer {target.layer} (0..{self.num_layers - 1})")
        if target.proj in oc.ATTENTION:
            return self.splits[target.layer].proxy(target.proj)
        return oc.mlp_linear(self.resblocks[target.layer], target.proj)

    def token_embedding(self) -> nn.Module:
        return _embedding(self.clip)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        if self._tokenizer is not None:
            return self._tokenizer(list(prompts)).long()
        rows = []
        for prompt in prompts:
            chunks, _count = self.cond.tokenize_line(prompt)
            if len(chunks) != 1:
                raise ValueError(f"prompt {prompt[:40]!r}... is longer than 75 tokens: shorten it")
            chunk = chunks[0]
            if chunk.fixes:
                raise ValueError(f"prompt {prompt[:40]!r} names an A1111 embedding: pick the token file in the tab "
                                 "instead of writing its name in Concept Unlearn's prompts")
            if any(m != 1.0 for m in chunk.multipliers):
                raise ValueError(f"prompt {prompt[:40]!r} has (emphasis) or [brackets]: remove them or escape as \\( \\)")
            tokens = list(chunk.tokens)
            end = tokens.index(self.cond.id_end)
            tokens[end + 1:] = [self.cond.id_pad] * (len(tokens) - end - 1)  # as process_tokens does
            rows.append(tokens)
        return torch.tensor(rows, dtype=torch.long)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """A1111's own encoder pass (what encode_with_tokens runs), through the routed attention."""
        return self.embedder.encode_with_transformer(ids.to(self.device))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_in_batches(self._encode_batch, images)

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        first = self.sd_model.first_stage_model
        param = next(first.parameters())
        x = (images.to(param.device, param.dtype) * 2 - 1)
        dist = self.sd_model.encode_first_stage(x)
        z = dist.mode() if hasattr(dist, "mode") else dist  # the mean: deterministic, unlike get_first_stage_encoding
        return (z.float() * float(self.sd_model.scale_factor)).to(self.device)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        unet = self.sd_model.model
        param = next(unet.parameters())
        out = self.sd_model.apply_model(x_t.to(param.device, param.dtype), t.to(param.device),
                                        cond.to(param.device, param.dtype))
        return out.float().to(self.device)

    def cross_attention_kv(self) -> dict[str, nn.Module]:
        """The UNet's cross-attention to_k/to_v linears (ldm CrossAttention in ``sd_model.model.diffusion_model``) by
        canonical (diffusers) name: the inverse of A1111's own ``convert_diffusers_name_to_compvis`` (Lora
        extension, networks.py), which sends ``lora_unet_down_blocks_B_attentions_J_<rest>`` to
        ``diffusion_model_input_blocks_{1 + 3B + J}_1_<rest>``, ``up_blocks_B_attentions_J`` to ``output_blocks_{3B + J}_1``
        and ``mid_block_attentions_0`` to ``middle_block_1``: so <lora:...> puts a file's UNet key on the module the
        engine edited. Its 3 is SD's 2 res blocks per level (+1): another layout is refused. Read, never written."""
        return a1111_kv_modules(self.sd_model.model.diffusion_model)

    def modules(self) -> list[nn.Module]:
        return [self.clip, self.sd_model.model]


A1111_RES_BLOCKS = 2  # convert_diffusers_name_to_compvis's block arithmetic (1 + 3B + J, 3B + J) assumes 2 per level


def a1111_kv_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """{canonical name: module} of an ldm UNetModel's cross-attention to_k/to_v, as A1111's Lora extension names
    them (see A1111Backend.cross_attention_kv)."""
    from unlearn_core.kv_edit import UnsupportedOption, ldm_kv_modules

    blocks = getattr(unet, "num_res_blocks", None)
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks]
    if not hasattr(unet, "input_blocks") or any(b != A1111_RES_BLOCKS for b in blocks):
        raise UnsupportedOption(f"unet_kv_edit: this UNet ({type(unet).__name__}, res blocks per level {blocks}) is not "
                                "laid out as SD 2.x's, whose block numbers A1111's Lora loader assumes: turn the "
                                "option off")
    return ldm_kv_modules(unet, A1111_RES_BLOCKS)
