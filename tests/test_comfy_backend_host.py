"""The ComfyUI backend against real ComfyUI objects: the layer it trains on, and what it leaves behind (issue 15,
host defects). Skipped unless COMFYUI_PATH is set; run with ComfyUI's own Python, as tests/test_comfy_integration.py
says (its checkpoint and model fixtures are reused here).

Checked against ComfyUI 0.3.64: nodes.py CLIPSetLastLayer (stop_at_clip_layer, default -1) -> comfy.sd.CLIP.clip_layer
sets CLIP.layer_idx, which encode_from_tokens passes to set_clip_options for every later encode;
comfy/text_encoders/sd2_clip.py SD2ClipHModel defaults to the penultimate layer (layer_idx -2).
"""
from __future__ import annotations

from importlib import import_module

import pytest
import torch

from test_comfy_integration import COMFYUI, PACK, Snapshot, checkpoint, comfy_models, pack  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")


def _engine(name):
    return import_module(f"{PACK}.{name}")


@pytest.mark.parametrize("stop_at", [None, -1, -2, -7])
def test_training_uses_sd2s_penultimate_layer_whatever_clip_set_last_layer_says(pack, comfy_models, stop_at):
    model, clip, vae, _ = comfy_models
    backend_mod = _engine("nodes.comfy_backend")
    config_mod, erase_mod = _engine("unlearn_core.config"), _engine("unlearn_core.erase")
    prompts = ["a photo of a red square", "a painting"]
    user_clip = clip.clone()
    if stop_at is not None:
        user_clip.clip_layer(stop_at)  # what CLIPSetLastLayer does
    before = Snapshot(model, clip)
    with torch.inference_mode():
        penultimate = [clip.encode_from_tokens(clip.tokenize(p)) for p in prompts]  # SD2's own conditioning
        backend = backend_mod.ComfyBackend(model, user_clip, vae, latent_size=8)
        assert backend.num_layers == 23
        with backend.session():
            cond = backend.encode_ids(backend.tokenize(prompts))
            config = config_mod.EraseConfig(concept="a red square", method="anchor", steps=1, preserve=("",),
                                            lora=config_mod.LoraConfig(preset="final", rank=2))
            result = erase_mod.erase(backend, config)
    for i, reference in enumerate(penultimate):
        assert torch.equal(cond[i:i + 1].to(reference.device), reference)
    assert {t.layer for t in result.deltas.targets} == {22}  # the last layer SD2's conditioning reads
    assert user_clip.layer_idx == stop_at  # the user's CLIP keeps its own setting for their graph
    before.assert_unchanged()


def test_an_adapter_for_layer_23_is_refused_with_clip_set_last_layer_at_minus_1(pack, comfy_models, tmp_path):
    """Loading validates against the layers SD2 conditions on, not the ones the CLIP input was set to."""
    model, clip, vae, _ = comfy_models
    backend_mod = _engine("nodes.comfy_backend")
    lora, targets, adapter_io = _engine("unlearn_core.lora"), _engine("unlearn_core.targets"), _engine("unlearn_core.adapter_io")
    deltas = lora.Deltas({targets.Target(23, "fc1"): (4096, 1024)}, rank=2)
    path = adapter_io.write_adapter(tmp_path / "layer23.safetensors", deltas, None)
    user_clip = clip.clone()
    user_clip.clip_layer(-1)
    view = backend_mod.TextEncoderView(user_clip)
    assert view.num_layers == 23
    with pytest.raises(adapter_io.AdapterFileError, match="adapts layer 23.*0..22"):
        adapter_io.read_adapter(path, view)


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_session_empties_comfyuis_cache_also_when_the_block_fails(pack, comfy_models, monkeypatch, fails):
    import comfy.model_management as mm

    model, clip, vae, _ = comfy_models
    backend_mod = _engine("nodes.comfy_backend")
    emptied = []
    original = mm.soft_empty_cache
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: (emptied.append(True), original(*a, **k))[1])
    before = Snapshot(model, clip)
    with torch.inference_mode():
        backend = backend_mod.ComfyBackend(model, clip, vae, latent_size=8)
        if fails:
            with pytest.raises(RuntimeError, match="simulated"), backend.session():
                raise RuntimeError("simulated failure during training")
        else:
            with backend.session():
                pass
    assert emptied == [True]
    before.assert_unchanged()
