"""Files written by the engine load unchanged in diffusers and give the engine's conditioning."""
import torch

from closeness import effect_error, relative_effect, relative_error
from unlearn_core.adapter_io import base_fingerprint, read_adapter, read_token, write_adapter, write_token
from unlearn_core.config import EraseConfig, TokenConfig
from unlearn_core.diffusers_backend import load_pipeline
from unlearn_core.erase import erase
from unlearn_core.inversion import learn_token
from unlearn_core.tokens import encode


def _diffusers_conditioning(pipe, prompt):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_adapter_loaded_by_diffusers_reproduces_engine_conditioning(backend, images, tiny_model_dir, tmp_path):
    config = EraseConfig(concept="a red square", steps=4, lr=5e-2)
    result = erase(backend, config, images)
    path = write_adapter(tmp_path / "erase.safetensors", result.deltas, base_fingerprint(backend), result.info())

    adapter = read_adapter(path, backend)
    with torch.no_grad(), adapter.deltas.inject(backend.linear):
        engine = encode(backend, ["a photo of a red square"])
    fresh = load_pipeline(tiny_model_dir)
    before = _diffusers_conditioning(fresh, "a photo of a red square")
    fresh.load_lora_weights(str(path))
    loaded = _diffusers_conditioning(fresh, "a photo of a red square")

    assert relative_effect(loaded, before) > 1e-3, "the adapter should change the concept's conditioning"
    assert effect_error(loaded, engine, before) < 1e-3  # diffusers applies the effect the engine trained


def test_token_loaded_by_diffusers_reproduces_engine_conditioning(backend, images, tiny_model_dir, tmp_path):
    result = learn_token(backend, images, TokenConfig(token="<sq>", n_vectors=2, steps=5, lr=5e-2))
    path = write_token(tmp_path / "sq.safetensors", result.token, base_fingerprint(backend))
    token = read_token(path, backend)
    assert token.name == "<sq>" and token.vectors.shape == (2, backend.width)

    with torch.no_grad():
        engine = encode(backend, ["a photo of <sq> on a table"], token)
    fresh = load_pipeline(tiny_model_dir)
    fresh.load_textual_inversion(str(path), token="<sq>")
    prompt = fresh.maybe_convert_prompt("a photo of <sq> on a table", fresh.tokenizer)
    loaded = _diffusers_conditioning(fresh, prompt)
    assert relative_error(loaded, engine) < 1e-5


def test_full_mode_compressed_to_lora_loads_in_diffusers(backend, images, tiny_model_dir, tmp_path):
    from unlearn_core.config import LoraConfig

    config = EraseConfig(concept="a red square", steps=3, lr=1e-2,
                         lora=LoraConfig(preset="final", mode="full", compress_rank=32))
    result = erase(backend, config, images)  # rank 32 >= the tiny model's width: the SVD is exact
    assert result.deltas.mode == "lora" and result.deltas.rank == 32
    path = write_adapter(tmp_path / "full.safetensors", result.deltas, base_fingerprint(backend), result.info(),
                         dtype=torch.float32)
    fresh = load_pipeline(tiny_model_dir)
    before = _diffusers_conditioning(fresh, "a red square")
    fresh.load_lora_weights(str(path))
    adapter = read_adapter(path, backend)
    assert "rank-32 LoRA by SVD" in adapter.info("notes")  # the file says how it was made
    with torch.no_grad(), adapter.deltas.inject(backend.linear):
        engine = encode(backend, ["a red square"])
    assert effect_error(_diffusers_conditioning(fresh, "a red square"), engine, before) < 1e-3
