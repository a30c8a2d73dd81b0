"""Adapters as the default method writes them (text encoder + the UNet key/value edit) stack and come apart."""
from __future__ import annotations

from safetensors import safe_open

from unlearn_core.cli import main


def test_default_adapters_with_unet_keys_merge_and_come_apart(tiny_model_dir, tmp_path):
    made = []
    for concept in ("a red square", "a blue circle"):
        out = tmp_path / f"{concept.replace(' ', '-')}.safetensors"
        assert main(["erase", "--model", str(tiny_model_dir), "--concept", concept, "--steps", "2",
                     "--out", str(out)]) == 0
        made.append(out)
    with safe_open(str(made[0]), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())  # the default file carries the UNet edit
    stack, back = tmp_path / "both.safetensors", tmp_path / "red-only.safetensors"
    assert main(["merge", str(made[0]), str(made[1]), "--out", str(stack)]) == 0
    with safe_open(str(stack), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
    assert main(["remove", str(stack), "--concept", "a blue circle", "--out", str(back)]) == 0
    with safe_open(str(made[0]), "pt") as a, safe_open(str(back), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert a.get_tensor(key).equal(b.get_tensor(key)), key
