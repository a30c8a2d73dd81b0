"""Every bad input gets one clear line that says what is wrong and what to do; nothing is written."""
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import build_sd1_like_pipeline
from unlearn_core.adapter_io import AdapterFileError, base_fingerprint, read_adapter, read_token, write_adapter
from unlearn_core.backend import UnsupportedModelError
from unlearn_core.cli import main
from unlearn_core.config import EraseConfig
from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.erase import erase
from unlearn_core.images import ImageInputError, load_images
from unlearn_core.lora import Deltas
from unlearn_core.targets import Target


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    return code, errors


def test_folder_without_images_is_refused(tmp_path):
    with pytest.raises(ImageInputError, match="no images .* add 4-5 example images"):
        load_images(tmp_path, 16)


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageInputError, match="cannot read image .*broken.png"):
        load_images(tmp_path, 16)


def test_non_rgb_and_odd_sized_images_are_converted_with_a_note(tmp_path):
    Image.new("L", (20, 13), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(tmp_path / "alpha.png")
    images, notes = load_images(tmp_path, 16)
    assert images.shape == (2, 3, 16, 16)
    assert any("converted from L to RGB" in n for n in notes)
    assert any("resized from 20x13 to 16x16" in n for n in notes)
    assert any("converted from RGBA to RGB" in n for n in notes)


def test_methods_that_need_images_say_so(backend):
    with pytest.raises(ValueError, match="needs example images"):
        erase(backend, EraseConfig(concept="a cat", method="fewshot"))


def test_empty_concept_on_the_command_line(capsys, tiny_model_dir, tmp_path):
    code, errors = run_cli(capsys, "erase", "--model", tiny_model_dir, "--concept", " ", "--method", "anchor",
                           "--out", tmp_path / "a.safetensors")
    assert code == 2 and errors == ["error: concept: is empty; name the concept to erase, e.g. 'a red star'"]
    assert not (tmp_path / "a.safetensors").exists()


def test_missing_model_path(capsys, tmp_path):
    code, errors = run_cli(capsys, "erase", "--model", tmp_path / "nowhere", "--concept", "a cat",
                           "--method", "anchor", "--out", tmp_path / "a.safetensors")
    assert code == 2 and len(errors) == 1 and "does not exist" in errors[0]


def test_sd1_model_is_refused_naming_what_was_found():
    with pytest.raises(UnsupportedModelError, match="Stable Diffusion 1.x .*768 wide, quick_gelu"):
        DiffusersBackend(build_sd1_like_pipeline())


@pytest.mark.parametrize("key, found", [("conditioner.embedders.0.transformer.x", "SDXL"),
                                        ("cond_stage_model.transformer.text_model.x", "Stable Diffusion 1.x")])
def test_single_file_of_another_family_is_refused(tmp_path, key, found):
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1)}, str(path))
    with pytest.raises(UnsupportedModelError, match=found):
        load_pipeline(path)


def test_existing_output_is_not_overwritten(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"precious")
    code, errors = run_cli(capsys, "erase", "--model", tiny_model_dir, "--concept", "a cat", "--method", "anchor",
                           "--steps", "1", "--out", out)
    assert code == 2 and "already exists" in errors[0]
    assert out.read_bytes() == b"precious"


def test_output_name_is_checked_before_training(capsys, tiny_model_dir, tmp_path):
    code, errors = run_cli(capsys, "erase", "--model", tiny_model_dir, "--concept", "a cat", "--method", "anchor",
                           "--steps", "1", "--out", tmp_path / "no-cat.lora")
    assert code == 2 and "must end in .safetensors" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder_is_one_line(capsys, tiny_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, errors = run_cli(capsys, "erase", "--model", tiny_model_dir, "--concept", "a cat", "--method", "anchor",
                           "--steps", "1", "--out", blocker / "no-cat.safetensors")
    assert code == 2 and errors[0].startswith("error:") and len(errors) == 1


def test_adapter_for_another_base_model_is_refused(backend, other_model_dir, tmp_path):
    deltas = Deltas({Target(0, "fc1"): (128, 32)}, rank=2)
    path = write_adapter(tmp_path / "a.safetensors", deltas, base_fingerprint(backend))
    other = DiffusersBackend(load_pipeline(other_model_dir))
    with pytest.raises(AdapterFileError, match="made for another base model"):
        read_adapter(path, other)
    assert read_adapter(path, other, allow_other_base=True).deltas.targets == [Target(0, "fc1")]
    assert read_adapter(path, backend).deltas.rank == 2


@pytest.mark.parametrize("recorded", ["[1, 2]", "{not json", '{"probe": 3}'])
def test_damaged_fingerprint_metadata_is_a_clear_error(backend, tmp_path, recorded):
    deltas = Deltas({Target(0, "fc1"): (128, 32)}, rank=2)
    path = tmp_path / "a.safetensors"
    metadata = {"ss_v2": "True", "concept_unlearn.base_fingerprint": recorded}
    save_file({k: v.contiguous() for k, v in deltas.to_kohya(torch.float16).items()}, str(path), metadata=metadata)
    with pytest.raises(AdapterFileError, match="fingerprint metadata is damaged"):
        read_adapter(path, backend)
    assert read_adapter(path, backend, allow_other_base=True).deltas.rank == 2


def test_adapter_without_fingerprint_loads_and_keeps_the_usual_file_mode(backend, tmp_path):
    import os
    import stat

    path = write_adapter(tmp_path / "a.safetensors", Deltas({Target(0, "fc1"): (128, 32)}, rank=2), None)
    assert read_adapter(path, backend).fingerprint is None
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


def test_adapter_with_wrong_shapes_is_refused(backend, tmp_path):
    path = write_adapter(tmp_path / "a.safetensors", Deltas({Target(0, "fc1"): (4096, 1024)}, rank=2), {})
    with pytest.raises(AdapterFileError, match="made for another model"):
        read_adapter(path, backend)


def test_truncated_adapter_is_refused(backend, tmp_path):
    path = write_adapter(tmp_path / "a.safetensors", Deltas({Target(0, "fc1"): (128, 32)}, rank=2),
                         base_fingerprint(backend))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="corrupted or truncated"):
        read_adapter(path, backend)


def test_pickle_is_never_loaded_as_an_adapter(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(AdapterFileError, match="not a readable .safetensors"):
        read_adapter(path)


def test_foreign_keys_are_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(AdapterFileError, match="unexpected key"):
        read_adapter(path)


def test_token_of_another_width_is_refused(backend, tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"emb_params": torch.zeros(1, 1024)}, str(path))
    with pytest.raises(AdapterFileError, match="1024-wide vectors, this model's text encoder is 32 wide"):
        read_token(path, backend)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_ckpt_with_code_is_refused_without_running_it(tmp_path, capsys):
    from unlearn_core.diffusers_backend import ModelLoadError

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"cond_stage_model.model.x": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(ModelLoadError, match="cannot be read safely"):
        load_pipeline(path)
    assert "this must never run" not in capsys.readouterr().out
