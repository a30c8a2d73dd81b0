"""LoRA alpha per module, and full-weight deltas compressed by randomised SVD (issue 15, host defects).

kohya files store one ``.alpha`` per module and every host scales each module by its own (A1111 network_lora
``alpha / dim`` per module, ComfyUI's lora weight adapter ``v[2] / rank`` per key, diffusers' kohya conversion per
module): a file whose modules have different alphas must act the same in the engine (read, validated, applied).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from closeness import effect_error, relative_effect, relative_error
from unlearn_core.adapter_io import base_fingerprint, inspect, read_adapter, write_adapter
from unlearn_core.config import EraseConfig, LoraConfig
from unlearn_core.diffusers_backend import load_pipeline
from unlearn_core.erase import erase
from unlearn_core.lora import Deltas
from unlearn_core.targets import Target
from unlearn_core.tokens import encode

ALPHAS = {"0_fc1": 0.5, "1_fc2": 8.0, "3_fc1": 2.0}  # rank 2: scales 0.25, 4 and 1


def _targets():
    return [Target(int(k.split("_")[0]), k.split("_")[1]) for k in ALPHAS]


def per_module_alpha_file(backend, path, dtype=torch.float32):
    """A kohya file (as another trainer might write it) whose modules each have their own alpha."""
    generator = torch.Generator().manual_seed(4)
    tensors = {}
    for t in _targets():
        out_features, in_features = backend.linear(t).weight.shape
        tensors[f"{t.kohya_name}.lora_down.weight"] = (torch.randn(2, in_features, generator=generator) * 0.3).to(dtype)
        tensors[f"{t.kohya_name}.lora_up.weight"] = (torch.randn(out_features, 2, generator=generator) * 0.3).to(dtype)
        tensors[f"{t.kohya_name}.alpha"] = torch.tensor(ALPHAS[f"{t.layer}_{t.proj}"], dtype=dtype)
    save_file(tensors, str(path), metadata={"ss_v2": "True", "ss_network_module": "networks.lora"})
    return tensors


def _merged(tensors, t):
    """What every host merges into the weight: up @ down * this module's alpha / rank."""
    down, up = tensors[f"{t.kohya_name}.lora_down.weight"].float(), tensors[f"{t.kohya_name}.lora_up.weight"].float()
    return up @ down * float(tensors[f"{t.kohya_name}.alpha"]) / down.shape[0]


def test_each_module_is_scaled_by_its_own_alpha(backend, tmp_path):
    tensors = per_module_alpha_file(backend, tmp_path / "mixed.safetensors")
    adapter = read_adapter(tmp_path / "mixed.safetensors", backend, allow_other_base=True)
    for t in _targets():
        assert relative_error(adapter.deltas.delta_weight(t), _merged(tensors, t)) < 1e-6, t
    assert adapter.deltas.uniform_alpha is None


def test_mixed_alphas_survive_writing_and_loading_again(backend, tmp_path):
    """What a ComfyUI wire (kohya_tensors) or a re-save carries: the same per-module alphas."""
    tensors = per_module_alpha_file(backend, tmp_path / "mixed.safetensors", dtype=torch.float16)
    deltas = read_adapter(tmp_path / "mixed.safetensors", backend, allow_other_base=True).deltas
    again = deltas.to_kohya(torch.float16)
    assert again.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(again[key], value), key
    path = write_adapter(tmp_path / "resaved.safetensors", deltas, None)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["ss_network_alpha"] == "Dynamic"  # kohya's word for per-module alphas (resize_lora.py)
    assert inspect(path)["kind"] == "erasure adapter"
    own = write_adapter(tmp_path / "own.safetensors", Deltas({Target(0, "fc1"): (128, 32)}, rank=4, alpha=2.0), None)
    with safe_open(str(own), framework="pt") as f:
        assert f.metadata()["ss_network_alpha"] == "2"


def test_engine_and_generate_apply_a_mixed_alpha_file_module_by_module(backend, tiny_model_dir, tmp_path):
    """The engine's hooks and ``generate``'s application both equal the file merged by hand, module by module.
    (diffusers' own loader is not used for such files: diffusers 0.42 under transformers 5 gives every text-encoder
    module the most common alpha, see cli.apply_adapter_to_pipeline.)"""
    from unlearn_core.cli import apply_adapter_to_pipeline
    from unlearn_core.diffusers_backend import DiffusersBackend

    path = tmp_path / "mixed.safetensors"
    tensors = per_module_alpha_file(backend, path)
    prompt = ["a photo of a red square"]
    adapter = read_adapter(path, backend, allow_other_base=True)
    with torch.no_grad():
        base = encode(backend, prompt)
        with adapter.deltas.inject(backend.linear):
            engine = encode(backend, prompt)
        by_hand_backend = DiffusersBackend(load_pipeline(tiny_model_dir))
        for t in _targets():
            by_hand_backend.linear(t).weight += _merged(tensors, t)
        by_hand = encode(by_hand_backend, prompt)
    generate_backend = DiffusersBackend(load_pipeline(tiny_model_dir))
    apply_adapter_to_pipeline(generate_backend.pipe, generate_backend, path, 1.0, allow_other_base=True)
    with torch.no_grad():
        generated = encode(generate_backend, prompt)
    assert relative_effect(by_hand, base) > 1e-2
    assert effect_error(engine, by_hand, base) < 1e-4
    assert effect_error(generated, by_hand, base) < 1e-4


# ---------------------------------------------------------------------------- randomised SVD compression

def _full_deltas(shapes, seed=0):
    """Full-weight deltas shaped like a short training's: a decaying spectrum plus noise."""
    generator = torch.Generator().manual_seed(seed)
    deltas = Deltas(shapes, mode="full")
    with torch.no_grad():
        for p in deltas.diff.values():
            out_features, in_features = p.shape
            signal = sum(torch.randn(out_features, 1, generator=generator) @ torch.randn(1, in_features, generator=generator)
                         * 0.6 ** i for i in range(12))
            p.copy_((signal + 0.2 * torch.randn(out_features, in_features, generator=generator)) * 1e-3)
    return deltas


def test_randomised_compression_is_as_close_as_the_exact_svd_and_says_how_close():
    shapes = {Target(0, "fc1"): (512, 128), Target(0, "fc2"): (128, 512), Target(1, "q"): (128, 128)}
    full = _full_deltas(shapes)
    lora = full.compress(6)
    assert lora.mode == "lora" and lora.rank == 6
    optimal, residual, energy = [], 0.0, 0.0
    for t in full.targets:
        delta = full.delta_weight(t).detach().double()
        s = torch.linalg.svdvals(delta)
        optimal.append(float(s[6:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()))  # Eckart-Young: the best rank 6
        got = float((delta - lora.delta_weight(t).detach().double()).norm())
        assert got / float(delta.norm()) <= optimal[-1] * 1.01, t  # within 1 % of the best possible
        residual, energy = residual + got ** 2, energy + float(delta.norm()) ** 2
    error = lora.compression_error
    assert error["total"] == pytest.approx((residual / energy) ** 0.5, rel=1e-4)  # the measured error, exactly
    assert error["max_module"] == pytest.approx(max(optimal), rel=0.01)
    assert 0.05 < error["total"] < 0.9  # a real approximation here, not a trivially exact one


def test_compression_is_exact_when_the_rank_covers_the_matrix_and_leaves_the_deltas_alone():
    full = _full_deltas({Target(0, "q"): (16, 16)})
    before = full.diff["0_q"].detach().clone()
    lora = full.compress(16)
    assert relative_error(lora.delta_weight(Target(0, "q")), before) < 1e-5
    assert lora.compression_error["total"] < 1e-5
    assert torch.equal(full.diff["0_q"], before)
    assert Deltas({Target(0, "q"): (8, 8)}, mode="full").compress(2).compression_error == {"total": 0.0,
                                                                                          "max_module": 0.0}
    with pytest.raises(ValueError, match="rank must be >= 1"):
        full.compress(0)


def test_compressed_erasure_records_the_relative_error_of_what_it_saved(backend, images, tmp_path):
    def run(compress_rank):
        config = EraseConfig(concept="a red square", method="anchor", steps=2, lr=1e-2, seed=3,
                             lora=LoraConfig(preset="final", mode="full", compress_rank=compress_rank))
        return erase(backend, config, images)

    full, compressed = run(None), run(2)
    path = write_adapter(tmp_path / "c.safetensors", compressed.deltas, base_fingerprint(backend), compressed.info(),
                         dtype=torch.float32)
    adapter = read_adapter(path, backend)
    recorded = json.loads(adapter.metadata["concept_unlearn.compression"])
    residual = energy = 0.0
    for t in full.deltas.targets:
        delta = full.deltas.delta_weight(t).detach().double()
        residual += float((delta - adapter.deltas.delta_weight(t).detach().double()).pow(2).sum())
        energy += float(delta.pow(2).sum())
    assert recorded["rank"] == 2 and recorded["method"] == "randomised SVD"
    assert recorded["relative_error"] == pytest.approx((residual / energy) ** 0.5, rel=1e-3)
    assert 0 < recorded["relative_error"] <= recorded["max_module_relative_error"] < 1
    assert "relative error" in adapter.info("notes")
    assert "compression" not in full.info()
