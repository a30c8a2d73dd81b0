"""open_clip (A1111's SD2 text encoder) <-> canonical names, checked against a transformers CLIPTextModel.

open_clip cannot be imported here (it imports torchvision), so ``OpenClipLike`` re-creates the text side
of open_clip 2.20's CLIP (token_embedding, positional_embedding, transformer.resblocks of
ResidualAttentionBlock(ln_1, attn=nn.MultiheadAttention, ln_2, mlp.c_fc/gelu/c_proj), seq-first,
attn_mask = -inf above the diagonal, ln_final) and ``Embedder.encode_with_transformer`` re-creates
ldm's FrozenOpenCLIPEmbedder (layer="penultimate"). Weights come from a tiny CLIPTextModel through
hf_to_open_clip, so the conditioning must equal diffusers' (whose SD2 text encoder has the last layer
removed and ends with final_layer_norm).
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import a1111_backend  # noqa: E402
import a1111_mapping as mapping  # noqa: E402
from unlearn_core.adapter_io import base_fingerprint, read_adapter, write_adapter  # noqa: E402
from unlearn_core.config import EraseConfig  # noqa: E402
from unlearn_core.diffusers_backend import DiffusersBackend  # noqa: E402
from unlearn_core.erase import erase  # noqa: E402
from unlearn_core.targets import Target  # noqa: E402
from unlearn_core.tiny import build_pipeline  # noqa: E402

torch.set_num_threads(1)
LAYERS = 3  # diffusers' (already truncated) text encoder; open_clip has one more resblock


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))

    def attention(self, q_x, attn_mask=None):
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, q_x, q_x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, x, attn_mask=None):
        x = x + self.attention(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class OpenClipLike(nn.Module):
    def __init__(self, width, layers, heads, vocab=49408, context=77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.register_buffer("attn_mask", torch.empty(context, context).fill_(float("-inf")).triu_(1),
                             persistent=False)


class Embedder(nn.Module):
    """ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder, layer='penultimate' (layer_idx=1)."""

    layer = "penultimate"

    def __init__(self, model):
        super().__init__()
        self.model, self.layer_idx = model, 1

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - self.layer_idx:
                break
            x = r(x, attn_mask=self.model.attn_mask)
        x = x.permute(1, 0, 2)
        return self.model.ln_final(x)


def open_clip_from(pipe, seed=0):
    """An open_clip text transformer carrying pipe.text_encoder's weights (+ one unused last resblock)."""
    config = pipe.text_encoder.config
    torch.manual_seed(seed)
    model = OpenClipLike(config.hidden_size, config.num_hidden_layers + 1, config.num_attention_heads)
    state = mapping.hf_to_open_clip(pipe.text_encoder.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    last = f"transformer.resblocks.{config.num_hidden_layers}."
    assert not unexpected and all(k.startswith(last) for k in missing), (missing, unexpected)
    return model.eval()


def open_clip_backend(pipe, embedder):
    reference = DiffusersBackend(pipe)
    tokenizer = pipe.tokenizer
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id

    def tokenize(prompts):
        return a1111_backend.open_clip_ids(lambda p: tokenizer.encode(p, add_special_tokens=False), prompts, start, end)

    return a1111_backend.OpenClipBackend(
        embedder, tokenize, reference.predict, reference.encode_images, reference.schedule,
        [embedder, pipe.unet, pipe.vae], torch.device("cpu"), latent_size=reference.latent_size)


@pytest.fixture(scope="module")
def tiny():
    pipe = build_pipeline(seed=0, layers=LAYERS)
    return pipe, Embedder(open_clip_from(pipe))


def test_state_dict_split_join_is_exact(tiny):
    pipe, embedder = tiny
    hf = pipe.text_encoder.state_dict()
    oc = mapping.hf_to_open_clip(hf)
    prefix = "text_model." if any(k.startswith("text_model.") for k in hf) else ""  # transformers 4 / 5
    back = mapping.open_clip_to_hf(oc, prefix)
    expected = {k: v for k, v in hf.items() if not k.endswith("position_ids")}
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    assert mapping.hf_to_open_clip(mapping.open_clip_to_hf(oc)).keys() == oc.keys()  # with text_model. too
    again = mapping.hf_to_open_clip(back)
    assert set(again) == set(oc) and all(torch.equal(again[k], oc[k]) for k in oc)
    w = embedder.model.transformer.resblocks[1].attn.in_proj_weight
    assert torch.equal(w[: w.shape[1]], hf[prefix + "encoder.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(w[2 * w.shape[1]:], hf[prefix + "encoder.layers.1.self_attn.v_proj.weight"])


def test_kohya_keys_per_block():
    keys = mapping.kohya_keys_for_block(7)
    assert keys["attn.in_proj_weight[k]"] == "lora_te_text_model_encoder_layers_7_self_attn_k_proj"
    assert keys["mlp.c_fc"] == "lora_te_text_model_encoder_layers_7_mlp_fc1"
    assert keys["mlp.c_proj"] == "lora_te_text_model_encoder_layers_7_mlp_fc2"
    assert keys["attn.out_proj"] == "lora_te_text_model_encoder_layers_7_self_attn_out_proj"


def test_conditioning_matches_diffusers(tiny):
    pipe, embedder = tiny
    ids = pipe.tokenizer(["a photo of a red square", ""], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hf = pipe.text_encoder(ids)[0]
        ours = embedder.encode_with_transformer(ids)
        plain = mapping.encode(embedder.model, ids)
        with mapping.split_attention(embedder.model):
            split = embedder.encode_with_transformer(ids)
    assert (ours - hf).abs().max() < 1e-5
    assert torch.equal(plain, ours)
    # SplitAttention runs the same math through scaled_dot_product_attention: equal within float rounding
    assert (split - ours).abs().max() < 1e-5


def test_split_attention_views_restore_and_gradients(tiny):
    _, embedder = tiny
    model = embedder.model
    originals = [b.attn for b in model.transformer.resblocks]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(77, 2, model.token_embedding.weight.shape[1])
    with mapping.split_attention(model) as split:
        attn = split[0]
        assert attn.q.weight.data_ptr() == originals[0].in_proj_weight.data_ptr()  # a view, no copy
        assert attn.k.weight.shape == (x.shape[-1], x.shape[-1])
        reference = originals[0](x, x, x, need_weights=False, attn_mask=model.attn_mask)[0]
        assert (attn(x, x, x, need_weights=False, attn_mask=model.attn_mask)[0] - reference).abs().max() < 1e-5
        delta = torch.zeros(x.shape[-1], requires_grad=True)
        handle = attn.k.register_forward_hook(lambda _m, _i, out: out + delta)
        attn(x, x, x, attn_mask=model.attn_mask)[0].square().sum().backward()
        handle.remove()
        assert delta.grad is not None and delta.grad.abs().sum() > 0
        with pytest.raises(ValueError):
            attn(x, x.clone(), x)
    assert [b.attn for b in model.transformer.resblocks] == originals
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapter_from_open_clip_path_matches_diffusers(tiny, tmp_path):
    pipe, embedder = tiny
    images = torch.rand(2, 3, 32, 32)
    config = EraseConfig(concept="a red square", steps=3, lr=5e-2)
    reference = DiffusersBackend(pipe)
    backend = open_clip_backend(pipe, embedder)
    assert backend.num_layers == reference.num_layers == LAYERS
    prompts = ["a photo of a red square", "a big dog, blue sky"]
    assert torch.equal(backend.tokenize(prompts), reference.tokenize(prompts))
    assert base_fingerprint(backend) == base_fingerprint(reference)

    with backend.session():
        ours = erase(backend, config, images)
    theirs = erase(reference, config, images)
    a = write_adapter(tmp_path / "a1111.safetensors", ours.deltas, base_fingerprint(backend), ours.info())
    b = write_adapter(tmp_path / "diffusers.safetensors", theirs.deltas, base_fingerprint(reference), theirs.info())
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        assert all(fa.get_tensor(k).shape == fb.get_tensor(k).shape for k in fa.keys())
        assert any("_self_attn_q_proj." in k for k in fa.keys())
    # same model, same seed: the two runs train the same deltas up to float rounding
    for t in ours.deltas.targets:
        assert (ours.deltas.delta_weight(t) - theirs.deltas.delta_weight(t)).abs().max() < 1e-3

    ids = backend.tokenize(["a photo of a red square"])
    with torch.no_grad(), backend.session():
        adapter = read_adapter(a, backend)  # checks shapes against backend.linear (q/k/v need the session)
        with adapter.deltas.inject(backend.linear):
            engine = backend.encode_ids(ids)
    fresh = build_pipeline(seed=0, layers=LAYERS)
    with torch.no_grad():
        before = fresh.text_encoder(ids)[0]
    fresh.load_lora_weights(str(a))
    with torch.no_grad():
        loaded = fresh.text_encoder(ids)[0]
    assert (loaded - before).abs().max() > 1e-3
    assert (loaded - engine).abs().max() < 1e-4
    # the host's modules are back as they were
    assert all(isinstance(b.attn, nn.MultiheadAttention) for b in embedder.model.transformer.resblocks)


def test_qkv_outside_session_is_refused(tiny):
    pipe, embedder = tiny
    backend = open_clip_backend(pipe, embedder)
    assert isinstance(backend.linear(Target(0, "fc1")), nn.Linear)
    with pytest.raises(RuntimeError, match="session"):
        backend.linear(Target(0, "q"))
    with pytest.raises(ValueError, match="no projection"):
        backend.linear(Target(LAYERS, "fc1"))
