"""The command line end to end on a tiny SD2 folder built from configs."""
import json

import torch

from unlearn_core.cli import build_parser, main
from unlearn_core.diffusers_backend import load_pipeline


def _conditioning(pipe, prompt):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_learn_token_erase_inspect_generate(capsys, sensitive_model_dir, images_dir, tmp_path):
    tiny_model_dir = sensitive_model_dir
    token = tmp_path / "sq.safetensors"
    adapter = tmp_path / "no-square.safetensors"
    assert main(["learn-token", "--model", str(tiny_model_dir), "--images", str(images_dir), "--token", "<sq>",
                 "--steps", "5", "--out", str(token)]) == 0
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "a red square", "--synonym", "a crimson box",
                 "--images", str(images_dir), "--token", str(token), "--steps", "30", "--lr", "1e-3",
                 "--preserve", "a green tree", "--preserve", "", "--preserve-weight", "100", "--out", str(adapter)]) == 0
    assert adapter.with_suffix(".loss.png").is_file()
    capsys.readouterr()

    assert main(["inspect", str(adapter)]) == 0
    info = json.loads(capsys.readouterr().out)
    meta = info["metadata"]
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_v2"] == "True"
    assert meta["concept_unlearn.concept"] == "a red square" and meta["concept_unlearn.token"] == "<sq>"
    assert meta["concept_unlearn.synonyms"] == ["a crimson box"] and meta["concept_unlearn.steps"] == 30

    pipe = load_pipeline(tiny_model_dir)
    prompts = ("a red square", "a crimson box", "a green tree")  # concept, synonym, preserved
    before = {p: _conditioning(pipe, p) for p in prompts}
    pipe.load_lora_weights(str(adapter))
    change = {p: float((_conditioning(pipe, p) - before[p]).abs().mean()) for p in prompts}
    # how far erasure spreads to prompts neither erased nor preserved is measured in bench/, on a trained model
    assert min(change["a red square"], change["a crimson box"]) > 1.8 * change["a green tree"], change

    out = tmp_path / "after.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a photo of <sq>", "--token", str(token),
                 "--adapter", str(adapter), "--sample-steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


def test_full_mode_writes_diff_keys(tiny_model_dir, images_dir, tmp_path):
    adapter = tmp_path / "full.safetensors"
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "a red square", "--images", str(images_dir),
                 "--mode", "full", "--preset", "final", "--steps", "2", "--out", str(adapter)]) == 0
    from safetensors import safe_open

    with safe_open(str(adapter), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["concept_unlearn.mode"] == "full"
    text_encoder = [k for k in keys if k.startswith("lora_te_")]
    assert text_encoder and all(k.endswith(".diff") for k in text_encoder)
    assert all(k.startswith("lora_unet_") for k in set(keys) - set(text_encoder))  # the default key/value edit
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a red square", "--adapter", str(adapter),
                 "--sample-steps", "2", "--out", str(tmp_path / "x.png")]) == 0


def test_every_option_is_documented_in_help():
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        for option in action._actions:
            if option.option_strings and option.dest != "help":
                assert option.help, f"{option.option_strings} has no help text"
