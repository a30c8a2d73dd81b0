"""The tab's logic functions (scripts/concept_unlearn_logic.py), run for real through the engine on the small
A1111-shaped model of test_a1111_backend, with a stand-in for shared.state that has the fields A1111's
modules/shared_state.py State uses (job, interrupted, skipped, sampling_step(s), textinfo, begin, end)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from test_a1111_backend import sd_model, sd_model_factory, snapshot, assert_unchanged, tokenizer  # noqa: E402,F401

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "concept_unlearn_logic.py"
_spec = importlib.util.spec_from_file_location("concept_unlearn_logic", _PATH)
logic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(logic)


class State:
    def __init__(self):
        self.job, self.interrupted, self.skipped = "", False, False
        self.sampling_step = self.sampling_steps = 0
        self.textinfo, self.jobs = None, []

    def begin(self, job):
        self.job = job
        self.jobs.append(job)

    def end(self):
        self.job = ""


@pytest.fixture
def files(tmp_path):
    paths = []
    for i, colour in enumerate(("red", "blue")):
        p = tmp_path / f"ex{i}.png"
        Image.new("RGB", (40, 48), colour).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def host(sd_model, tokenizer, tmp_path):
    return logic.Host(sd_model=sd_model, lora_dir=tmp_path / "Lora", embeddings_dir=tmp_path / "embeddings",
                      state=State(), tokenizer=tokenizer, resolution=32)


def test_helpers():
    assert logic.busy(None) is None
    assert "txt2img" in logic.busy(type("S", (), {"job": "txt2img"})())
    assert logic.file_stem("Van Gogh style!") == "unlearn_Van_Gogh_style"
    assert logic.split_list("a, b\nc,,") == ("a", "b", "c")
    with pytest.raises(ValueError, match="name"):
        logic.file_stem("  !! ")


def test_erase_saves_a_loadable_adapter_and_leaves_the_model_unchanged(host, files, sd_model):
    snap = snapshot(sd_model)
    message, path, curve = logic.do_erase(host, files, "cat", "kitten, kitty", "", "Weighted (images + anchor)",
                                          "Few-shot layers (MLP of all + last attention)", 2, 2, 0)
    assert message.startswith("Saved unlearn_cat.safetensors") and "<lora:unlearn_cat:1>" in message
    assert Path(path).parent == host.lora_dir and curve.size[0] > 0
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v2"
    assert host.state.jobs == ["concept_unlearn"] and host.state.job == "" and host.state.sampling_step == 2
    assert_unchanged(sd_model, snap)
    again = logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0)
    assert again[0].startswith("Error: unlearn_cat.safetensors already exists") and "\n" not in again[0]


def test_interrupt_saves_nothing(host, files, sd_model):
    snap = snapshot(sd_model)
    host.state.begin = lambda job: (setattr(host.state, "job", job), setattr(host.state, "interrupted", True))
    message, path, _ = logic.do_erase(host, files, "dog", "", "", "Few-shot (images, gradient ascent)",
                                      "Last layer", 5, 2, 0)
    assert message.startswith("Interrupted") and path is None
    assert not (host.lora_dir / "unlearn_dog.safetensors").exists()
    assert_unchanged(sd_model, snap)


def test_busy_and_errors_are_one_line(host, files):
    host.state.job = "txt2img"
    assert logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0)[0] \
        .startswith("Busy: another job (txt2img)")
    host.state.job = ""
    message = logic.do_erase(host, [], "cat", "", "", "Few-shot (images, gradient ascent)", "Last layer", 1, 2, 0)[0]
    assert message.startswith("Error:") and "images" in message
    message = logic.do_erase(host, files, "", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0)[0]
    assert message.startswith("Error:") and "concept" in message


def test_learn_token_then_erase_with_it_then_audit(host, files):
    message, token_path, _ = logic.do_learn_token(host, files, "<mycat>", "cat", "object", 2, 0)
    assert message.startswith("Saved <mycat>.safetensors"), message
    with safe_open(token_path, framework="pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (1, 1024)
    message, adapter_path, _ = logic.do_erase(host, files, "cat", "", token_path, "Weighted (images + anchor)",
                                              "Last layer", 2, 2, 0, name="cat_tok")
    assert message.startswith("Saved unlearn_cat_tok"), message
    message, _, curve = logic.do_audit(host, files, adapter_path, 2, 0)
    assert message.startswith("Audit: re-learned token loss") and curve is not None
