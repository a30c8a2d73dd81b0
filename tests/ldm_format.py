"""Test helper: write a diffusers SD2-architecture pipeline as one original-layout (LDM / Stability) checkpoint.

Real SD2 single files (``768-v-ema.safetensors``, ``512-base-ema.ckpt``) keep the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the OpenCLIP text encoder under
``cond_stage_model.model.`` (fused q/k/v ``in_proj``, ``c_fc``/``c_proj``, 24 resblocks of which the
penultimate-layer conditioning uses 23). This module is the inverse of the key mapping that diffusers'
single-file loader applies (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_open_clip_checkpoint`` in ``diffusers.loaders.single_file_utils``), so that
``load_pipeline`` can be tested on tiny models. Every diffusers key must be mapped: an unknown
key raises rather than being dropped.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from unlearn_core.diffusers_backend import CONFIG_DIR

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.model."

_UNET_FIXED = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _unmapped(part: str, key: str):
    raise KeyError(f"{part} key {key!r} has no original-layout equivalent in this helper")


def _unet_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[head]}.{tail}" if head in _UNET_RESNET else _unmapped("UNet resnet", rest)


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights under LDM ``input_blocks/middle_block/output_blocks`` names (no prefix).

    Down block b, layer j is input block 1 + b*(L+1) + j (its downsampler the block's last slot, ``.0.op``);
    up block b, layer j is output block b*(L+1) + j (its upsampler ``.1.conv``, or ``.2.conv`` after an attention).
    """
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError("per-block layer counts are not SD2-shaped")
    step = per_block + 1
    up_has_attention = {int(m.group(1)) for k in unet.state_dict()
                        if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in unet.state_dict().items():
        name, _, param = key.rpartition(".")
        if name in _UNET_FIXED:
            out[f"{_UNET_FIXED[name]}.{param}"] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            index = 1 + int(m.group(1)) * step + int(m.group(3))
            if m.group(2) == "resnets":
                out[f"input_blocks.{index}.0.{_unet_resnet(m.group(4))}"] = value
            else:
                out[f"input_blocks.{index}.1.{m.group(4)}"] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            out[f"input_blocks.{1 + int(m.group(1)) * step + per_block}.0.op.{m.group(2)}"] = value
        elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
            out[f"middle_block.{2 * int(m.group(1))}.{_unet_resnet(m.group(2))}"] = value
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m.group(1)}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            index = int(m.group(1)) * step + int(m.group(3))
            if m.group(2) == "resnets":
                out[f"output_blocks.{index}.0.{_unet_resnet(m.group(4))}"] = value
            else:
                out[f"output_blocks.{index}.1.{m.group(4)}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            block = int(m.group(1))
            slot = 2 if block in up_has_attention else 1
            out[f"output_blocks.{block * step + per_block}.{slot}.conv.{m.group(2)}"] = value
        else:
            _unmapped("UNet", key)
    return out


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights under LDM names (no prefix): ``encoder.down.i.block.j``, decoder ``up`` blocks
    numbered in reverse, ``mid.block_1/2``, ``mid.attn_1`` with 1x1-conv q/k/v/proj_out as in real files."""
    up_count = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            out[f"{m.group(1)}.norm_out.{m.group(2)}"] = value
        elif re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
            out[key] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_vae_resnet(m.group(3))}"] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            out[f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"decoder.up.{up_count - 1 - int(m.group(1))}.block.{m.group(2)}.{_vae_resnet(m.group(3))}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            out[f"decoder.up.{up_count - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
            out[f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_vae_resnet(m.group(3))}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)"
                               r"\.(weight|bias)", key):
            if m.group(2) != "group_norm" and m.group(3) == "weight":
                value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
            out[f"{m.group(1)}.mid.attn_1.{_VAE_ATTENTION[m.group(2)]}.{m.group(3)}"] = value
        else:
            _unmapped("VAE", key)
    return out


def text_encoder_to_ldm(text_encoder, extra_block: bool = True, seed: int = 1234) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights as an OpenCLIP text tower (no prefix): ``transformer.resblocks.N`` with q/k/v fused
    into ``attn.in_proj_weight/bias``, plus ``text_projection`` and ``logit_scale`` as real SD2 files hold.

    ``extra_block`` appends one more resblock of random weights after the last one, as real SD2 files hold
    24 resblocks where diffusers' 23-layer text encoder (penultimate-layer conditioning) uses the first 23.
    """
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    state.pop("embeddings.position_ids", None)  # a buffer transformers 4.x saves (0..76), not a weight
    width = int(text_encoder.config.hidden_size)
    layers = int(text_encoder.config.num_hidden_layers)
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    for i in range(layers):
        base = f"encoder.layers.{i}."
        for param in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{base}self_attn.{p}_proj.{param}") for p in "qkv"])
            for ours, theirs in _CLIP_LAYER.items():
                out[f"transformer.resblocks.{i}.{theirs}.{param}"] = state.pop(f"{base}{ours}.{param}")
    if state:
        _unmapped("text encoder", sorted(state)[0])
    generator = torch.Generator().manual_seed(seed)
    if extra_block:
        for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            value = out[key]
            out[key.replace(".resblocks.0.", f".resblocks.{layers}.")] = torch.randn(
                value.shape, generator=generator, dtype=value.dtype)
    out["text_projection"] = torch.randn(width, width, generator=generator) / width ** 0.5
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def pipeline_to_ldm(pipe, extra_block: bool = True) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict, with the DDPM schedule buffers LDM files carry."""
    state = {}
    for prefix, part in ((UNET_PREFIX, unet_to_ldm(pipe.unet)), (VAE_PREFIX, vae_to_ldm(pipe.vae)),
                         (CLIP_PREFIX, text_encoder_to_ldm(pipe.text_encoder, extra_block))):
        state.update({prefix + k: v.detach().clone().contiguous() for k, v in part.items()})
    alphas_cumprod = pipe.scheduler.alphas_cumprod.float()
    state["alphas_cumprod"] = alphas_cumprod
    state["alphas_cumprod_prev"] = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    state["betas"] = pipe.scheduler.betas.float()
    return state


def save_single_file(pipe, path, extra_block: bool = True) -> Path:
    """Write ``pipe`` as one .safetensors file, or a .ckpt holding {"state_dict": ..., "global_step": ...}."""
    path = Path(path)
    state = pipeline_to_ldm(pipe, extra_block)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 0}, str(path))
    else:
        raise ValueError(f"{path.name}: expected .safetensors or .ckpt")
    return path


def save_config_folder(pipe, folder) -> Path:
    """A diffusers config folder for ``pipe`` without any weights (what ``from_single_file(config=...)`` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(str(folder))
    pipe.unet.save_config(str(folder / "unet"))
    pipe.vae.save_config(str(folder / "vae"))
    pipe.scheduler.save_config(str(folder / "scheduler"))
    pipe.text_encoder.config.save_pretrained(str(folder / "text_encoder"))
    shutil.copytree(CONFIG_DIR / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    return folder
