"""Command-line options that confused new users (issue 15 item 2): what --token meant, and a FutureWarning
printed on every run by the project's own model loading."""
from __future__ import annotations

import warnings

import pytest
import torch

from unlearn_core.cli import build_parser, main


def test_token_options_say_name_or_file_and_the_old_spelling_still_works():
    parser = build_parser()
    base = ["--model", "m", "--out", "o.safetensors"]
    for flag in ("--name", "--token"):
        args = parser.parse_args(["learn-token", "--images", "i", flag, "<my-cat>"] + base)
        assert args.name == "<my-cat>"
    for command in (["erase", "--concept", "a cat"], ["generate", "--prompt", "a cat"]):
        for flag in ("--token-file", "--token"):
            args = parser.parse_args(command + [flag, "my-cat.safetensors"] + base)
            assert args.token_file == "my-cat.safetensors"
    help_text = {name: sub.format_help() for name, sub in parser._subparsers._group_actions[0].choices.items()}
    assert "--name NAME" in help_text["learn-token"] and "prompts" in help_text["learn-token"]
    assert "--token-file FILE" in help_text["erase"] and "--token-file FILE" in help_text["generate"]


def test_a_token_name_where_a_file_belongs_is_one_clear_line_before_the_model_loads(tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    missing_model = str(tmp_path / "no-model")  # never reached: the option is checked first
    assert main(["erase", "--model", missing_model, "--concept", "a cat", "--token", "<my-cat>", "--out", out]) == 2
    error = capsys.readouterr().err
    assert "--token-file <my-cat>" in error and "not the token's name" in error and "no-model" not in error
    assert main(["generate", "--model", missing_model, "--prompt", "a cat", "--token-file", "gone.safetensors",
                 "--out", str(tmp_path / "a.png")]) == 2
    assert "--token-file gone.safetensors: no such file" in capsys.readouterr().err


def test_a_file_name_where_a_token_name_belongs_is_refused(tmp_path, capsys, images_dir):
    assert main(["learn-token", "--model", str(tmp_path / "no-model"), "--images", str(images_dir),
                 "--token", "my-cat.safetensors", "--out", str(tmp_path / "my-cat.safetensors")]) == 2
    error = capsys.readouterr().err
    assert "the file it is saved to goes in --out" in error and "no-model" not in error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loading_a_model_prints_no_future_warning_and_keeps_the_dtype(tiny_model_dir, dtype):
    from unlearn_core.diffusers_backend import load_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(tiny_model_dir, dtype=dtype)
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == dtype
