"""Command-line options that used to run, crash with a traceback or fail only after training: one clear line,
checked before the model loads (a missing --model shows the order: the option's error comes first)."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from unlearn_core.cli import main
from unlearn_core.diffusers_backend import ModelLoadError, load_pipeline


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


def erase_args(model, out, *extra):
    return ("erase", "--model", model, "--concept", "a cat", "--method", "anchor", "--steps", "1", "--out", out) + extra


@pytest.mark.parametrize("option, value, expected", [("--strength", "nan", "--strength nan: give a finite number"),
                                                     ("--strength", "inf", "--strength inf: give a finite number"),
                                                     ("--sample-steps", "0", "--sample-steps 0: give 1 or more"),
                                                     ("--sample-steps", "-1", "--sample-steps -1: give 1 or more")])
def test_generate_refuses_meaningless_numbers(capsys, tmp_path, option, value, expected):
    out = tmp_path / "x.png"
    code, errors = run_cli(capsys, "generate", "--model", tmp_path / "no-model", "--prompt", "a cat",
                           option, value, "--out", out)
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert not out.exists()


@pytest.mark.parametrize("device, expected", [("foo", "is not a device torch knows"),
                                              ("cuda", "no CUDA support or sees no GPU")])
def test_unusable_device_is_one_line(capsys, tiny_model_dir, tmp_path, device, expected):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, errors = run_cli(capsys, *erase_args(tiny_model_dir, tmp_path / "a.safetensors", "--device", device))
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors


@pytest.mark.parametrize("seed", [str(2 ** 70), "-1"])
def test_seed_out_of_range_is_refused_by_the_parser(capsys, tiny_model_dir, tmp_path, seed):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in erase_args(tiny_model_dir, tmp_path / "a.safetensors", "--seed", seed)])
    assert exit_info.value.code == 2
    assert "argument --seed: " in capsys.readouterr().err and not (tmp_path / "a.safetensors").exists()


def test_paper_settings_refuse_options_they_would_ignore(capsys, tmp_path):
    code, errors = run_cli(capsys, "erase", "--model", tmp_path / "no-model", "--concept", "a cat",
                           "--paper-settings", "--steps", "3", "--lr", "8", "--out", tmp_path / "a.safetensors")
    assert code == 2 and len(errors) == 1, errors
    assert "--paper-settings fixes" in errors[0] and "ignore --lr, --steps" in errors[0]


def test_paper_settings_keep_synonyms_kind_and_seed(capsys, tmp_path):
    code, errors = run_cli(capsys, "erase", "--model", tmp_path / "no-model", "--concept", "a cat", "--paper-settings",
                           "--synonym", "a kitten", "--kind", "style", "--seed", "3", "--out", tmp_path / "a.safetensors")
    assert code == 2 and len(errors) == 1 and "no-model does not exist" in errors[0], errors  # got to the model


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permission bits: use a folder no one can write in
        folder = Path("/sys")
        if os.access(folder, os.W_OK) and not _cannot_create_in(folder):
            pytest.skip("no read-only folder available")
    yield folder
    (tmp_path / "read-only").chmod(0o755)


def _cannot_create_in(folder):
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("case", ["read-only folder", "upper-case suffix", "existing folder", "file as folder"])
def test_bad_out_is_refused_before_the_model_loads(capsys, tmp_path, read_only_folder, case):
    existing = tmp_path / "taken.safetensors"
    existing.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out, expected = {"read-only folder": (read_only_folder / "a.safetensors", "cannot write in"),
                     "upper-case suffix": (tmp_path / "x.SAFETENSORS", "must end in .safetensors"),
                     "existing folder": (existing, "is a folder"),
                     "file as folder": (blocker / "sub" / "a.safetensors", "is a file, not a folder")}[case]
    for force in ((), ("--force",)):
        code, errors = run_cli(capsys, *erase_args(tmp_path / "no-model", out, *force))
        assert code == 2 and len(errors) == 1 and expected in errors[0], (case, errors)


def test_missing_image_folder_is_refused_before_the_model_loads(capsys, tmp_path):
    code, errors = run_cli(capsys, "erase", "--model", tmp_path / "no-model", "--concept", "a cat",
                           "--images", tmp_path / "no-images", "--out", tmp_path / "a.safetensors")
    assert code == 2 and len(errors) == 1 and "image folder" in errors[0], errors


def test_truncated_text_encoder_file_is_named(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"text_encoder/model.safetensors .* is damaged or truncated"):
        load_pipeline(model)


def test_truncated_model_is_one_line_on_the_command_line(capsys, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, errors = run_cli(capsys, *erase_args(model, tmp_path / "a.safetensors"))
    assert code == 2 and len(errors) == 1 and "damaged or truncated" in errors[0], errors


def test_adapter_without_fingerprint_is_noted_when_generating(capsys, tiny_model_dir, tmp_path):
    from unlearn_core.adapter_io import write_adapter
    from unlearn_core.lora import Deltas
    from unlearn_core.targets import Target

    adapter = write_adapter(tmp_path / "a.safetensors", Deltas({Target(0, "fc1"): (128, 32)}, rank=2), None)
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a cat", "--adapter", str(adapter),
                 "--sample-steps", "1", "--out", str(tmp_path / "x.png")]) == 0
    assert "note: a.safetensors records no base-model fingerprint" in capsys.readouterr().err
