"""The A1111 Backend, run for real through the engine on a small model with A1111's SD2 object structure.

The model rebuilds what the backend touches on ``shared.sd_model`` for SD2 (see the docstring of
scripts/concept_unlearn_a1111_backend.py for the A1111 / ldm files read): cond_stage_model.wrapped (ldm's
FrozenOpenCLIPEmbedder: .model = open_clip text CLIP, .layer_idx = 1, encode_with_transformer),
apply_model / parameterization / alphas_cumprod / encode_first_stage / scale_factor / first_stage_model / model.
The open_clip part is the 1024-wide open_clip structure from test_a1111_openclip (3 layers); the UNet and VAE are
tiny diffusers models behind ldm's method names. What is not covered here: A1111's hijack wrapper
(EmbeddingsWithFixes, tokenize_line), its devices.autocast on a GPU, and its Lora extension itself.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from unlearn_core import Cancelled, EraseConfig, LoraConfig, erase
from unlearn_core.adapter_io import read_adapter, write_adapter
from unlearn_core.backend import UnsupportedModelError
from unlearn_core.diffusers_backend import CONFIG_DIR

sys.path.insert(0, str(Path(__file__).parent))
from test_a1111_openclip import TextCLIP, encode_with_transformer  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "concept_unlearn_a1111_backend.py"
_spec = importlib.util.spec_from_file_location("concept_unlearn_a1111_backend", _PATH)
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)
oc = ab.oc


class FrozenOpenCLIPEmbedder(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.model = clip
        self.layer_idx = 1  # layer="penultimate"

    def encode_with_transformer(self, text):
        return encode_with_transformer(self.model, text, self.layer_idx)


class LatentDiffusionLike(nn.Module):
    """ldm LatentDiffusion's method names over tiny diffusers models."""

    def __init__(self, clip, unet, vae, parameterization="v"):
        super().__init__()
        self.cond_stage_model = FrozenOpenCLIPEmbedder(clip)
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.first_stage_model = vae
        self.parameterization = parameterization
        self.scale_factor = 0.18215
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x_noisy, t, cond):
        return self.model.diffusion_model(x_noisy, t, encoder_hidden_states=cond).sample

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "tokenizer"))

    def run(prompts):
        ids = torch.tensor(tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids)
        for row in ids:  # open_clip / A1111 process_tokens: zeros after the first end token
            end = int((row == 49407).nonzero()[0])
            row[end + 1:] = 0
        return ids
    return run


@pytest.fixture(scope="module")
def sd_model_factory():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def make(parameterization="v"):
        torch.manual_seed(0)
        clip = TextCLIP(width=1024, layers=3, heads=16)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=1024, attention_head_dim=8, norm_num_groups=16, use_linear_projection=True)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=16, sample_size=16)
        return LatentDiffusionLike(clip, unet, vae, parameterization).eval()
    return make


@pytest.fixture(scope="module")
def sd_model(sd_model_factory):
    return sd_model_factory()


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_unchanged(m, snap):
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snap.items())
    assert all("forward" not in b.attn.__dict__ for b in m.cond_stage_model.model.transformer.resblocks)
    assert all(p.requires_grad for p in m.parameters())  # flags restored (eval model built with grad on)


def images(n=2):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g)


def config(**kw):
    base = dict(concept="cat", steps=2, batch_size=2, lora=LoraConfig(preset="fewshot", rank=2))
    base.update(kw)
    return EraseConfig(**base)


def test_backend_shape_and_schedule(sd_model, tokenizer):
    b = ab.A1111Backend(sd_model, tokenizer=tokenizer)
    assert (b.num_layers, b.width, b.schedule.prediction_type) == (2, 1024, "v_prediction")
    assert b.linear(ab.Target(1, "q")).weight.shape == (1024, 1024)
    assert b.linear(ab.Target(0, "fc1")) is sd_model.cond_stage_model.model.transformer.resblocks[0].mlp.c_fc
    with pytest.raises(ValueError, match="no conditioning layer 2"):
        b.linear(ab.Target(2, "fc1"))


def test_erase_runs_for_real_and_leaves_the_model_bit_identical(sd_model, tokenizer, tmp_path):
    snap = snapshot(sd_model)
    b = ab.A1111Backend(sd_model, tokenizer=tokenizer)
    steps = []
    with b.session():
        result = erase(b, config(), images=images(), callback=lambda info: steps.append(info.step))
    assert steps == [1, 2]
    assert any(p.abs().sum() > 0 for p in result.deltas.up.values())
    assert_unchanged(sd_model, snap)
    path = write_adapter(tmp_path / "cat.safetensors", result.deltas, {"width": 1024, "layers": 2, "probe": []},
                         result.info())
    loaded = read_adapter(path)
    assert loaded.deltas.targets == result.deltas.targets
    assert loaded.metadata["ss_network_module"] == "networks.lora" and loaded.metadata["ss_v2"] == "True"
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:  # every key converts to an A1111 SD2 module name
        assert set(oc.kohya_to_a1111({k: f.get_tensor(k) for k in f.keys()})) == {
            oc.a1111_layer_name(t.layer, t.proj) for t in result.deltas.targets}


def test_trained_adapter_applied_a1111_style_gives_the_engine_conditioning(sd_model, tokenizer):
    """What A1111 computes after merging the adapter (networks.py rules) = what the engine trained against."""
    b = ab.A1111Backend(sd_model, tokenizer=tokenizer)
    with b.session():
        result = erase(b, config(method="anchor", steps=3, lr=1e-2), images=None)
    ids = b.tokenize(["a photo of a cat", "a red car"])
    with torch.no_grad():
        with b.session(), result.deltas.inject(b.linear):
            engine = b.encode_ids(ids)
        base = sd_model.cond_stage_model.encode_with_transformer(ids)
        blocks = sd_model.cond_stage_model.model.transformer.resblocks
        merged = oc.merged_weights(blocks, result.deltas.to_kohya(torch.float32))
        snap = snapshot(sd_model)
        params = dict(blocks.named_parameters())
        for name, value in merged.items():
            params[name].copy_(value)
        a1111 = sd_model.cond_stage_model.encode_with_transformer(ids)
        sd_model.load_state_dict(snap)
    assert (engine - base).abs().max() > 1e-4
    torch.testing.assert_close(engine, a1111, atol=1e-4, rtol=1e-3)


def test_interrupt_and_error_restore_everything(sd_model, tokenizer):
    snap = snapshot(sd_model)
    b = ab.A1111Backend(sd_model, tokenizer=tokenizer)

    def stop(info):
        raise Cancelled("interrupted")
    with pytest.raises(Cancelled):
        with b.session():
            erase(b, config(steps=5), images=images(), callback=stop)
    assert_unchanged(sd_model, snap)

    original = sd_model.apply_model
    sd_model.apply_model = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            with b.session():
                erase(b, config(), images=images())
    finally:
        del sd_model.apply_model
    assert sd_model.apply_model == original
    assert_unchanged(sd_model, snap)


def test_eps_model_schedule(sd_model_factory, tokenizer):
    b = ab.A1111Backend(sd_model_factory("eps"), tokenizer=tokenizer)
    assert b.schedule.prediction_type == "epsilon"


def test_refusals_are_one_clear_line(sd_model, tokenizer):
    class SD1Cond(nn.Module):  # ldm FrozenCLIPEmbedder: .transformer (HF CLIP), no .model
        def __init__(self):
            super().__init__()
            self.transformer = nn.Linear(2, 2)

    class Fake:
        parameterization = "eps"
    sd1 = Fake()
    sd1.cond_stage_model = nn.Module()
    sd1.cond_stage_model.wrapped = SD1Cond()
    with pytest.raises(UnsupportedModelError, match="1.x"):
        ab.A1111Backend(sd1)
    sdxl = Fake()
    sdxl.cond_stage_model = nn.Module()
    sdxl.cond_stage_model.embedders = nn.ModuleList()
    with pytest.raises(UnsupportedModelError, match="SDXL"):
        ab.A1111Backend(sdxl)
    forge = Fake()
    forge.forge_objects = object()
    with pytest.raises(UnsupportedModelError, match="Forge"):
        ab.A1111Backend(forge)
    with pytest.raises(UnsupportedModelError, match="no model is loaded"):
        ab.A1111Backend(None)
    with pytest.raises(UnsupportedModelError, match="--lowvram/--medvram"):
        ab.A1111Backend(sd_model, medvram=True, tokenizer=tokenizer)
    b = ab.A1111Backend(sd_model, tokenizer=tokenizer)
    fc = sd_model.cond_stage_model.model.transformer.resblocks[0].mlp.c_fc
    fc.network_current_names = (("mylora", 1.0, 1.0, None),)
    try:
        with pytest.raises(UnsupportedModelError, match="mylora .*generate once without"):
            with b.session():
                pass
    finally:
        del fc.network_current_names
