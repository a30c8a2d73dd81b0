"""The Stack Erasure Adapters / Remove From Erasure Stack nodes without ComfyUI: connected adapters and files of
models/loras stack into one adapter that Save writes as a stack, and removing a part gives back the other one's
file bit for bit."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from test_comfy_nodes import pack, sub  # noqa: E402,F401

FINGERPRINT = {"width": 32, "layers": 2, "probe": [0.1, 0.2]}


def _adapter(concept, projections, rank, seed):
    lora = sub("unlearn_core.lora")
    targets = sub("unlearn_core.targets")
    shapes = {t: (64, 32) for t in targets.complete_attention([targets.Target(layer, proj) for layer, proj in projections])}
    deltas = lora.Deltas(shapes, rank=rank, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for up in deltas.up.values():
            up.copy_(torch.randn(up.shape, generator=generator))
    return sub("nodes.host").ErasureAdapter(deltas, FINGERPRINT, {"concept": concept, "method": "contextual"})


def _node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[f"{name}|ConceptUnlearn"]()


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


@pytest.fixture
def loras(pack, tmp_path, monkeypatch):
    host = sub("nodes.host")
    folder = tmp_path / "loras"
    monkeypatch.setattr(host, "models_folder", lambda kind: tmp_path / kind)
    monkeypatch.setattr(host, "full_path", lambda kind, name: str(tmp_path / kind / name))
    return folder


def test_stack_save_and_remove_through_the_nodes(pack, loras):
    star = _adapter("a red star", [(0, "fc1")], 2, seed=1)
    circle = _adapter("a blue circle", [(1, "q")], 3, seed=2)
    stripes = _adapter("stripes", [(0, "fc1"), (1, "fc2")], 2, seed=3)
    save = _node(pack, "SaveErasureAdapter")
    save.run(stripes, "stripes", False)
    save.run(circle, "parts/circle", False)

    output = _node(pack, "StackErasureAdapters").run("stripes.safetensors:0.5\n", False, adapter_1=star,
                                                     adapter_3=circle, strength_3=1.0)
    stack = output["result"][0]
    ui = output["ui"]["concept_unlearn"][0]
    assert ui["concept"] == "a red star, a blue circle, stripes" and ui["rank"] == 7
    # the parts' deltas added, each at its strength
    for target in stack.deltas.targets:
        expected = sum(s * a.deltas.delta_weight(target).double() for a, s in ((star, 1.0), (circle, 1.0),
                                                                              (stripes, 0.5))
                       if target in a.deltas.targets)
        got = stack.deltas.delta_weight(target).double()
        # the parts' values as stored (float16), so up to float16 rounding of the in-memory float32 deltas
        assert float((got - expected).norm() / expected.norm()) < 2e-3, target

    name = save.run(stack, "stacked", False)["result"][0]
    loaded = _tensors(loras / name)[0]
    assert all(torch.equal(loaded[k], stack.kohya_tensors()[k]) for k in loaded)  # Save writes the stack as it is

    without_star = _node(pack, "RemoveFromErasureStack").run(stack, "a red star")["result"][0]
    rest = _node(pack, "RemoveFromErasureStack").run(without_star, "stripes")["result"][0]
    restored = save.run(rest, "circle-again", False)["result"][0]
    original, original_metadata = _tensors(loras / "parts" / "circle.safetensors")
    again, again_metadata = _tensors(loras / restored)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    assert again_metadata == original_metadata


def test_stack_nodes_refuse_clearly(pack, loras):
    with pytest.raises(ValueError, match="nothing to stack"):
        _node(pack, "StackErasureAdapters").run("", False)
    with pytest.raises(ValueError, match="not a stack"):
        _node(pack, "RemoveFromErasureStack").run(_adapter("a red star", [(0, "fc1")], 2, seed=1), "a red star")
    star = _adapter("a red star", [(0, "fc1")], 2, seed=1)
    other = sub("nodes.host").ErasureAdapter(star.deltas, {**FINGERPRINT, "probe": [5.0, 5.0]}, {"concept": "other"})
    with pytest.raises(ValueError, match="different base models"):
        _node(pack, "StackErasureAdapters").run("", False, adapter_1=star, adapter_2=other)
    assert _node(pack, "StackErasureAdapters").run("", True, adapter_1=star, adapter_2=other)["result"][0].stored


def test_file_names_with_strengths(pack):
    split = sub("nodes.comfy_nodes")._name_and_strength
    assert split("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert split("b.safetensors") == ("b.safetensors", 1.0)
    assert split("c:d.safetensors") == ("c:d.safetensors", 1.0)


def test_stacking_parts_that_undo_each_other_shows_a_warning_under_the_node(pack):
    orange = _adapter("orange", [(0, "fc1")], 2, seed=1)
    orange.info["neighbour_targets"] = {"orange": "red"}
    red = _adapter("red", [(0, "fc1")], 2, seed=2)
    ui = _node(pack, "StackErasureAdapters").run("", False, adapter_1=orange, adapter_2=red)["ui"]["concept_unlearn"][0]
    (line,) = [line for line in ui["lines"] if line.startswith("warnings:")]
    assert "sends 'orange' to 'red', which" in line and "undo each other" in line
    ui = _node(pack, "StackErasureAdapters").run("", False, adapter_1=red, adapter_2=_adapter("blue", [(0, "fc1")], 2,
                                                                                            seed=3))["ui"]
    assert not any(line.startswith("warnings:") for line in ui["concept_unlearn"][0]["lines"])
