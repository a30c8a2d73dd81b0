"""A stack of erasure adapters in a real ComfyUI (skipped unless COMFYUI_PATH is set; run with ComfyUI's Python,
see test_comfy_integration.py): the stacked file, loaded by the stock LoraLoader, changes the conditioning as its
parts loaded one after the other do, and Load -> Remove -> Save gives back a part's file bit for bit."""
from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from closeness import effect_error, relative_effect  # noqa: E402
from test_comfy_integration import (COMFYUI, PACK, checkpoint, comfy_models, node, pack,  # noqa: E402,F401
                                    result)

pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def _write_parts(clip, folder: Path) -> list[str]:
    """Two adapters with random deltas for this CLIP (different ranks and modules), as Erase would write them."""
    adapter_io = import_module(PACK + ".unlearn_core.adapter_io")
    lora = import_module(PACK + ".unlearn_core.lora")
    targets = import_module(PACK + ".unlearn_core.targets")
    view = import_module(PACK + ".nodes.comfy_backend").TextEncoderView(clip)
    fingerprint = adapter_io.base_fingerprint(view)
    names = []
    for concept, chosen, rank, seed in (("a red square", [(22, "fc1"), (22, "q")], 2, 1),
                                        ("a blue circle", [(21, "fc2"), (22, "fc1")], 3, 2)):
        wanted = targets.complete_attention([targets.Target(layer, proj) for layer, proj in chosen])
        deltas = lora.Deltas(lora.target_shapes(view.linear, wanted), rank=rank, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for up in deltas.up.values():
                up.copy_(torch.randn(up.shape, generator=generator) * 0.05)
        name = f"stack-test/part{seed}.safetensors"
        adapter_io.write_adapter(folder / name, deltas, fingerprint, {"concept": concept}, overwrite=True)
        names.append(name)
    return names


def test_stack_loads_in_comfyui_with_the_parts_effect_and_comes_apart(pack, comfy_models):
    import nodes as comfy_nodes  # ComfyUI's own nodes module

    model, clip, vae, models_dir = comfy_models
    clip.load_model()
    first, second = _write_parts(clip, models_dir / "loras")
    stack = result(node(pack, "StackErasureAdapters").run(f"{first}\n{second}:0.5", False))[0]
    name = result(node(pack, "SaveErasureAdapter").run(stack, "stack-test/both", True))[0]

    loader = comfy_nodes.LoraLoader()
    prompt = "a photo of a red square next to a blue circle"
    with torch.inference_mode():
        _, stacked = loader.load_lora(model, clip, name, 1.0, 1.0)
        _, one = loader.load_lora(model, clip, first, 1.0, 1.0)
        _, both = loader.load_lora(model, one, second, 1.0, 0.5)
        applied = result(node(pack, "ApplyErasureAdapter").run(clip, 1.0, "(connected adapter)", stack))[0]
        base, expected, got, wired = (c.encode_from_tokens(c.tokenize(prompt)) for c in (clip, both, stacked, applied))
    assert relative_effect(expected, base) > 1e-3, "the parts should change the conditioning"
    assert effect_error(got, expected, base) < 1e-3
    assert torch.equal(wired, got)  # the wire is the saved file

    loaded = result(node(pack, "LoadErasureAdapter").run(clip, name, False))[0]
    rest = result(node(pack, "RemoveFromErasureStack").run(loaded, "a blue circle"))[0]
    back = result(node(pack, "SaveErasureAdapter").run(rest, "stack-test/back", True))[0]
    restored, restored_metadata = _tensors(models_dir / "loras" / back)
    original, original_metadata = _tensors(models_dir / "loras" / first)
    assert restored.keys() == original.keys() and all(torch.equal(restored[k], original[k]) for k in original)
    assert restored_metadata == original_metadata
