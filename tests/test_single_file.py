"""Single SD2 checkpoint files (original LDM / Stability layout) load through load_pipeline, for real.

A tiny SD2-architecture pipeline (23-layer OpenCLIP-style text encoder, as SD2's penultimate-layer
conditioning) is written by tests/ldm_format.py as one .safetensors and one .ckpt with real SD2 key
names (24 resblocks, fused q/k/v), loaded by ``load_pipeline`` -> ``from_single_file`` with a config
folder of the tiny model that holds no weights, and must compute what the original computes.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from closeness import relative_error
from ldm_format import pipeline_to_ldm, save_config_folder, save_single_file
from unlearn_core.diffusers_backend import DiffusersBackend, ModelLoadError, load_pipeline
from unlearn_core.tiny import build_pipeline

TOL = 1e-5  # relative to the size of what is compared: identical weights, the same computation up to rounding
PROMPTS = ["a photo of a red square", "Van Gogh style painting of a harbour at night"]


@pytest.fixture(scope="module")
def original():
    """SD2's block structure at tiny widths: 23 text layers; 4 UNet levels of 2 layers, cross-attention in the
    first three going down and the last three going up (upsamplers after attentions); a 4-level VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pipe = build_pipeline(seed=3, layers=23)
    pipe.unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16, use_linear_projection=True)
    pipe.vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                             norm_num_groups=16, sample_size=64)
    return pipe


@pytest.fixture(scope="module")
def files(original, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single-file")
    config = save_config_folder(original, folder / "tiny-sd2-config")
    assert not [p for p in config.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    return {"config": config,
            ".safetensors": save_single_file(original, folder / "tiny-sd2-768-v.safetensors"),
            ".ckpt": save_single_file(original, folder / "tiny-sd2-768-v.ckpt")}


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The difference relative to b's size (an absolute bound would depend on the values' scale and the CPU)."""
    return relative_error(a, b)


def assert_same_computation(original, loaded):
    ours, theirs = DiffusersBackend(original), DiffusersBackend(loaded)
    assert theirs.num_layers == ours.num_layers == 23
    with torch.no_grad():
        ids = ours.tokenize(PROMPTS)
        assert torch.equal(ids, theirs.tokenize(PROMPTS))
        cond = ours.encode_ids(ids)
        assert cond.abs().max() > 0.1
        assert relative_diff(theirs.encode_ids(ids), cond) < TOL

        generator = torch.Generator().manual_seed(0)
        x_t = torch.randn(2, 4, 8, 8, generator=generator)
        t = torch.tensor([15, 700])
        prediction = ours.predict(x_t, t, cond)
        assert relative_diff(theirs.predict(x_t, t, cond), prediction) < TOL

        images = torch.rand(2, 3, 64, 64, generator=generator)
        latents = ours.encode_images(images)
        assert relative_diff(theirs.encode_images(images), latents) < TOL
        assert relative_diff(loaded.vae.decode(latents).sample, original.vae.decode(latents).sample) < TOL


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_computes_what_the_original_computes(original, files, suffix):
    loaded = load_pipeline(files[suffix], config_dir=files["config"])
    assert_same_computation(original, loaded)
    for part in ("text_encoder", "unet", "vae"):  # every weight arrived, none left at random init
        before, after = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), part
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.safety_checker is None and loaded.feature_extractor is None


def test_file_has_the_original_layout(files):
    with safe_open(str(files[".safetensors"]), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight").get_shape() == [96, 32]
    resblocks = {k.split(".")[4] for k in keys if k.startswith("cond_stage_model.model.transformer.resblocks.")}
    assert resblocks == {str(i) for i in range(24)}  # 24 as in real SD2; the 24th is not used
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model",
                                               "alphas_cumprod", "alphas_cumprod_prev", "betas"}
    assert not any(".q_proj." in k or "down_blocks" in k or "encoder.layers" in k for k in keys)
    unet_blocks = {".".join(k.split(".")[2:4]) for k in keys
                   if k.startswith("model.diffusion_model.") and "_block" in k}
    assert unet_blocks == ({f"input_blocks.{i}" for i in range(12)} | {f"output_blocks.{i}" for i in range(12)}
                           | {f"middle_block.{i}" for i in range(3)})
    for key in ("input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.9.0.op.weight",
                "middle_block.1.proj_in.weight", "output_blocks.2.1.conv.weight", "output_blocks.8.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.2.bias", "out.2.weight", "time_embed.2.bias"):
        assert "model.diffusion_model." + key in keys, key  # names as in real SD2 files
    for key in ("encoder.down.3.block.1.conv2.weight", "encoder.mid.attn_1.q.weight", "decoder.up.3.upsample.conv.bias",
                "decoder.up.0.block.2.norm1.weight", "decoder.norm_out.weight", "post_quant_conv.weight"):
        assert "first_stage_model." + key in keys, key


def test_extra_block_after_a_shallower_text_encoder_is_left_out(tmp_path):
    """diffusers drops resblocks.23 by name; in a file of another depth the extra block is a key the model lacks."""
    original = build_pipeline(seed=5, layers=4)
    path = save_single_file(original, tmp_path / "tiny4-v.safetensors")
    loaded = load_pipeline(path, config_dir=save_config_folder(original, tmp_path / "config"))
    assert loaded.text_encoder.config.num_hidden_layers == 4
    ids = DiffusersBackend(original).tokenize(PROMPTS)
    with torch.no_grad():
        assert relative_diff(loaded.text_encoder(ids)[0], original.text_encoder(ids)[0]) < TOL


@pytest.mark.parametrize("name, override, expected", [
    ("sd2-768-v-ema.safetensors", None, "v_prediction"),
    ("v2-1_768-ema-pruned.ckpt", None, "v_prediction"),
    ("v2-1_512-ema-pruned.safetensors", None, "epsilon"),
    ("sd2-Base-finetune.ckpt", None, "epsilon"),
    ("sd2-768-v-ema.safetensors", "epsilon", "epsilon"),
    ("v2-1_512-ema-pruned.ckpt", "v_prediction", "v_prediction"),
])
def test_prediction_type_from_file_name_unless_given(files, tmp_path, name, override, expected):
    path = tmp_path / name
    os.link(files[path.suffix], path)
    loaded = load_pipeline(path, prediction_type=override, config_dir=files["config"])
    assert loaded.scheduler.config.prediction_type == expected
    assert DiffusersBackend(loaded).schedule.prediction_type == expected


def test_incomplete_file_is_refused(original, files, tmp_path):
    state = pipeline_to_ldm(original)
    cases = {"no-vae.safetensors": [k for k in state if k.startswith("first_stage_model.")],
             "no-unet-out.safetensors": ["model.diffusion_model.out.2.weight"],
             "no-ln-final.safetensors": ["cond_stage_model.model.ln_final.weight"]}  # diffusers alone keeps this one
    for name, dropped in cases.items():
        save_file({k: v for k, v in state.items() if k not in dropped}, str(tmp_path / name))
        with pytest.raises(ModelLoadError, match=name):
            load_pipeline(tmp_path / name, config_dir=files["config"])


def test_default_config_is_the_shipped_full_size_sd2(files):
    with pytest.raises(ModelLoadError, match=r"sd2_config .*expected shape torch.Size\(\[77, 1024\]\)"):
        load_pipeline(files[".safetensors"])


def test_shipped_config_fits_the_full_size_sd2_layout():
    """At full size (on the meta device: shapes, no memory), diffusers names our original-layout keys SD2
    ("v2"), and its converter maps them onto exactly the models of the shipped config, dropping resblocks.23."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint, infer_diffusers_model_type)
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_format import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
    from unlearn_core.diffusers_backend import CONFIG_DIR

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_DIR / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIG_DIR / "vae")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(CONFIG_DIR / "text_encoder")))
    state = {}
    for prefix, part in ((UNET_PREFIX, unet_to_ldm(unet)), (VAE_PREFIX, vae_to_ldm(vae)),
                         (CLIP_PREFIX, text_encoder_to_ldm(text_encoder))):
        state.update({prefix + k: v for k, v in part.items()})
    assert infer_diffusers_model_type(state) == "v2"
    shapes = {"cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
              "cond_stage_model.model.token_embedding.weight": (49408, 1024),
              "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
              "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
              "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes  # as in real SD2 768-v files
    converted = {unet: convert_ldm_unet_checkpoint(state, unet.config),
                 vae: convert_ldm_vae_checkpoint(state, vae.config),
                 text_encoder: {k.removeprefix("text_model."): v for k, v in
                                convert_open_clip_checkpoint(text_encoder, state, prefix=CLIP_PREFIX).items()}}
    for model, weights in converted.items():
        expected = model.state_dict()
        assert weights.keys() == expected.keys(), type(model).__name__
        assert all(weights[k].shape == expected[k].shape for k in expected), type(model).__name__
