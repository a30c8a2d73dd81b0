"""The A1111 tab's logic, run for real through the engine on a tiny SD2-architecture model.

The backend is a1111_backend.OpenClipBackend over an open_clip-structured text transformer (see
test_a1111_mapping) with the tiny diffusers UNet/VAE; only gradio and A1111 themselves are absent.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from test_a1111_mapping import LAYERS, Embedder, open_clip_backend, open_clip_from  # also puts scripts/ on sys.path

import a1111_tab_logic as logic  # noqa: E402
from unlearn_core.tiny import build_pipeline  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    pipe = build_pipeline(seed=0, layers=LAYERS)
    return pipe, Embedder(open_clip_from(pipe))


def host(model, tmp_path, **kwargs):
    pipe, embedder = model
    return logic.Host(backend=lambda: open_clip_backend(pipe, embedder), lora_dir=tmp_path / "models" / "Lora",
                      embeddings_dir=tmp_path / "embeddings", **kwargs)


def pictures(n=2):
    return [Image.new("RGB", (40, 30), (200, 30 * i, 30)) for i in range(n)]


def test_erase_saves_adapter_reports_progress_and_refuses_overwrite(model, tmp_path):
    steps = []
    h = host(model, tmp_path, progress=lambda info: steps.append(info.step))
    out = logic.erase_concept(h, "erase_square", "a red square", method="weighted", steps=3, lr=1e-2,
                              images=pictures(), preset="final")
    assert out.adapter == tmp_path / "models" / "Lora" / "erase_square.safetensors", out.message
    assert steps == [1, 2, 3] and out.curve.size[0] > 0 and "<lora:erase_square:1>" in out.message
    with safe_open(str(out.adapter), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_network_module"] == "networks.lora"
    assert f"lora_te_text_model_encoder_layers_{LAYERS - 1}_self_attn_q_proj.lora_down.weight" in keys
    assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in model[1].model.transformer.resblocks)

    again = logic.erase_concept(h, "erase_square", "a red square", method="anchor", steps=1)
    assert again.adapter is None and again.message.startswith("Error:") and "already exists" in again.message


def test_interrupt_cancels_and_saves_nothing(model, tmp_path):
    seen = []
    h = host(model, tmp_path, progress=lambda info: seen.append(info.step), interrupted=lambda: len(seen) >= 2)
    out = logic.erase_concept(h, "erase_cancel", "a red square", method="anchor", steps=10)
    assert out.message.startswith("Cancelled") and out.adapter is None and seen == [1, 2]
    assert not (tmp_path / "models" / "Lora" / "erase_cancel.safetensors").exists()
    assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in model[1].model.transformer.resblocks)


def test_token_is_saved_as_a1111_embedding(model, tmp_path):
    out = logic.learn_concept_token(host(model, tmp_path), "<sq>", pictures(), n_vectors=2, steps=2, lr=1e-2)
    assert out.token == tmp_path / "embeddings" / "sq.safetensors", out.message
    with safe_open(str(out.token), "pt") as f:  # A1111 accepts a single-tensor safetensors file as an embedding
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, model[0].text_encoder.config.hidden_size)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(name="bad/name", concept="a cat"), "adapter name"),
    (dict(name="ok", concept="  "), "concept"),
    (dict(name="ok", concept="a cat", method="fewshot"), "needs example images"),
])
def test_errors_are_one_line(model, tmp_path, kwargs, expected):
    out = logic.erase_concept(host(model, tmp_path), steps=1, **kwargs)
    assert out.message.startswith("Error:") and expected in out.message and "\n" not in out.message


def test_backend_failure_is_one_line(tmp_path):
    def refuse():
        raise ValueError("the loaded checkpoint is Stable Diffusion 1.x (CLIP ViT-L, 768 wide)")

    h = logic.Host(backend=refuse, lora_dir=tmp_path, embeddings_dir=tmp_path)
    out = logic.erase_concept(h, "x", "a cat", method="anchor", steps=1)
    assert out.message == "Error: the loaded checkpoint is Stable Diffusion 1.x (CLIP ViT-L, 768 wide)"


def test_scripts_load_the_way_a1111_loads_them():
    """modules/script_loading.load_module: spec_from_file_location(basename incl. '.py', path), exec_module,
    no sys.modules entry, alphabetical order; none of the files may need A1111 or gradio at import."""
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "scripts"
    for path in sorted(folder.glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.name, str(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def test_sd_model_checks():
    """a1111_backend.check_sd_model on objects with the attribute layout of A1111's loaded models
    (sd_model.conditioner for SDXL, cond_stage_model.wrapped = FrozenCLIPEmbedder(.transformer) for SD1,
    FrozenOpenCLIPEmbedder(.model.transformer.resblocks) for SD2)."""
    from types import SimpleNamespace

    import a1111_backend
    from test_a1111_mapping import OpenClipLike
    from unlearn_core.backend import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="no checkpoint"):
        a1111_backend.check_sd_model(None)
    with pytest.raises(UnsupportedModelError, match="SDXL"):
        a1111_backend.check_sd_model(SimpleNamespace(conditioner=object()))

    class FrozenCLIPEmbedder:
        transformer = object()

    with pytest.raises(UnsupportedModelError, match="1.x"):
        a1111_backend.check_sd_model(SimpleNamespace(cond_stage_model=SimpleNamespace(wrapped=FrozenCLIPEmbedder())))
    small = Embedder(OpenClipLike(32, 2, 2, vocab=8))
    with pytest.raises(UnsupportedModelError, match="1024"):
        a1111_backend.check_sd_model(SimpleNamespace(cond_stage_model=SimpleNamespace(wrapped=small)))
    sd2 = Embedder(OpenClipLike(1024, 1, 16, vocab=8))
    assert a1111_backend.check_sd_model(SimpleNamespace(cond_stage_model=SimpleNamespace(wrapped=sd2))) is sd2
    inpainting = SimpleNamespace(cond_stage_model=SimpleNamespace(wrapped=sd2), model=SimpleNamespace(conditioning_key="hybrid"))
    with pytest.raises(UnsupportedModelError, match="inpainting"):
        a1111_backend.check_sd_model(inpainting)
    with pytest.raises(UnsupportedModelError, match="Forge"):
        a1111_backend.check_sd_model(SimpleNamespace(forge_objects=object()))


def test_merged_network_weights_are_refused():
    """networks.py records applied LoRAs as module.network_current_names (tuple of (name, te, unet, dyn) items)."""
    import a1111_backend
    from test_a1111_mapping import OpenClipLike

    model = OpenClipLike(32, 2, 2, vocab=8)
    a1111_backend.check_no_merged_networks(model)
    model.transformer.resblocks[0].attn.network_current_names = (("other", 1.0, 1.0, None),)
    with pytest.raises(RuntimeError, match="still merged"):
        a1111_backend.check_no_merged_networks(model)
