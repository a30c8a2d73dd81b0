"""The A1111 Backend, run for real through the engine on a small model with A1111's SD2 object structure.

The model rebuilds what the backend touches on ``shared.sd_model`` for SD2 (see the docstring of
scripts/concept_unlearn_a1111_backend.py for the A1111 / ldm files read): cond_stage_model.wrapped (ldm's
FrozenOpenCLIPEmbedder: .model = open_clip text CLIP, .layer_idx = 1, encode_with_transformer),
apply_model / parameterization / alphas_cumprod / encode_first_stage / scale_factor / first_stage_model / model.
The open_clip part is the 1024-wide open_clip structure from test_a1111_openclip (3 layers); the UNet and VAE are
tiny diffusers models behind ldm's method names. A twin of a tiny diffusers pipeline (its CLIPTextModel's weights
written into the open_clip structure by tests/ldm_format.py, its UNet / VAE / schedule behind ldm's names) checks
that the A1111 path gives diffusers' conditioning and that its adapters are the files the diffusers backend (CLI)
writes and load in diffusers' load_lora_weights. A stand-in for A1111's hijack (modules/sd_hijack_clip.py
tokenize_line chunks: start + 75 tokens padded with id_end + end; sd_hijack.EmbeddingsWithFixes around the token
embedding) covers the default tokenizer path. Not covered here: A1111 itself, devices.autocast on a GPU, and its
Lora extension (test_a1111_openclip reproduces its merge rules).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from unlearn_core import Cancelled, EraseConfig, LoraConfig, TokenConfig, erase, learn_token
from unlearn_core.adapter_io import base_fingerprint, read_adapter, write_adapter
from unlearn_core.backend import UnsupportedModelError
from unlearn_core.diffusers_backend import CONFIG_DIR, DiffusersBackend
from unlearn_core.tokens import init_vectors
from unlearn_core.tiny import build_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from ldm_format import text_encoder_to_ldm  # noqa: E402
from test_a1111_openclip import TextCLIP, encode_with_transformer  # noqa: E402
import a1111_reference as ref  # noqa: E402
from closeness import effect_error, relative_effect, relative_error  # noqa: E402

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

    def __init__(self, clip, unet, vae, parameterization="v", alphas_cumprod=None):
        super().__init__()
        self.cond_stage_model = FrozenOpenCLIPEmbedder(clip)
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.first_stage_model = vae
        self.parameterization = parameterization
        self.scale_factor = 0.18215
        if alphas_cumprod is None:
            betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
            alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone())

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
    clip = getattr(m.cond_stage_model, "wrapped", m.cond_stage_model).model
    assert all("forward" not in b.attn.__dict__ for b in clip.transformer.resblocks)
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
        assert set(ref.kohya_to_a1111({k: f.get_tensor(k) for k in f.keys()})) == {
            ref.a1111_layer_name(t.layer, t.proj) for t in result.deltas.targets}


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
        merged = ref.merged_weights(blocks, result.deltas.to_kohya(torch.float32))
        snap = snapshot(sd_model)
        params = dict(blocks.named_parameters())
        for name, value in merged.items():
            params[name].copy_(value)
        a1111 = sd_model.cond_stage_model.encode_with_transformer(ids)
        sd_model.load_state_dict(snap)
    assert relative_effect(engine, base) > 1e-4  # the adapter does something
    assert effect_error(a1111, engine, base) < 1e-3  # and merging it gives the effect the hooks give


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
    """Each model A1111 may have loaded that the tab cannot train on is refused with one line saying what to do."""
    class SD1Cond(nn.Module):  # ldm FrozenCLIPEmbedder: .transformer (HF CLIP), no .model
        def __init__(self):
            super().__init__()
            self.transformer = nn.Linear(2, 2)

    class Fake:
        parameterization = "eps"

    def refused(model, match, **kw):
        with pytest.raises(UnsupportedModelError, match=match) as error:
            ab.A1111Backend(model, tokenizer=tokenizer, **kw)
        assert "\n" not in str(error.value)

    sd1 = Fake()
    sd1.cond_stage_model = nn.Module()
    sd1.cond_stage_model.wrapped = SD1Cond()
    refused(sd1, "1.x")
    sdxl = Fake()  # A1111 SDXL: sd_model.conditioner (sgm GeneralConditioner with .embedders)
    sdxl.conditioner = sdxl.cond_stage_model = nn.Module()
    sdxl.cond_stage_model.embedders = nn.ModuleList()
    refused(sdxl, "SDXL")
    forge = Fake()
    forge.forge_objects = object()
    refused(forge, "Forge")
    refused(None, "no model is loaded")
    narrow = Fake()
    narrow.cond_stage_model = FrozenOpenCLIPEmbedder(TextCLIP(width=32, layers=2, heads=2, vocab=8))
    refused(narrow, "32 wide, SD 2.x's is 1024")
    refused(sd_model, "--lowvram/--medvram", medvram=True)
    refused(sd_model, "--lowvram/--medvram", lowvram=True)
    for key in ("hybrid", "concat", "crossattn-adm"):  # SD 2.x inpainting / depth / unCLIP
        sd_model.model.conditioning_key = key
        try:
            refused(sd_model, f"{key!r} \\(inpainting, depth or unCLIP\\)")
        finally:
            del sd_model.model.conditioning_key
    sd_model.model.conditioning_key = "crossattn"
    try:
        ab.A1111Backend(sd_model, tokenizer=tokenizer)  # SD 2.x text-to-image: accepted
    finally:
        del sd_model.model.conditioning_key
    embedder = sd_model.cond_stage_model
    embedder.layer, embedder.layer_idx = "last", 0
    try:
        refused(sd_model, "penultimate")
    finally:
        del embedder.layer
        embedder.layer_idx = 1
    b = ab.A1111Backend(sd_model, tokenizer=tokenizer)
    fc = sd_model.cond_stage_model.model.transformer.resblocks[0].mlp.c_fc
    fc.network_current_names = (("mylora", 1.0, 1.0, None),)
    try:
        with pytest.raises(UnsupportedModelError, match="mylora .*generate once without"):
            with b.session():
                pass
    finally:
        del fc.network_current_names
    with b.session():  # and accepted again once the LoRA is gone
        pass


# ---------------------------------------------------------------------------- the twin of a diffusers pipeline

TWIN_LAYERS = 3  # diffusers' text encoder (already without SD2's skipped last layer); open_clip has one more


@pytest.fixture(scope="module")
def twin():
    """A tiny 1024-wide diffusers pipeline and an A1111-shaped model carrying exactly its weights."""
    pipe = build_pipeline(seed=0, width=1024, layers=TWIN_LAYERS)
    clip = TextCLIP(width=1024, layers=TWIN_LAYERS + 1, heads=pipe.text_encoder.config.num_attention_heads)
    missing, unexpected = clip.load_state_dict(text_encoder_to_ldm(pipe.text_encoder), strict=False)
    assert not missing and set(unexpected) == {"text_projection", "logit_scale"}
    model = LatentDiffusionLike(clip, pipe.unet, pipe.vae, "v", pipe.scheduler.alphas_cumprod).eval()
    return pipe, model


def twin_backend(pipe, model):
    return ab.A1111Backend(model, tokenizer=lambda prompts: DiffusersBackend(pipe).tokenize(prompts),
                           latent_size=DiffusersBackend(pipe).latent_size)


def test_conditioning_matches_diffusers_and_routing_changes_nothing(twin, tokenizer):
    pipe, model = twin
    b = twin_backend(pipe, model)
    prompts = ["a photo of a red square", "An Oil-Painting of a dog!", ""]
    ids = b.tokenize(prompts)
    assert torch.equal(ids, tokenizer(prompts))  # the diffusers tokenizer pads as A1111 does for SD2
    with torch.no_grad():
        hf = pipe.text_encoder(ids)[0]
        ours = b.encode_ids(ids)
        with b.session():
            routed = b.encode_ids(ids)
    assert relative_error(ours, hf) < 1e-5
    assert torch.equal(routed, ours)
    assert b.num_layers == DiffusersBackend(pipe).num_layers == TWIN_LAYERS
    assert b.schedule.prediction_type == "v_prediction"
    assert torch.equal(b.schedule.alphas_cumprod, DiffusersBackend(pipe).schedule.alphas_cumprod.float())


def test_adapter_made_in_a1111_is_the_cli_file_and_loads_in_diffusers(twin, tmp_path):
    """Same keys, shapes, metadata keys and base fingerprint as the diffusers backend's (CLI / ComfyUI) file for the
    same run; diffusers' load_lora_weights applies it with the conditioning the engine trained against."""
    from safetensors import safe_open

    pipe, model = twin
    b = twin_backend(pipe, model)
    reference = DiffusersBackend(pipe)
    snap = snapshot(model)
    config = EraseConfig(concept="a red square", steps=3, lr=5e-2, lora=LoraConfig(preset="all", rank=2))
    with b.session():
        ours = erase(b, config, images(2))
    theirs = erase(reference, config, images(2))
    assert_unchanged(model, snap)
    assert base_fingerprint(b) == base_fingerprint(reference)
    a = write_adapter(tmp_path / "a1111.safetensors", ours.deltas, base_fingerprint(b), ours.info())
    d = write_adapter(tmp_path / "cli.safetensors", theirs.deltas, base_fingerprint(reference), theirs.info())
    with safe_open(str(a), "pt") as fa, safe_open(str(d), "pt") as fd:
        assert set(fa.keys()) == set(fd.keys()) and any("_self_attn_q_proj." in k for k in fa.keys())
        assert all(fa.get_tensor(k).shape == fd.get_tensor(k).shape for k in fa.keys())
        assert set(fa.metadata()) == set(fd.metadata())
        assert fa.metadata()["ss_base_model_version"] == "sd_v2" and fa.metadata()["ss_v2"] == "True"
    # same model, same seed: the same training up to float rounding. Rounding differs between CPUs' kernels (the
    # twin computes attention with a fused in_proj, diffusers with three matrices) and Adam amplifies it a little
    # every step (0.0012 max on an AMD EPYC), so it is measured against the size of all trained deltas together.
    # Measured: 3e-6 with AVX-512 kernels, 3e-4 with AVX2 ones (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2;
    # largest element difference 0.0009); deltas 5 % off (a scale or learning-rate error) give 5e-2
    def stacked(deltas, scale=1.0):
        return torch.cat([scale * deltas.delta_weight(t).detach().flatten() for t in deltas.targets])
    assert ours.deltas.targets == theirs.deltas.targets
    assert relative_error(stacked(ours.deltas), stacked(theirs.deltas)) < 1e-2
    assert relative_error(stacked(ours.deltas), stacked(theirs.deltas, scale=0.95)) > 1e-2  # a 5 % mismatch shows
    read_adapter(a, reference)  # the diffusers side accepts it as made for its base model

    ids = b.tokenize(["a photo of a red square"])
    with torch.no_grad(), b.session():
        with read_adapter(a, b).deltas.inject(b.linear):
            engine = b.encode_ids(ids)
    fresh = build_pipeline(seed=0, width=1024, layers=TWIN_LAYERS)
    with torch.no_grad():
        before = fresh.text_encoder(ids)[0]
    fresh.load_lora_weights(str(a))
    with torch.no_grad():
        loaded = fresh.text_encoder(ids)[0]
    assert relative_effect(loaded, before) > 1e-3  # the adapter does something
    assert effect_error(loaded, engine, before) < 1e-3  # and diffusers applies the effect the engine trained


# ---------------------------------------------------------------------------- A1111's hijack, stood in for

class EmbeddingsWithFixes(nn.Module):
    """modules/sd_hijack.py EmbeddingsWithFixes: wraps the nn.Embedding; fixes are None outside A1111's encode."""

    def __init__(self, wrapped, embeddings):
        super().__init__()
        self.wrapped = wrapped
        object.__setattr__(self, "embeddings", embeddings)  # A1111's model_hijack: not a submodule

    def forward(self, input_ids):
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        assert not batch_fixes
        return self.wrapped(input_ids)


class PromptChunk:
    def __init__(self, tokens, multipliers, fixes):
        self.tokens, self.multipliers, self.fixes = tokens, multipliers, fixes


class HijackedCond(nn.Module):
    """FrozenOpenCLIPEmbedderWithCustomWords' tokenize_line / id_* (no emphasis parser: '(' marks weight 1.1,
    a word in ``embeddings`` marks a textual-inversion fix), around ldm's FrozenOpenCLIPEmbedder."""

    def __init__(self, wrapped, hf_tokenizer, embeddings=()):
        super().__init__()
        self.wrapped, self.tok, self.known = wrapped, hf_tokenizer, set(embeddings)
        self.id_start, self.id_end, self.id_pad = 49406, 49407, 0
        self.hijack = type("ModelHijack", (), {"fixes": None})()
        wrapped.model.token_embedding = EmbeddingsWithFixes(wrapped.model.token_embedding, self.hijack)

    def tokenize_line(self, line):
        tokens = self.tok(line.replace("(", "").replace(")", ""), add_special_tokens=False).input_ids
        weight = 1.1 if "(" in line else 1.0
        fixes = [w for w in line.split() if w in self.known]
        chunks = []
        for i in range(0, max(len(tokens), 1), 75):
            part = tokens[i:i + 75]
            body = part + [self.id_end] * (75 - len(part))
            chunks.append(PromptChunk([self.id_start] + body + [self.id_end],
                                      [1.0] + [weight] * len(part) + [1.0] * (76 - len(part)), fixes))
        return chunks, len(tokens)


def test_a1111_tokenizer_path_and_wrapped_embedding(sd_model_factory, tokenizer):
    from transformers import CLIPTokenizer

    model = sd_model_factory()
    hf = CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "tokenizer"))
    model.cond_stage_model = HijackedCond(model.cond_stage_model, hf, embeddings=("my-style",))
    b = ab.A1111Backend(model)  # no tokenizer given: A1111's tokenize_line is used
    prompts = ["a photo of a cat", "", "a red car, blue sky"]
    assert torch.equal(b.tokenize(prompts), tokenizer(prompts))  # zeros after the first end, as process_tokens
    with pytest.raises(ValueError, match="emphasis"):
        b.tokenize(["a (cat)"])
    with pytest.raises(ValueError, match="names an A1111 embedding"):
        b.tokenize(["a painting in my-style"])
    with pytest.raises(ValueError, match="longer than 75 tokens"):
        b.tokenize([" ".join(["cat"] * 80)])
    inner = model.cond_stage_model.wrapped.model.token_embedding.wrapped
    assert b.token_embedding() is inner and isinstance(inner, nn.Embedding)
    snap = snapshot(model)
    start = init_vectors(b, "object", 1)
    with b.session():  # the vectors are spliced in (and get gradients) through the wrapped nn.Embedding
        result = learn_token(b, images(2), TokenConfig(token="<tok>", init_word="object", steps=2, lr=1e-2))
    assert relative_effect(result.token.vectors, start) > 1e-4
    assert_unchanged(model, snap)
