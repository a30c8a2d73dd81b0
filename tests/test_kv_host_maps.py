"""The UNet key/value edit's name maps for the LDM UNets ComfyUI and A1111 hold (no host needed).

The engine names the cross-attention projections by their diffusers paths; ComfyUI and A1111 hold the UNet in the
CompVis / Stability (LDM) layout. ``kv_edit.name_from_ldm`` is checked against diffusers' own layout through
tests/ldm_format.py (the inverse of diffusers' single-file converter); the A1111 backend's ``cross_attention_kv``
over an LDM-named module tree carrying a diffusers UNet's weights must hand back, under every canonical name, the
weights diffusers has under that name. The ComfyUI side is checked against comfy.utils' own map in
tests/test_comfy_kv_integration.py (COMFYUI_PATH), A1111's loader in tests/test_a1111_kv_real.py (A1111_PATH).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from unlearn_core.kv_edit import (KVDeltas, UnsupportedOption, is_kv_name, kohya_name, ldm_kv_modules, ldm_name,
                                  name_from_kohya, name_from_ldm)

sys.path.insert(0, str(Path(__file__).parent))
from ldm_format import unet_to_ldm  # noqa: E402
from comfy_pack import load_pack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# SD 2.x's UNet: attention in down levels 0-2 (2 each), the middle, up levels 1-3 (3 each): 16 blocks, 32 projections
SD2_LDM = ([f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
           + [f"output_blocks.{i}.1" for i in range(3, 12)])
SD2_DIFFUSERS = ([f"down_blocks.{b}.attentions.{j}" for b in range(3) for j in range(2)] + ["mid_block.attentions.0"]
                 + [f"up_blocks.{b}.attentions.{j}" for b in range(1, 4) for j in range(3)])


def test_sd2_blocks_map_both_ways():
    for ldm, diffusers in zip(SD2_LDM, SD2_DIFFUSERS):
        for proj in ("to_k", "to_v"):
            for depth in (0, 1):
                a, b = f"{ldm}.transformer_blocks.{depth}.attn2.{proj}", f"{diffusers}.transformer_blocks.{depth}.attn2.{proj}"
                assert name_from_ldm(a) == b and ldm_name(b) == a
                assert name_from_kohya(kohya_name(b)) == b


@pytest.mark.parametrize("path", [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_k",  # self-attention
    "input_blocks.1.1.transformer_blocks.0.attn2.to_q",  # reads the image, not the text
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0",
    "input_blocks.3.1.transformer_blocks.0.attn2.to_k",  # slot 3 is level 0's downsampler
    "input_blocks.0.1.transformer_blocks.0.attn2.to_k",  # conv_in
    "middle_block.0.transformer_blocks.0.attn2.to_k",
    "input_blocks.01.1.transformer_blocks.0.attn2.to_k",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k",
])
def test_other_modules_are_not_projections(path):
    assert name_from_ldm(path) is None


def _diffusers_unet(layers_per_block: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=(32, 32, 64, 64), cross_attention_dim=48, attention_head_dim=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, use_linear_projection=True).eval()


def ldm_tree(state: dict[str, torch.Tensor], res_blocks: int) -> nn.Module:
    """An LDM-named module tree holding, as bias-free Linears, every ``...attn2.to_k/to_v`` (and attn1.to_k, attn2.to_q,
    to make sure they are not picked) weight of an LDM state dict; ``num_res_blocks`` as ldm's UNetModel keeps it."""
    root = nn.Module()
    for key, value in state.items():
        path = key.removesuffix(".weight")
        if not (path.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_k", "attn2.to_q")) and key.endswith(".weight")):
            continue
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        linear = nn.Linear(value.shape[1], value.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(value)
        node.add_module(leaf, linear)
    root.num_res_blocks = [res_blocks] * 4
    return root


@pytest.mark.parametrize("res_blocks", [1, 2, 3])
def test_name_from_ldm_inverts_diffusers_layout(res_blocks):
    unet = _diffusers_unet(res_blocks)
    ldm = unet_to_ldm(unet)
    diffusers = {n: m for n, m in unet.named_modules() if is_kv_name(n)}
    tree = ldm_tree(ldm, res_blocks)
    modules = ldm_kv_modules(tree, res_blocks)
    assert set(modules) == set(diffusers) and len(diffusers) == 2 * (3 * res_blocks + 1 + 3 * (res_blocks + 1))
    for name, module in modules.items():
        assert torch.equal(module.weight, diffusers[name].weight), name


def _a1111_backend_module():
    path = REPO / "scripts" / "concept_unlearn_a1111_backend.py"
    spec = importlib.util.spec_from_file_location("concept_unlearn_a1111_backend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a1111_backend_names_an_ldm_unet_as_diffusers_does():
    ab = _a1111_backend_module()
    unet = _diffusers_unet(2)
    tree = ldm_tree(unet_to_ldm(unet), 2)
    modules = ab.a1111_kv_modules(tree)
    diffusers = {n: m for n, m in unet.named_modules() if is_kv_name(n)}
    assert set(modules) == set(diffusers) and len(modules) == 32
    for name, module in modules.items():
        assert torch.equal(module.weight, diffusers[name].weight), name
    # the backend method is this map over sd_model.model.diffusion_model
    fake = type("B", (), {})()
    fake.sd_model = nn.Module()
    fake.sd_model.model = nn.Module()
    fake.sd_model.model.diffusion_model = tree
    assert ab.A1111Backend.cross_attention_kv(fake) == modules


def test_a1111_backend_refuses_layouts_its_loader_would_misplace():
    ab = _a1111_backend_module()
    one = ldm_tree(unet_to_ldm(_diffusers_unet(1)), 1)
    with pytest.raises(UnsupportedOption, match="A1111's Lora loader"):
        ab.a1111_kv_modules(one)
    with pytest.raises(UnsupportedOption, match="turn the option off"):
        ab.a1111_kv_modules(_diffusers_unet(2))  # diffusers layout: not what A1111 holds


def test_file_keys_round_trip_through_the_ldm_names():
    """A KVDeltas over every SD2 projection writes keys that name_from_kohya and ldm_name take back to the LDM path."""
    names = [f"{d}.transformer_blocks.0.attn2.{p}" for d in SD2_DIFFUSERS for p in ("to_k", "to_v")]
    deltas = KVDeltas({n: (torch.ones(4, 1), torch.ones(1, 6)) for n in names})
    bases = {k.partition(".")[0] for k in deltas.to_kohya(torch.float32)}
    assert {ldm_name(name_from_kohya(b)) for b in bases} == {f"{l}.transformer_blocks.0.attn2.{p}" for l in SD2_LDM
                                                             for p in ("to_k", "to_v")}


# ---------------------------------------------------------------------------- ComfyUI nodes (declarations, no ComfyUI)

PACK = "concept_unlearn_kvmaps"


@pytest.fixture(scope="module")
def pack():
    return load_pack(PACK)


def test_unlearn_node_offers_the_edit_and_apply_takes_the_model(pack):
    unlearn = pack.NODE_CLASS_MAPPINGS["UnlearnConceptLoRA|ConceptUnlearn"]
    spec = unlearn.INPUT_TYPES()["optional"]["unet_kv_edit"]
    assert spec[0] == "BOOLEAN" and spec[1]["default"] is True and "MODEL" in spec[1]["tooltip"]  # the default
    # widgets are only ever appended (saved workflows keep theirs): unet_kv_edit, then the newer erase_after
    assert list(unlearn.INPUT_TYPES()["optional"])[-2:] == ["unet_kv_edit", "erase_after"]
    on = unlearn.config("a cat", "", "contextual", "object", "fewshot", 2, 2, 1e-3, "", "", 0, unet_kv_edit=True)
    default = unlearn.config("a cat", "", "contextual", "object", "fewshot", 2, 2, 1e-3, "", "", 0)
    off = unlearn.config("a cat", "", "contextual", "object", "fewshot", 2, 2, 1e-3, "", "", 0, unet_kv_edit=False)
    assert on.unet_kv_edit and default.unet_kv_edit and not off.unet_kv_edit
    # the one switch is the contextual method's: the others ignore it (as the tooltip says)
    anchor = unlearn.config("a cat", "", "anchor", "object", "fewshot", 2, 2, 1e-3, "", "", 0, unet_kv_edit=True)
    assert not anchor.unet_kv_edit
    apply_ = pack.NODE_CLASS_MAPPINGS["ApplyErasureAdapter|ConceptUnlearn"]
    declared = apply_.INPUT_TYPES()
    assert list(declared["required"]) == ["clip", "strength", "lora_name"]  # widgets as before
    assert declared["optional"]["model"][0] == "MODEL" and "model" not in declared["required"]
    assert apply_.RETURN_TYPES[0] == "CLIP" and apply_.RETURN_TYPES[1] == "MODEL"  # CLIP stays output 0


def _adapter(pack, with_unet: bool):
    host = sys.modules[f"{PACK}.nodes.host"]
    from unlearn_core.lora import Deltas
    from unlearn_core.targets import Target

    deltas = Deltas({Target(0, "fc1"): (8, 6)}, rank=2, seed=0)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    unet = KVDeltas({name: (torch.randn(5, 2), torch.randn(2, 6))}) if with_unet else None
    return host, host.ErasureAdapter(deltas, None, {"concept": "a cat"}, unet=unet)


def test_the_wire_carries_the_unet_edit_into_the_file_and_back(pack):
    host, adapter = _adapter(pack, True)
    tensors = adapter.kohya_tensors()
    assert {k.partition(".")[0] for k in tensors} == {"lora_te_text_model_encoder_layers_0_mlp_fc1",
                                                     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"}
    assert adapter.edits_unet and adapter.summary()["unet_modules"] == 1
    stored = adapter.as_stored()
    assert "concept_unlearn.unet_kv_edit" in stored.metadata
    back = host.ErasureAdapter.from_stored(stored)
    assert back.edits_unet and back.unet.names == adapter.unet.names
    name = adapter.unet.names[0]
    assert torch.allclose(back.unet.delta_weight(name), adapter.unet.delta_weight(name), rtol=2e-3, atol=1e-3)
    assert "unet modules: 1" in host.display_lines(adapter.summary())


def test_apply_without_a_model_refuses_an_adapter_that_edits_the_unet(pack):
    host, adapter = _adapter(pack, True)
    with pytest.raises(ValueError, match="connect the MODEL"):
        host.apply_to_models(None, object(), adapter, 1.0)
