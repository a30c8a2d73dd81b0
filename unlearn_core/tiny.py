"""A tiny SD2-architecture pipeline with random weights, built from configs (tests, speed runs, demo).

Same module structure as SD2 (gelu CLIP text encoder whose last hidden state is the conditioning,
cross-attention UNet, AutoencoderKL, v-prediction), the real CLIP tokenizer, only smaller.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .diffusers_backend import CONFIG_DIR


def build_pipeline(seed: int = 0, width: int = 32, layers: int = 4, prediction_type: str = "v_prediction",
                   full_size: bool = False):
    """A StableDiffusionPipeline with random weights. ``full_size`` uses the real SD2 shapes (slow on CPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "tokenizer"))
    if full_size:
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(CONFIG_DIR / "text_encoder")))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_DIR / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIG_DIR / "vae")))
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=width * 4, num_hidden_layers=layers,
            num_attention_heads=max(1, width // 16), max_position_embeddings=77, hidden_act="gelu",
            projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
            attention_head_dim=8, norm_num_groups=16, use_linear_projection=True)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=16, sample_size=16)
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(str(CONFIG_DIR / "scheduler")),
                                          prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(folder: str | Path, **kwargs) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder."""
    folder = Path(folder)
    build_pipeline(**kwargs).save_pretrained(str(folder), safe_serialization=True)
    return folder
