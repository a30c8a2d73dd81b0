"""open_clip <-> canonical mapping for the A1111 host, on a small model of open_clip's structure.

open_clip itself cannot be imported here (open-clip-torch 2.20 imports torchvision at package import), so the
model below rebuilds the parts A1111's SD2 conditioning runs through, as read from open-clip-torch 2.20
(open_clip/transformer.py: ResidualAttentionBlock, LayerNorm casting to float and back, the causal float mask
from CLIP.build_attention_mask) and from A1111's FrozenOpenCLIPEmbedder.encode_with_transformer
(repositories/stable-diffusion-stability-ai ldm/modules/encoders/modules.py: token embedding + positions,
NLD -> LND, resblocks up to len - layer_idx (penultimate: 1), LND -> NLD, ln_final).
The expected LoRA merge and key names are A1111's extensions-builtin/Lora networks.py rules as re-implemented in
tests/a1111_reference.py (network_apply_weights: q/k/v up@down*alpha/rank concatenated into in_proj_weight, out into
out_proj.weight, c_fc / c_proj directly; convert_diffusers_name_to_compvis (SD2 branch) and re_x_proj).
"""
from __future__ import annotations

import importlib.util
import re
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_core.lora import Deltas
from unlearn_core.targets import Target, resolve_targets

sys.path.insert(0, str(Path(__file__).parent))
import a1111_reference as ref  # noqa: E402
from closeness import effect_error, relative_effect, relative_error  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "concept_unlearn_openclip.py"
_spec = importlib.util.spec_from_file_location("concept_unlearn_openclip", _PATH)
oc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oc)


class LayerNorm(nn.LayerNorm):  # open_clip's: computes in the input dtype, casts back
    def forward(self, x):
        orig = x.dtype
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(orig)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.ln_1 = LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ls_2 = nn.Identity()

    def attention(self, q_x, attn_mask=None):
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, q_x, q_x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, q_x, attn_mask=None):
        x = q_x + self.ls_1(self.attention(self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class TextCLIP(nn.Module):
    """The text half of open_clip's CLIP (the names A1111's network_layer_mapping sees under .wrapped.model)."""

    def __init__(self, width=32, layers=4, heads=4, ctx=77, vocab=49408):
        super().__init__()
        self.transformer = Transformer(width, layers, heads)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.01)
        self.ln_final = LayerNorm(width)
        mask = torch.empty(ctx, ctx).fill_(float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)


def encode_with_transformer(model: TextCLIP, ids, layer_idx=1):
    x = model.token_embedding(ids) + model.positional_embedding
    x = x.permute(1, 0, 2)
    for i, r in enumerate(model.transformer.resblocks):
        if i == len(model.transformer.resblocks) - layer_idx:
            break
        x = r(x, attn_mask=model.attn_mask)
    return model.ln_final(x.permute(1, 0, 2))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = TextCLIP()
    with torch.no_grad():  # non-trivial biases
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def ids(batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(batch, 77, dtype=torch.long)
    x[:, 0] = 49406
    x[:, 1:9] = torch.randint(300, 40000, (batch, 8), generator=g)
    x[:, 9] = 49407
    return x


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(m, snap):
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


def linear_for(splits, model):
    def get(t: Target):
        if t.proj in oc.ATTENTION:
            return splits[t.layer].proxy(t.proj)
        return oc.mlp_linear(model.transformer.resblocks[t.layer], t.proj)
    return get


def test_split_and_join_in_proj_exactly(model):
    w = model.transformer.resblocks[0].attn.in_proj_weight
    q, k, v = oc.split_in_proj(w)
    assert q.data_ptr() == w.data_ptr() and q.shape == (32, 32)  # views, no copy
    assert torch.equal(ref.join_in_proj(q, k, v), w)
    assert torch.equal(ref.join_in_proj(*oc.split_in_proj(model.transformer.resblocks[0].attn.in_proj_bias)),
                       model.transformer.resblocks[0].attn.in_proj_bias)
    with pytest.raises(ValueError, match="multiple of 3"):
        oc.split_in_proj(torch.zeros(4, 2))


@pytest.mark.parametrize("grad", [False, True])
def test_routed_attention_is_bit_identical_to_stock(model, grad):
    x = ids()
    with torch.set_grad_enabled(grad):
        stock = encode_with_transformer(model, x)
        with oc.routed_attention(model.transformer.resblocks):
            routed = encode_with_transformer(model, x)
    assert torch.equal(stock, routed)
    assert all("forward" not in b.attn.__dict__ for b in model.transformer.resblocks)


def test_proxies_expose_views_of_the_same_weights(model):
    block = model.transformer.resblocks[1]
    with oc.routed_attention(model.transformer.resblocks) as splits:
        s = splits[1]
        for i, proj in enumerate("qkv"):
            w = s.proxy(proj).weight
            assert w.shape == (32, 32) and w.data_ptr() == block.attn.in_proj_weight[32 * i:].data_ptr()
        assert s.proxy("out").weight is block.attn.out_proj.weight


def test_gradients_reach_every_delta_and_model_is_unchanged(model):
    snap = snapshot(model)
    targets = resolve_targets("all", num_layers=3)
    shapes = {t: tuple(linear_for([oc.SplitAttention(b.attn) for b in model.transformer.resblocks], model)(t).weight.shape)
              for t in targets}
    deltas = Deltas(shapes, rank=2, seed=0)
    with torch.no_grad():
        for p in deltas.up.values():
            p.normal_(0, 0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    with oc.routed_attention(model.transformer.resblocks) as splits, deltas.inject(linear_for(splits, model)):
        encode_with_transformer(model, ids()).pow(2).mean().backward()
    for name, p in list(deltas.down.items()) + list(deltas.up.items()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert same(model, snap)
    assert all("forward" not in b.attn.__dict__ for b in model.transformer.resblocks)


def test_restored_after_an_error(model):
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with oc.routed_attention(model.transformer.resblocks):
            encode_with_transformer(model, ids())
            raise RuntimeError("boom")
    assert all("forward" not in b.attn.__dict__ for b in model.transformer.resblocks)
    assert same(model, snap)
    assert torch.equal(encode_with_transformer(model, ids()), encode_with_transformer(model, ids()))


def test_refuses_an_already_patched_attention(model):
    model.transformer.resblocks[0].attn.forward = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="already patched"):
        with oc.routed_attention(model.transformer.resblocks):
            pass
    assert "forward" in model.transformer.resblocks[0].attn.__dict__  # someone else's patch is left alone
    assert all("forward" not in b.attn.__dict__ for b in model.transformer.resblocks[1:])


def test_a1111_names_exist_in_the_open_clip_module_tree(model):
    """Every key of an adapter converts (A1111 SD2 rules) to a name A1111 registers for a module."""
    # assign_network_names_to_compvis_modules: named_modules() of cond_stage_model.wrapped, '.' -> '_'
    wrapped = nn.Module()
    wrapped.model = model
    mapping = {name.replace(".", "_"): module for name, module in wrapped.named_modules()}
    re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")
    targets = resolve_targets("all", num_layers=3)
    for t in targets:
        name = ref.a1111_layer_name(t.layer, t.proj)
        module = mapping.get(name)
        if module is None and re_x_proj.match(name):
            module = mapping.get(re_x_proj.match(name).group(1))
        block = model.transformer.resblocks[t.layer]
        expected = {"fc1": block.mlp.c_fc, "fc2": block.mlp.c_proj, "out": block.attn.out_proj}.get(t.proj, block.attn)
        assert module is expected, (t, name)
    # kohya key -> A1111 name, exactly as convert_diffusers_name_to_compvis (SD2) builds it
    assert ref.a1111_layer_name(5, "fc1") == "model_transformer_resblocks_5_mlp_c_fc"
    assert ref.a1111_layer_name(22, "q") == "model_transformer_resblocks_22_attn_q_proj"
    assert Target(22, "q").kohya_name.replace("lora_te_text_model_encoder_layers_", "model_transformer_resblocks_") \
        .replace("self_attn", "attn") == ref.a1111_layer_name(22, "q")


def test_hooked_deltas_equal_a1111_style_merged_weights(model):
    """The conditioning the engine trains against equals the one A1111 produces after merging the saved file."""
    targets = resolve_targets("fewshot", num_layers=3)
    shapes = {t: (128, 32) if t.proj == "fc1" else ((32, 128) if t.proj == "fc2" else (32, 32)) for t in targets}
    deltas = Deltas(shapes, rank=4, alpha=2.0, seed=3)
    with torch.no_grad():
        for p in deltas.up.values():
            p.normal_(0, 0.2)
    x = ids()
    with torch.no_grad():
        base = encode_with_transformer(model, x)
        with oc.routed_attention(model.transformer.resblocks) as splits, deltas.inject(linear_for(splits, model)):
            hooked = encode_with_transformer(model, x)
        merged = ref.merged_weights(model.transformer.resblocks, deltas.to_kohya(torch.float32), strength=1.0)
        assert set(merged) == {f"{n}.mlp.c_fc.weight" for n in range(3)} | {f"{n}.mlp.c_proj.weight" for n in range(3)} \
            | {"2.attn.in_proj_weight", "2.attn.out_proj.weight"}
        snap = snapshot(model)
        params = dict(model.transformer.resblocks.named_parameters())
        for name, value in merged.items():
            params[name].copy_(value)
        after = encode_with_transformer(model, x)
        model.load_state_dict(snap)
    assert relative_effect(hooked, base) > 1e-3  # the adapter does something
    assert effect_error(after, hooked, base) < 1e-3  # merging the file gives the effect the hooks give


def test_like_a1111_incomplete_attention_and_unknown_keys_are_ignored_silently(model):
    """A1111 v1.10 networks.py: attention only with all of q, k, v and out (else nothing for that block, no error);
    keys that match no module are dropped with a debug log; the MLP of the same file still applies."""
    deltas = Deltas({Target(0, "q"): (32, 32), Target(0, "k"): (32, 32), Target(0, "v"): (32, 32),
                     Target(1, "fc1"): (128, 32)}, rank=2)
    with torch.no_grad():
        for p in deltas.up.values():
            p.normal_(0, 0.2)
    tensors = deltas.to_kohya(torch.float32) | {"lora_unet_x.lora_down.weight": torch.zeros(1),
                                                 "lora_te_text_model_encoder_layers_7_mlp_fc1.alpha": torch.tensor(1.0)}
    merged = ref.merged_weights(model.transformer.resblocks, tensors)
    assert set(merged) == {"1.mlp.c_fc.weight"}  # q/k/v without out: attention untouched
    assert ref.unmatched_keys(tensors, layers=4) == ["lora_te_text_model_encoder_layers_7_mlp_fc1.alpha",
                                                      "lora_unet_x.lora_down.weight"]
    # A1111 reads the layer number with int(): non-canonical spellings reach the layer (diffusers skips them)
    odd = {k.replace("layers_1_", "layers_01_"): v for k, v in deltas.to_kohya(torch.float32).items() if "_1_" in k}
    assert set(ref.kohya_to_a1111(odd, layers=4)) == {"model_transformer_resblocks_1_mlp_c_fc"}


def test_like_a1111_on_a_gpu_the_update_is_computed_and_added_in_float16(model):
    """devices.dtype float16: lora_up @ lora_down in float16, scaled in float16, added to the float16 weight."""
    deltas = Deltas({Target(0, "fc1"): (128, 32)}, rank=4, alpha=3.0)
    with torch.no_grad():
        deltas.up["0_fc1"].normal_(0, 0.3)
    tensors = deltas.to_kohya(torch.float32)
    half = model.half()
    merged = ref.merged_weights(half.transformer.resblocks, tensors, strength=0.7, dtype=torch.float16)["0.mlp.c_fc.weight"]
    up, down = tensors[f"{Target(0, 'fc1').kohya_name}.lora_up.weight"], tensors[f"{Target(0, 'fc1').kohya_name}.lora_down.weight"]
    expected = half.transformer.resblocks[0].mlp.c_fc.weight + (up.half() @ down.half()) * (3.0 / 4) * 0.7
    assert merged.dtype == torch.float16 and torch.equal(merged, expected)
    exact = half.transformer.resblocks[0].mlp.c_fc.weight.float() + (up @ down) * 0.75 * 0.7
    assert 0 < relative_error(merged, exact) < 1e-2  # float16 rounding, not float32 arithmetic


OPEN_CLIP = __import__("os").environ.get("CONCEPT_UNLEARN_OPEN_CLIP")
needs_open_clip = pytest.mark.skipif(not OPEN_CLIP, reason="set CONCEPT_UNLEARN_OPEN_CLIP to an installed open_clip "
                                     "package folder (2.20; its tokenizer needs ftfy and regex)")


@pytest.fixture
def real_open_clip(monkeypatch):
    """open_clip's own transformer.py and tokenizer.py, loaded from its files. Its package __init__ imports
    torchvision (absent or built for another torch in test venvs), needed only by its vision utils: stubbed."""
    import types

    import transformers  # noqa: F401  (imported first: it probes torchvision's module spec, which the stub lacks)

    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = nn.BatchNorm2d
    package = types.ModuleType("open_clip")
    package.__path__ = [OPEN_CLIP]
    for name, module in {"torchvision": types.ModuleType("torchvision"), "torchvision.ops": types.ModuleType("x"),
                         "torchvision.ops.misc": misc, "open_clip": package}.items():
        monkeypatch.setitem(sys.modules, name, module)
    loaded = []
    for name in ("transformer", "tokenizer"):
        spec = importlib.util.spec_from_file_location(f"open_clip.{name}", Path(OPEN_CLIP) / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, f"open_clip.{name}", module)
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded


@needs_open_clip
def test_routing_is_bit_identical_on_real_open_clip(real_open_clip):
    """open_clip's own Transformer: routed = stock exactly, with and without grad; deltas on the proxies change it."""
    transformer, _ = real_open_clip
    torch.manual_seed(0)
    tr = transformer.Transformer(width=64, layers=3, heads=4).eval()
    mask = torch.empty(77, 77).fill_(float("-inf")).triu_(1)
    x = torch.randn(77, 2, 64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            stock = tr(x, attn_mask=mask)
            with oc.routed_attention(tr.resblocks) as splits:
                routed = tr(x, attn_mask=mask)
                deltas = Deltas({Target(2, p): (64, 64) for p in oc.ATTENTION}, rank=2)
                with torch.no_grad():
                    for p in deltas.up.values():
                        p.normal_(0, 0.1)
                with deltas.inject(lambda t: splits[t.layer].proxy(t.proj)):
                    changed = tr(x, attn_mask=mask)
        assert torch.equal(stock, routed)
        assert relative_effect(changed, stock) > 1e-4
    assert all("forward" not in b.attn.__dict__ for b in tr.resblocks)


@needs_open_clip
def test_real_open_clip_text_tower_with_clip_text_model_weights_gives_diffusers_conditioning(real_open_clip):
    """open_clip 2.20's TextTransformer holding a CLIPTextModel's weights (tests/ldm_format.py, as SD2 files hold
    them), encoded as ldm's FrozenOpenCLIPEmbedder does (penultimate layer), equals the conditioning of diffusers'
    SD2 text encoder (a CLIPTextModel without the skipped last layer), routed or not; and open_clip's tokenizer
    gives the ids of SD2's CLIPTokenizer (pad id 0), which the tests' tokenizer stand-ins use. Needs transformers,
    not diffusers, so it also runs in a venv with A1111's pins."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from unlearn_core.diffusers_backend import CONFIG_DIR
    from ldm_format import text_encoder_to_ldm

    transformer, tokenizer = real_open_clip
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=64)
    encoder = CLIPTextModel(config).eval()
    text = transformer.TextTransformer(context_length=77, vocab_size=49408, width=config.hidden_size,
                                       heads=config.num_attention_heads, layers=config.num_hidden_layers + 1,
                                       output_dim=config.hidden_size).eval()
    missing, unexpected = text.load_state_dict(text_encoder_to_ldm(encoder), strict=False)
    assert not missing and set(unexpected) == {"logit_scale"}
    # no "!": SD2's CLIPTokenizer has "!" as its pad token and so encodes a "!" in the text as id 0, where
    # open_clip (A1111) encodes "!</w>" (256): a difference of the hosts' tokenizers, not of this code
    prompts = ["a photo of a red square", "An Oil-Painting   of  a dog, 3 cats.", ""]
    ids = tokenizer.tokenize(prompts)
    expected = CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "tokenizer"))(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    with torch.no_grad():
        stock = encode_with_transformer(text, ids)
        with oc.routed_attention(text.transformer.resblocks):
            routed = encode_with_transformer(text, ids)
        hf = encoder(ids)[0]
    assert torch.equal(stock, routed)
    assert relative_error(stock, hf) < 1e-5
