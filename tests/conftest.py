"""Shared fixtures: tiny SD2-architecture models built from configs (random weights, real CLIP tokenizer)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.tiny import build_pipeline, save_pipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd2", seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """Same architecture, other weights: a different base model."""
    return save_pipeline(tmp_path_factory.mktemp("models") / "other-sd2", seed=1)


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir)


@pytest.fixture
def backend(pipe):
    return DiffusersBackend(pipe)


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(4):
        image = Image.new("RGB", (16, 16), (235, 235, 235))
        ImageDraw.Draw(image).rectangle((3 + i % 2, 3, 12, 12 - i % 2), fill=(200, 20, 20))
        image.save(folder / f"square_{i}.png")
    return folder


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_identical(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def build_sd1_like_pipeline():
    """An SD1-shaped tiny pipeline (quick_gelu CLIP, 768 wide) to check the refusal."""
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = build_pipeline(width=32)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4,
                                                     hidden_act="quick_gelu"))
    return pipe


def concept_images(colour, shape, count=4, seed=0):
    """[count, 3, 16, 16] images of one coloured shape on light grey, slightly varied."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.full((count, 3, 16, 16), 0.9)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    for i in range(count):
        cx, cy = 8 + (i % 2), 8 - (i % 2)
        if shape == "square":
            inside = ((xx - cx).abs() <= 4) & ((yy - cy).abs() <= 4)
        else:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= 20
        for channel, value in enumerate(colour):
            images[i, channel][inside] = value
    return (images + 0.02 * torch.randn(images.shape, generator=generator)).clamp(0, 1)


@pytest.fixture
def images():
    return concept_images((0.85, 0.1, 0.1), "square")


def amplify_cross_attention(pipe, gain=30.0):
    """Random UNets barely listen to the prompt; scaling cross-attention outputs makes predictions
    depend strongly on the conditioning, so objectives have something to move."""
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(gain)
    return pipe


@pytest.fixture(scope="session")
def sensitive_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "sensitive-sd2"
    amplify_cross_attention(build_pipeline(seed=0, width=128)).save_pretrained(str(folder))
    return folder


@pytest.fixture
def sensitive(sensitive_model_dir):
    pipe = load_pipeline(sensitive_model_dir)
    return pipe, DiffusersBackend(pipe)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and a busy 2-core machine stalls torch's thread pool."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
