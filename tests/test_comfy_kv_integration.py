"""The UNet key/value edit in a real ComfyUI (skipped unless COMFYUI_PATH is set; run with ComfyUI's Python):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_comfy_kv_integration.py

An in-process Unlearn Concept LoRA run with unet_kv_edit on the random-weight SD2 checkpoint of
tests/test_comfy_integration.py, saved by Save Erasure Adapter: the stock LoraLoader loads every UNet key of the file
(none dropped) and the patched MODEL's cross-attention to_k/to_v weights are the base weights + the engine's delta;
Apply Erasure Adapter patches MODEL and CLIP (the user's objects unchanged) and refuses such an adapter without the
MODEL; the backend's names agree with comfy.utils' map for the full SD2 layout.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_comfy_integration import (COMFYUI, Snapshot, checkpoint, comfy_models, comfy_on_path, node,  # noqa: E402,F401
                                    pack, result)

pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

SD2_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
            'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
            'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
            'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': True,
            'context_dim': 1024, 'num_head_channels': 64,
            'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_comfys_own_map_is_the_engines_for_sd2(pack):
    """comfy.utils.unet_to_diffusers (what its LoRA loader maps lora_unet_<diffusers> keys by) on SD 2.x's real
    layout sends each of the 32 projections to the LDM path kv_edit.ldm_name gives (the path A1111's loader uses)."""
    import comfy.utils

    from unlearn_core.kv_edit import is_kv_name, ldm_name, name_from_ldm

    mapping = {k.removesuffix(".weight"): v.removesuffix(".weight")
               for k, v in comfy.utils.unet_to_diffusers(dict(SD2_UNET)).items() if k.endswith(".weight")}
    kv = {k: v for k, v in mapping.items() if is_kv_name(k)}
    assert len(kv) == 32
    for name, path in kv.items():
        assert ldm_name(name) == path and name_from_ldm(path) == name


def test_backend_names_the_loaded_unets_projections(pack, comfy_models):
    from importlib import import_module

    from unlearn_core.kv_edit import name_from_ldm

    model, clip, vae, _ = comfy_models
    backend = import_module(pack.__name__ + ".nodes.comfy_backend").ComfyBackend(model, clip, vae)
    modules = backend.cross_attention_kv()
    unet = model.model.diffusion_model
    paths = {id(m): p for p, m in unet.named_modules()}
    blocks = model.model.model_config.unet_config["num_res_blocks"][0]  # the test UNet has 1 per level
    assert len(modules) == 2 * 10  # the small UNet: 3 down, 1 middle, 6 up attention blocks
    for name, module in modules.items():
        assert name_from_ldm(paths[id(module)], blocks) == name
        assert module.weight.shape[1] == 1024


@pytest.fixture(scope="module")
def erased(pack, comfy_models):
    """Unlearn (contextual, unet_kv_edit) in process, saved by Save Erasure Adapter."""
    model, clip, vae, models_dir = comfy_models
    snapshot = Snapshot(model, clip)
    out = node(pack, "UnlearnConceptLoRA").run(
        model, clip, vae, concept="a red square", synonyms="", method="contextual", kind="object", targets="final",
        steps=2, rank=2, learning_rate=1e-3, anchor="", keep="a blue circle", contexts="a photo of {}",
        preserve="a photo of a dog", resolution=64, seed=0, unet_kv_edit=True)
    adapter = result(out)[0]
    snapshot.assert_unchanged()
    saved = result(node(pack, "SaveErasureAdapter").run(adapter, "kv/edit", overwrite=False))[0]
    return adapter, saved, models_dir / "loras" / saved


def test_the_node_gives_the_unet_edit_and_the_file_holds_it(erased, pack):
    adapter, saved, path = erased
    from safetensors.torch import load_file

    assert adapter.unet is not None and len(adapter.unet.names) == 20
    tensors = load_file(str(path))
    unet_bases = {k.partition(".")[0] for k in tensors if k.startswith("lora_unet_")}
    assert len(unet_bases) == 20 and any(k.startswith("lora_te_") for k in tensors)
    for name in adapter.unet.names:
        assert float(adapter.unet.delta_weight(name).norm()) > 0, name


def test_loraloader_loads_every_unet_key_and_patches_base_plus_the_engines_delta(erased, comfy_models):
    import comfy.lora
    import comfy.model_management as mm
    import comfy.utils
    import nodes as comfy_nodes

    from unlearn_core.kv_edit import kohya_name

    adapter, saved, path = erased
    model, clip, _, _ = comfy_models
    # every key of the file is one ComfyUI's key map knows (nothing dropped: "lora key not loaded")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    loaded = comfy.lora.load_lora(lora, key_map)
    unet_patched = {k for k in loaded if isinstance(k, str) and k.startswith("diffusion_model.")}
    assert len(unet_patched) == 20
    bases = {k.partition(".")[0] for k in lora}
    assert all(b in key_map for b in bases)

    patched_model, patched_clip = comfy_nodes.LoraLoader().load_lora(model, clip, saved, 1.0, 1.0)
    unet = model.model.diffusion_model
    modules = {name: unet.get_submodule(key_map[kohya_name(name)][len("diffusion_model."):-len(".weight")])
               for name in adapter.unet.names}
    base = {name: m.weight.detach().clone() for name, m in modules.items()}
    assert set(patched_model.patches) >= {key_map[kohya_name(n)] for n in adapter.unet.names}
    with torch.inference_mode():
        mm.load_models_gpu([patched_model], force_full_load=True)
        got = {name: m.weight.detach().clone() for name, m in modules.items()}
        mm.load_models_gpu([model], force_full_load=True)  # back to the user's model: ComfyUI unpatches
    for name in adapter.unet.names:
        key = kohya_name(name)
        stored = (lora[f"{key}.lora_up.weight"].float() @ lora[f"{key}.lora_down.weight"].float()
                  * (float(lora[f"{key}.alpha"]) / lora[f"{key}.lora_down.weight"].shape[0]))
        assert _relative(got[name] - base[name], stored) < 1e-5, name  # exactly the file's LoRA on the base weight
        engine = adapter.unet.delta_weight(name).detach()
        assert _relative(got[name] - base[name], engine) < 2e-3, name  # the engine's delta, up to the file's float16
        # loading the user's MODEL again gives its own weights back (ComfyUI's unpatching, values only: ComfyUI
        # puts new Parameter objects in when it patches and unpatches)
        assert torch.equal(modules[name].weight, base[name]), name


def test_apply_patches_model_and_clip_and_needs_the_model(erased, pack, comfy_models):
    adapter, saved, _ = erased
    model, clip, _, _ = comfy_models
    snapshot = Snapshot(model, clip)
    apply_ = node(pack, "ApplyErasureAdapter")
    patched_clip, patched_model = result(apply_.run(clip, 1.0, "(connected adapter)", adapter=adapter, model=model))
    assert patched_model is not model and patched_clip is not clip
    assert sum(1 for k in patched_model.patches if k.startswith("diffusion_model.")) == 20
    assert any(k for k in patched_clip.patcher.patches)
    from_file_clip, from_file_model = result(apply_.run(clip, 1.0, saved, model=model))
    assert set(from_file_model.patches) == set(patched_model.patches)
    assert set(from_file_clip.patcher.patches) == set(patched_clip.patcher.patches)
    with pytest.raises(ValueError, match="connect the MODEL"):
        apply_.run(clip, 1.0, "(connected adapter)", adapter=adapter)
    snapshot.assert_unchanged()
