"""The engine's Backend over ComfyUI's own MODEL / CLIP / VAE objects.

Checked against ComfyUI 0.3.64 (Comfy-Org/ComfyUI a125cd8):
- execution.py runs every node inside ``torch.inference_mode()``, so loaded weights are inference
  tensors, which autograd refuses to save for backward. ``session()`` leaves inference mode, and for
  the run swaps each inference-tensor parameter of the text encoder and UNet for a normal copy in
  the module's parameter dict; the original Parameter objects are put back afterwards (bit-identical
  by construction: they are never written).
- comfy/clip_model.py CLIPLayer.forward does ``x += self.self_attn(self.layer_norm1(x))``: the layer
  norm saves x for backward and the in-place add then invalidates it. A forward pre-hook on each
  layer_norm1/layer_norm2 hands the layer norm a copy of x, so the saved tensor is never modified.
- comfy/sd1_clip.py SDClipModel.process_tokens embeds one prompt at a time; the engine splices concept
  vectors on a [B, 77] batch. ``token_embedding()`` is a batch-level proxy over ComfyUI's embedding;
  encode_ids feeds its rows to ComfyUI's per-prompt calls, then runs ComfyUI's own text-model forward.
- comfy/model_base.py BaseModel.apply_model takes k-diffusion inputs (x0 + sigma * noise, sigma) and
  returns the denoised latent through model_sampling; predict converts from and to the engine's DDPM
  form (x_t, integer t, raw epsilon / v output) with the model's own model_sampling.
- Weights are loaded through comfy.model_management.load_models_gpu (force_full_load) on clones of the
  patchers; nothing is added to the user's patchers.
- comfy/text_encoders/sd2_clip.py SD2ClipHModel conditions on the penultimate layer (layer "hidden", layer_idx -2);
  CLIPSetLastLayer (comfy.sd.CLIP.clip_layer, default -1) changes that for every later encode. Training always
  uses SD 2.x's penultimate layer, whatever the CLIP input was set to: the file's layers are 0..22, as A1111 and
  diffusers read them (at -1 the "final" preset would adapt layer 23, which their SD2 conditioning never uses).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

from ..unlearn_core.backend import NoiseSchedule, UnsupportedModelError
from ..unlearn_core.targets import Target

SD2_LAYER = -2  # SD 2.x conditions on the penultimate layer of its text encoder
PROJ_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "out": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _comfy():
    import comfy.model_management
    import comfy.model_sampling

    return comfy


def sd2_text_model(clip):
    """ComfyUI's SD2 text encoder (SDClipModel of the OpenCLIP-H branch) inside a CLIP, or a clear error."""
    outer = getattr(clip, "cond_stage_model", None)
    names = [n for n in ("clip_l", "clip_g", "clip_h") if hasattr(outer, n)] if outer is not None else []
    if names != ["clip_h"]:
        found = "SDXL" if "clip_g" in names else ("Stable Diffusion 1.x" if names == ["clip_l"] else
                                                   f"text encoder {type(outer).__name__}")
        raise UnsupportedModelError(f"the CLIP input is {found}; Concept Unlearn works on Stable Diffusion 2.x "
                                    "only: load an SD 2.0/2.1 checkpoint")
    inner = outer.clip_h
    transformer = inner.transformer
    width = transformer.get_input_embeddings().weight.shape[1]
    if width != 1024:
        raise UnsupportedModelError(f"the CLIP text encoder is {width} wide, SD 2.x's is 1024: load an SD 2.x checkpoint")
    return inner


def check_model(model) -> None:
    """Refuse a MODEL that is not SD 2.x (UNet cross-attention 1024 wide, no SDXL label input)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    unet_config = getattr(config, "unet_config", None) or {}
    name = type(config).__name__
    if unet_config.get("context_dim") != 1024 or (unet_config.get("adm_in_channels") is not None
                                                  and "Unclip" not in name):
        raise UnsupportedModelError(f"the MODEL input is {name}; Concept Unlearn works on Stable Diffusion 2.x only: "
                                    "load an SD 2.0/2.1 checkpoint")


def prediction_type(model_sampling) -> str:
    comfy = _comfy()
    ms = comfy.model_sampling
    if not isinstance(model_sampling, ms.ModelSamplingDiscrete):
        raise UnsupportedModelError(f"the MODEL uses {type(model_sampling).__name__} sampling; Concept Unlearn needs "
                                    "SD 2.x's discrete schedule (remove ModelSampling* nodes before it)")
    if isinstance(model_sampling, ms.EDM) or not isinstance(model_sampling, ms.EPS):
        raise UnsupportedModelError(f"the MODEL's prediction type ({type(model_sampling).__name__}) is not "
                                    "epsilon or v; Concept Unlearn supports SD 2.x eps and v models")
    return "v_prediction" if isinstance(model_sampling, ms.V_PREDICTION) else "epsilon"


def unet_kv_modules(base) -> dict[str, nn.Module]:
    """{canonical name: module} of a ComfyUI BaseModel's cross-attention to_k/to_v (see cross_attention_kv)."""
    import comfy.utils

    from ..unlearn_core.kv_edit import is_kv_name

    unet = base.diffusion_model
    out = {}
    for key, path in comfy.utils.unet_to_diffusers(base.model_config.unet_config).items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and is_kv_name(name):
            module = unet.get_submodule(path.removesuffix(".weight"))
            if isinstance(module, nn.Linear):
                out[name] = module
    return out


class _BatchedEmbedding(nn.Module):
    """Token embedding over a whole [B, L] batch (ComfyUI embeds one prompt per call)."""

    def __init__(self, host: nn.Module):
        super().__init__()
        self._host = [host]  # not a submodule: state_dict / parameters stay the host's business

    @property
    def weight(self) -> torch.Tensor:
        return self._host[0].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._host[0](ids, out_dtype=torch.float32)


def _clone_input(_module, args):
    return (args[0].clone(),) + tuple(args[1:])


@contextmanager
def _autograd_copies(modules) -> Iterator[None]:
    """Swap inference-tensor parameters/buffers for normal copies for the block; put the originals back."""
    swapped = []
    try:
        for root in modules:
            for module in root.modules():
                for store in (module._parameters, module._buffers):
                    for name, value in list(store.items()):
                        if value is None or not value.is_inference():
                            continue
                        copy = value.clone()
                        replacement = nn.Parameter(copy, requires_grad=False) if isinstance(value, nn.Parameter) else copy
                        store[name] = replacement
                        swapped.append((store, name, value, replacement))
        yield
    finally:
        for store, name, original, replacement in reversed(swapped):
            if store.get(name) is replacement:  # ComfyUI may have re-patched meanwhile: then leave its weight
                store[name] = original


class TextEncoderView:
    """The text-encoder half of the Backend protocol over a ComfyUI CLIP (enough to validate adapters)."""

    def __init__(self, clip):
        self.text = sd2_text_model(clip)
        self.clip = clip
        self.width = int(self.text.transformer.get_input_embeddings().weight.shape[1])
        self._layers = self.text.transformer.text_model.encoder.layers
        self.num_layers = self._conditioning_layers(len(self._layers))
        self._embedding = _BatchedEmbedding(self.text.transformer.get_input_embeddings())

    def _conditioning_layers(self, total: int) -> int:
        self._set_clip_options()
        try:
            if self.text.layer != "hidden" or self.text.layer_idx != SD2_LAYER:
                raise UnsupportedModelError(f"the CLIP text encoder cannot stop at SD 2.x's penultimate layer "
                                            f"(output mode {self.text.layer!r}): load an SD 2.0/2.1 checkpoint")
            return total + SD2_LAYER + 1
        finally:
            self.text.reset_clip_options()

    def _set_clip_options(self):
        # as comfy.sd.CLIP.encode_from_tokens does, but at SD 2.x's own layer, not the CLIP input's clip_layer
        self.text.reset_clip_options()
        self.text.set_clip_options({"layer": SD2_LAYER})

    def linear(self, target: Target) -> nn.Module:
        if not 0 <= target.layer < len(self._layers):
            raise ValueError(f"the text encoder has no layer {target.layer} (layers 0..{self.num_layers - 1})")
        module = self._layers[target.layer]
        for part in PROJ_MODULES[target.proj].split("."):
            module = getattr(module, part)
        return module

    def token_embedding(self) -> nn.Module:
        return self._embedding


class ComfyBackend(TextEncoderView):
    """Backend protocol over ComfyUI objects. Use inside ``with backend.session(images):``."""

    def __init__(self, model, clip, vae=None, latent_size: int = 64):
        check_model(model)
        super().__init__(clip.clone())
        self.model = model.clone()
        self.vae = vae
        self.base = self.model.model
        model_sampling = self.base.model_sampling
        pred = prediction_type(model_sampling)
        sigmas = model_sampling.sigmas.detach().float().cpu().clone()
        self.schedule = NoiseSchedule(1.0 / (1.0 + sigmas ** 2), pred)
        self.device = self.clip.patcher.load_device
        self._latents: tuple[torch.Tensor, torch.Tensor] | None = None
        self.latent_size = latent_size  # used by the anchor term when no images are given

    # ------------------------------------------------------------------ session

    @contextmanager
    def session(self, images: torch.Tensor | None = None) -> Iterator["ComfyBackend"]:
        """Load the models, make them differentiable, run the block, and restore everything."""
        comfy = _comfy()
        mm = comfy.model_management
        with ExitStack() as stack:
            stack.callback(mm.soft_empty_cache)  # runs last, also after an error or a cancel
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            if images is not None and len(images):
                self._latents = (images, self._encode_with_vae(images))
                stack.callback(setattr, self, "_latents", None)
            mm.load_models_gpu([self.model, self.clip.patcher], force_full_load=True)
            # Deltas and token vectors live with the text encoder (ComfyUI keeps it on the CPU in low-VRAM
            # mode while the UNet is on the GPU); predict moves its inputs to the UNet and its output back.
            self.device = self.text.transformer.get_input_embeddings().weight.device
            stack.enter_context(_autograd_copies([self.text.transformer, self.base.diffusion_model]))
            handles = []
            stack.callback(lambda: [h.remove() for h in handles])
            for layer in self._layers:
                handles.append(layer.layer_norm1.register_forward_pre_hook(_clone_input))
                handles.append(layer.layer_norm2.register_forward_pre_hook(_clone_input))
            yield self

    # ------------------------------------------------------------------ Backend protocol

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            chunks = self.clip.tokenize(prompt)["h"]
            if len(chunks) != 1:
                raise ValueError(f"prompt {prompt[:40]!r}... is longer than 75 tokens: shorten it")
            ids = []
            for item in chunks[0]:
                token, weight = item[0], item[1]
                if not isinstance(token, int):
                    raise ValueError(f"prompt {prompt[:40]!r} uses an embedding: connect a CONCEPT_TOKEN instead of "
                                     "writing embedding:name in Concept Unlearn's prompts")
                if weight != 1.0:
                    raise ValueError(f"prompt {prompt[:40]!r} has (emphasis:weight) or brackets: remove them or "
                                     "escape brackets as \\( \\)")
                ids.append(token)
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ComfyUI's own SDClipModel forward (as CLIPTextEncode runs it), with the batch's embeddings."""
        host = self.text.transformer.get_input_embeddings()
        device = host.weight.device
        ids = ids.to(device)
        handle = None
        if self._embedding._forward_hooks:
            rows = iter(self._embedding(ids).split(1))

            def feed(_module, _inputs, output):
                return next(rows).to(output.dtype)
            handle = host.register_forward_hook(feed)
        self._set_clip_options()
        try:
            z = self.text(ids.tolist())[0]
        finally:
            self.text.reset_clip_options()
            if handle is not None:
                handle.remove()
        return z

    def _encode_with_vae(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("no VAE connected: connect the checkpoint's VAE to encode the example images")
        with torch.no_grad():
            pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu()
            latents = self.vae.encode(pixels[..., :3])
            return self.base.process_latent_in(latents.float()).cpu()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        cached = self._latents
        if cached is not None and cached[0].shape == images.shape and torch.equal(cached[0].to(images.device), images):
            return cached[1].to(self.device)
        return self._encode_with_vae(images).to(self.device)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Raw UNet output (epsilon or v) through ComfyUI's apply_model and model_sampling."""
        ms = self.base.model_sampling
        unet_device = self.model.load_device
        x_t = x_t.to(unet_device)
        sigma = ms.sigma(t.float()).to(unet_device, torch.float32).clone()
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        x = x_t.float() * (sigma ** 2 + 1).sqrt().view(shape)  # DDPM x_t -> k-diffusion x0 + sigma * noise
        options = self.model.model_options.get("transformer_options", {})
        denoised = self.base.apply_model(x, sigma, c_crossattn=cond, transformer_options=options)
        # calculate_denoised is affine in the model output: denoised = a(x) + b * output
        zero = torch.zeros_like(x)
        offset = ms.calculate_denoised(sigma, zero, x)
        slope = ms.calculate_denoised(sigma, torch.ones_like(x), zero)
        return ((denoised.float() - offset) / slope).to(self.device)

    def cross_attention_kv(self) -> dict[str, nn.Module]:
        """The UNet's cross-attention key/value linears by canonical (diffusers) name, through ComfyUI's own
        diffusers -> LDM map (comfy.utils.unet_to_diffusers on the model's unet_config), the map its LoRA loader
        (comfy.lora.model_lora_keys_unet) gives ``lora_unet_<diffusers path>`` keys: so a file's UNet key lands on
        the module the engine edited. Read and hooked, never written."""
        return unet_kv_modules(self.base)

    def modules(self) -> list[nn.Module]:
        # The modules gradients pass through, i.e. the ones swapped to normal tensors in session(). Not the VAE
        # (used under no_grad) nor SDClipModel.logit_scale: ComfyUI leaves those as inference tensors with
        # requires_grad=True, whose flag cannot be set back outside inference mode.
        return [self.text.transformer, self.base.diffusion_model]
