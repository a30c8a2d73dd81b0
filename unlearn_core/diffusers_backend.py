"""Backend over a diffusers StableDiffusionPipeline; loading from folders and single SD2 files.

diffusers is imported only here (lazily), so hosts without it can use the rest of the engine.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .backend import NoiseSchedule, UnsupportedModelError, encode_in_batches
from .targets import Target

CONFIG_DIR = Path(__file__).parent / "sd2_config"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.(q|k|v|out)_proj|mlp\.(fc1|fc2))$")


class ModelLoadError(ValueError):
    """The model path cannot be loaded as a Stable Diffusion 2.x model."""


def check_sd2(pipe) -> None:
    """Refuse pipelines that are not SD2-architecture, naming what was found."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise UnsupportedModelError("this is an SDXL model (two text encoders); Concept Unlearn supports SD 2.x only")
    text_config = pipe.text_encoder.config
    width = text_config.hidden_size
    cross = pipe.unet.config.cross_attention_dim
    activation = getattr(text_config, "hidden_act", "?")
    if cross == 2048:
        raise UnsupportedModelError(f"UNet cross-attention size {cross} is SDXL's; Concept Unlearn supports SD 2.x only")
    if activation == "quick_gelu" or width == 768:
        raise UnsupportedModelError(
            f"this looks like Stable Diffusion 1.x (text encoder {width} wide, {activation}); "
            "Concept Unlearn supports SD 2.x (OpenCLIP text encoder, 1024 wide, gelu)")
    if width != cross:
        raise UnsupportedModelError(f"text encoder width {width} does not match the UNet's cross-attention size {cross}: "
                                    "not a Stable Diffusion 2.x model")


class DiffusersBackend:
    """Adapts a StableDiffusionPipeline to the engine's Backend protocol. The pipeline is never modified."""

    def __init__(self, pipe):
        check_sd2(pipe)
        self.pipe = pipe
        self.text_encoder = pipe.text_encoder
        self.device = pipe.unet.device
        self.width = int(self.text_encoder.config.hidden_size)
        self._linears: dict[Target, nn.Linear] = {}
        for name, module in self.text_encoder.named_modules():
            match = _LAYER_RE.search(name)
            if match and isinstance(module, nn.Linear):
                self._linears[Target(int(match.group(1)), match.group(2) or match.group(3))] = module
        self.num_layers = 1 + max((t.layer for t in self._linears), default=-1)
        if self.num_layers == 0:
            raise UnsupportedModelError("no transformer layers found in the text encoder")
        scheduler_config = dict(pipe.scheduler.config)
        from diffusers import DDPMScheduler

        train_schedule = DDPMScheduler.from_config(scheduler_config)
        self.schedule = NoiseSchedule(train_schedule.alphas_cumprod.float().cpu(),
                                      scheduler_config.get("prediction_type", "epsilon"))
        self.latent_size = int(pipe.unet.config.sample_size)
        self.resolution = self.latent_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1))

    def linear(self, target: Target) -> nn.Module:
        try:
            return self._linears[target]
        except KeyError:
            raise ValueError(f"the text encoder has no projection {target} (layers 0..{self.num_layers - 1})") from None

    def token_embedding(self) -> nn.Module:
        return self.text_encoder.get_input_embeddings()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def _text_stages(self):
        """The text encoder's transformer layers and its final norm (transformers 4.x nests them in text_model)."""
        model = getattr(self.text_encoder, "text_model", self.text_encoder)
        return model.encoder.layers, model.final_layer_norm

    def encode_capturing(self, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_ids(ids)`` and the input hidden states [B, L, width] of transformer layer ``layer`` in that same
        forward pass (with the other arguments the host passes that layer, kept for ``encode_from``)."""
        layers, _ = self._text_stages()
        seen = {}

        def grab(_module, args, kwargs):
            seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
            seen["call"] = (len(seen["hidden"]), args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

        handle = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            cond = self.encode_ids(ids)
        finally:
            handle.remove()
        self._layer_call = seen["call"]
        return cond, seen["hidden"]

    def encode_from(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """The conditioning from the input hidden states of layer ``layer`` (``encode_capturing``'s): layers
        ``layer..`` and the final norm, called as the host's forward calls them (masks resized to the batch)."""
        layers, final_norm = self._text_stages()
        batch, args, kwargs = self._layer_call

        def resized(value):  # per-batch tensors (the causal mask) taken for this batch
            if torch.is_tensor(value) and value.ndim >= 2 and value.shape[0] == batch and batch != len(hidden):
                return value[:1].expand(len(hidden), *value.shape[1:])
            return value

        args = tuple(resized(a) for a in args)
        kwargs = {k: resized(v) for k, v in kwargs.items()}
        for module in layers[layer:]:
            out = module(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return final_norm(hidden)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_in_batches(self._encode_batch, images)

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        pixels = (images * 2 - 1).to(vae.device, vae.dtype)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        unet = self.pipe.unet
        return unet(x_t.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample

    def cross_attention_kv(self) -> dict[str, nn.Module]:
        """The UNet's cross-attention key/value linears by canonical name (their diffusers module paths,
        e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``); read, hooked, never written."""
        from .kv_edit import is_kv_name

        return {name: module for name, module in self.pipe.unet.named_modules()
                if is_kv_name(name) and isinstance(module, nn.Linear)}

    def modules(self) -> list[nn.Module]:
        return [self.text_encoder, self.pipe.unet, self.pipe.vae]


# ---------------------------------------------------------------------------- loading

def _single_file_family(path: Path) -> str:
    """'sd2', 'sd1', 'sdxl' or 'unknown', from the checkpoint's key names (nothing is unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as error:  # safetensors raises several types for damaged files
            raise ModelLoadError(f"{path} is not a readable .safetensors checkpoint: {error}") from None
    else:
        state = _load_ckpt_safely(path)
        keys = list(state.get("state_dict", state))
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return "unknown"


def _load_ckpt_safely(path: Path) -> dict:
    """Tensors only (weights_only: no code runs); memory-mapped when the file's format allows."""
    error = None
    for mmap in (True, False):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as caught:  # torch raises many types for bad, legacy or unsafe pickles
            error = caught
    raise ModelLoadError(f"{path.name} cannot be read safely as a checkpoint ({error.__class__.__name__}: "
                         f"{str(error).splitlines()[0][:200]}); convert it to .safetensors")


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0][:200]


def _check_weight_files(folder: Path) -> None:
    """Every component's .safetensors file must be complete (its header covers the file): name the one that is not."""
    from safetensors import safe_open

    for weights in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as error:  # safetensors raises several types for damaged files
            raise ModelLoadError(f"{weights.relative_to(folder)} in {folder} is damaged or truncated "
                                 f"({_first_line(error)}): re-download or re-save the model") from None


def _dtype_option(dtype) -> dict:
    """The loaders' dtype keyword: recent diffusers take ``dtype=`` and warn (FutureWarning) on every call with
    ``torch_dtype=`` (diffusers PR 14205, which added utils._resolve_dtype); older ones know only ``torch_dtype=``."""
    import diffusers.utils

    return {"dtype" if hasattr(diffusers.utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_pipeline(path, prediction_type: str | None = None, dtype: torch.dtype = torch.float32,
                  config_dir: str | Path = CONFIG_DIR):
    """A StableDiffusionPipeline from a diffusers folder or a single SD2 .safetensors/.ckpt file.

    Nothing is downloaded. Single files use the diffusers configs in ``config_dir`` (default: the SD2
    configs shipped with this package); their prediction type is v_prediction (SD2 768) unless the
    file name says 512/base or ``prediction_type`` is given.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist: give a diffusers folder (with model_index.json) "
                             "or an SD2 .safetensors/.ckpt file")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is a folder without model_index.json: not a diffusers model folder")
        _check_weight_files(path)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **_dtype_option(dtype),
                                                           safety_checker=None, requires_safety_checker=False)
        except Exception as error:  # diffusers and transformers raise many types for damaged or incomplete folders
            raise ModelLoadError(f"{path} does not load as a diffusers SD2 folder ({error.__class__.__name__}: "
                                 f"{_first_line(error)}); re-download or re-save the model") from None
    elif path.suffix in (".safetensors", ".ckpt"):
        family = _single_file_family(path)
        if family != "sd2":
            found = {"sd1": "Stable Diffusion 1.x", "sdxl": "SDXL"}.get(family, "no Stable Diffusion checkpoint")
            raise UnsupportedModelError(f"{path.name} holds {found}; Concept Unlearn supports SD 2.x only")
        if prediction_type is None:
            prediction_type = "epsilon" if re.search(r"512|base", path.name, re.I) else "v_prediction"
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                            **_dtype_option(dtype), safety_checker=None,
                                                            requires_safety_checker=False)
        except Exception as error:  # diffusers raises several types for incomplete or other-sized checkpoints
            raise ModelLoadError(f"{path.name} does not load with the configs in {config_dir} "
                                 f"({error.__class__.__name__}: {str(error).splitlines()[0][:200]})") from None
        # diffusers leaves weights missing from the file as empty (meta) tensors instead of failing
        missing = [f"{part}.{name}" for part in ("text_encoder", "unet", "vae")
                   for name, tensor in getattr(pipe, part).state_dict().items() if tensor.is_meta]
        if missing:
            raise ModelLoadError(f"{path.name} lacks {len(missing)} weights (e.g. {missing[0]}): incomplete checkpoint")
    else:
        raise ModelLoadError(f"{path.name}: expected a diffusers folder or a .safetensors/.ckpt file")
    if prediction_type is not None:
        pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    check_sd2(pipe)
    return pipe
