"""Checks against open_clip's own code (open-clip-torch 2.20, A1111's pin); skipped unless
CONCEPT_UNLEARN_OPEN_CLIP names an installed open_clip package folder (``.../site-packages/open_clip``;
it needs ftfy and regex importable). open_clip's __init__ imports torchvision; when torchvision cannot be
imported, the package __init__ is skipped and open_clip.utils (needed only for to_2tuple here; it imports
torchvision for FrozenBatchNorm2d) is replaced by that one helper. transformer.py and tokenizer.py run as shipped.
"""
from __future__ import annotations

import collections.abc
import importlib
import os
import sys
import types
from itertools import repeat
from pathlib import Path

import pytest
import torch

FOLDER = os.environ.get("CONCEPT_UNLEARN_OPEN_CLIP")
pytestmark = pytest.mark.skipif(not FOLDER, reason="set CONCEPT_UNLEARN_OPEN_CLIP to an open_clip package folder")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def _open_clip():
    folder = Path(FOLDER)
    sys.path.append(str(folder.parent))  # ftfy / regex installed beside it
    try:
        import torchvision  # noqa: F401
        return importlib.import_module("open_clip.transformer"), importlib.import_module("open_clip.tokenizer")
    except Exception:  # torchvision missing or built for another torch
        pass
    for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
        del sys.modules[name]
    package = types.ModuleType("open_clip")
    package.__path__ = [str(folder)]
    sys.modules["open_clip"] = package
    utils = types.ModuleType("open_clip.utils")
    utils.to_2tuple = lambda x: tuple(x) if isinstance(x, collections.abc.Iterable) and not isinstance(x, str) \
        else tuple(repeat(x, 2))
    sys.modules["open_clip.utils"] = utils
    return importlib.import_module("open_clip.transformer"), importlib.import_module("open_clip.tokenizer")


def test_real_open_clip_text_transformer_and_tokenizer():
    import a1111_backend
    import a1111_mapping as mapping
    from unlearn_core.tiny import build_pipeline

    torch.set_num_threads(1)
    transformer, tokenizer = _open_clip()
    pipe = build_pipeline(seed=0, layers=3)
    config = pipe.text_encoder.config
    text = transformer.TextTransformer(context_length=77, vocab_size=49408, width=config.hidden_size,
                                       heads=config.num_attention_heads, layers=config.num_hidden_layers + 1,
                                       output_dim=config.hidden_size).eval()
    missing, unexpected = text.load_state_dict(mapping.hf_to_open_clip(pipe.text_encoder.state_dict()), strict=False)
    assert not unexpected and all(k == "text_projection" or k.startswith("transformer.resblocks.3.") for k in missing)

    prompts = ["a photo of a red square", "An Oil-Painting   of  a dog!", ""]
    t = tokenizer._tokenizer
    ids = a1111_backend.open_clip_ids(t.encode, prompts, t.encoder["<start_of_text>"], t.encoder["<end_of_text>"])
    assert torch.equal(ids, tokenizer.tokenize(prompts))
    with torch.no_grad():
        ours = mapping.encode(text, ids)
        with mapping.split_attention(text):
            split = mapping.encode(text, ids)
        hf = pipe.text_encoder(ids)[0]
    assert (ours - hf).abs().max() < 1e-5
    assert (split - ours).abs().max() < 1e-5
    assert all(type(block.attn) is torch.nn.MultiheadAttention for block in text.transformer.resblocks)
