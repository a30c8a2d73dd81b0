"""Adapter and token files that are wrong in ways a loader could miss: refused with one clear error, never written
or accepted silently (issue 15)."""
import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from unlearn_core.adapter_io import (AdapterFileError, base_fingerprint, inspect, read_adapter, read_token,
                                     write_adapter)
from unlearn_core.cli import main
from unlearn_core.lora import Deltas
from unlearn_core.targets import Target

FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def small_deltas(rank=2) -> Deltas:
    return Deltas({Target(0, "fc1"): (128, 32)}, rank=rank)


def save_adapter_file(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"ss_v2": "True"})
    return path


def lora_tensors(name=FC1, dtype=torch.float16):
    return {f"{name}.lora_down.weight": torch.full((2, 32), 0.1, dtype=dtype),
            f"{name}.lora_up.weight": torch.full((128, 2), 0.1, dtype=dtype),
            f"{name}.alpha": torch.tensor(2.0, dtype=dtype)}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


# ---------------------------------------------------------------------------- what is written

def test_adapter_that_overflows_float16_is_refused_and_nothing_is_written(tmp_path):
    deltas = small_deltas()
    with torch.no_grad():
        deltas.up[next(iter(deltas.up.keys()))].fill_(1e5)  # finite in float32, inf in the float16 file
    assert all(bool(torch.isfinite(p).all()) for p in deltas.parameters())
    with pytest.raises(AdapterFileError, match="does not fit float16 .*lower the learning rate"):
        write_adapter(tmp_path / "a.safetensors", deltas, None)
    assert list(tmp_path.iterdir()) == []
    assert write_adapter(tmp_path / "b.safetensors", deltas, None, dtype=torch.float32).is_file()  # fits float32


def test_erase_with_a_huge_alpha_exits_with_an_error_and_writes_nothing(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "a.safetensors"
    code, errors = run_cli(capsys, "erase", "--model", tiny_model_dir, "--concept", "a cat", "--method", "anchor",
                           "--steps", "1", "--alpha", "1e6", "--out", out)
    assert code == 2 and len(errors) == 1 and "does not fit float16" in errors[0], errors
    assert not out.exists()


def test_two_runs_writing_the_same_file_never_both_succeed(tmp_path):
    """"Never overwritten without --force" holds for runs that finish at the same moment: one wins, the others
    get FileExistsError, and the file is the winner's, whole."""
    path = tmp_path / "same.safetensors"
    runs = 8
    start = threading.Barrier(runs)
    outcomes = [None] * runs

    files = [Deltas({Target(n, "fc1"): (2048, 2048) for n in range(4)}, rank=64, seed=i) for i in range(runs)]

    def run(i):
        deltas = files[i]  # a few MB each: writing takes long enough for the runs to overlap
        start.wait()
        try:
            write_adapter(path, deltas, None, {"run": i})
            outcomes[i] = "written"
        except FileExistsError:
            outcomes[i] = "refused"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("written") == 1, outcomes
    assert outcomes.count("refused") == runs - 1
    winner = outcomes.index("written")
    assert read_adapter(path).info("run") == str(winner)
    assert [p.name for p in tmp_path.iterdir()] == ["same.safetensors"]  # no temp file left behind


# ---------------------------------------------------------------------------- what is read

@pytest.mark.parametrize("layer", ["00", "01", "\u0663", "1\n"])
def test_non_canonical_layer_numbers_are_refused(tmp_path, layer):
    """diffusers matches layers by their decimal number and skips these keys: the adapter would act in part."""
    name = f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1"
    path = save_adapter_file(tmp_path / "a.safetensors", lora_tensors(name))
    with pytest.raises(AdapterFileError, match="unexpected key"):
        read_adapter(path)


def test_float8_adapter_is_refused_naming_the_dtype(tmp_path):
    tensors = {k: v.to(torch.float8_e4m3fn) if v.ndim else v for k, v in lora_tensors().items()}
    path = save_adapter_file(tmp_path / "a.safetensors", tensors)
    with pytest.raises(AdapterFileError, match="stored as float8_e4m3fn.*float16, bfloat16 or float32"):
        read_adapter(path)


def test_nan_adapter_is_refused(tmp_path):
    tensors = lora_tensors()
    tensors[f"{FC1}.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match="inf or NaN"):
        read_adapter(save_adapter_file(tmp_path / "a.safetensors", tensors))


@pytest.mark.parametrize("recorded", ["[null]", '{"probe": [null]}', '{"probe": ["x"]}', '{"probe": [[1]]}',
                                      '{"width": "32", "probe": []}', '{"probe": [NaN]}', "[" * 100000 + "]" * 100000])
def test_malformed_fingerprint_metadata_is_a_clear_error(backend, tmp_path, recorded):
    metadata = {"ss_v2": "True", "concept_unlearn.base_fingerprint": recorded}
    path = save_adapter_file(tmp_path / "a.safetensors", small_deltas().to_kohya(torch.float16), metadata)
    with pytest.raises(AdapterFileError, match="fingerprint metadata is damaged"):
        read_adapter(path, backend)


def test_fingerprint_with_the_right_sizes_and_a_huge_probe_number_is_a_clear_error(backend, tmp_path):
    recorded = base_fingerprint(backend)
    recorded["probe"][0] = 10 ** 400  # valid JSON; torch.tensor overflows on it
    metadata = {"ss_v2": "True", "concept_unlearn.base_fingerprint": json.dumps(recorded)}
    path = save_adapter_file(tmp_path / "a.safetensors", small_deltas().to_kohya(torch.float16), metadata)
    with pytest.raises(AdapterFileError, match="fingerprint metadata is damaged"):
        read_adapter(path, backend)


def test_adapter_without_fingerprint_says_its_base_was_not_checked(backend, tmp_path):
    unchecked = write_adapter(tmp_path / "a.safetensors", small_deltas(), None)
    notes = read_adapter(unchecked, backend).notes
    assert len(notes) == 1 and "records no base-model fingerprint" in notes[0] and "a.safetensors" in notes[0]
    checked = write_adapter(tmp_path / "b.safetensors", small_deltas(), base_fingerprint(backend))
    assert read_adapter(checked, backend).notes == []


@pytest.mark.parametrize("stem, recorded", [("cat", None), ("my-token", "a"), ("x", "the")])
def test_token_named_like_a_vocabulary_word_is_refused(tmp_path, stem, recorded):
    """A token called "cat" (or "a") would replace that word in every erase and preserve prompt."""
    metadata = {"concept_unlearn.token": recorded} if recorded else None
    path = tmp_path / f"{stem}.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(path), metadata=metadata)
    with pytest.raises(AdapterFileError, match="ordinary word of the text encoder's vocabulary"):
        read_token(path)


def test_token_with_a_made_up_name_is_read(tmp_path):
    path = tmp_path / "my-cat.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(path), metadata={"concept_unlearn.token": "<my-cat>"})
    assert read_token(path).name == "<my-cat>"
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "sks-token.safetensors"))
    assert read_token(tmp_path / "sks-token.safetensors").name == "sks-token"


def test_learn_token_refuses_a_word_as_the_name_before_loading_anything(capsys, tmp_path):
    code, errors = run_cli(capsys, "learn-token", "--model", tmp_path / "no-model", "--images", tmp_path,
                           "--token", "cat", "--out", tmp_path / "cat.safetensors")
    assert code == 2 and len(errors) == 1 and "ordinary word" in errors[0], errors


# ---------------------------------------------------------------------------- inspect

def test_inspect_calls_only_valid_files_adapters(capsys, tmp_path):
    good = write_adapter(tmp_path / "good.safetensors", small_deltas(), None)
    assert inspect(good)["kind"] == "erasure adapter" and "problem" not in inspect(good)
    nan = lora_tensors()
    nan[f"{FC1}.alpha"] = torch.tensor(float("nan"), dtype=torch.float16)
    bad = {"nan": nan, "unet": {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 4)}}
    for label, tensors in bad.items():
        path = save_adapter_file(tmp_path / f"{label}.safetensors", tensors)
        summary = inspect(path)
        assert summary["kind"] == "unusable" and summary["problem"], label
        code, errors = run_cli(capsys, "inspect", path)
        assert code == 2 and len(errors) == 1 and errors[0] == f"error: {summary['problem']}"


def test_inspect_shows_deeply_nested_metadata_as_text(capsys, tmp_path):
    nested = "[" * 100000 + "]" * 100000
    moderately = json.dumps(json.loads("[" * 200 + "]" * 200))  # decodes, but too deep to print back
    metadata = {"ss_v2": "True", "concept_unlearn.notes": nested, "concept_unlearn.steps": moderately}
    path = save_adapter_file(tmp_path / "a.safetensors", lora_tensors(), metadata)
    summary = inspect(path)
    assert summary["metadata"]["concept_unlearn.notes"] == nested
    assert summary["metadata"]["concept_unlearn.steps"] == moderately
    assert run_cli(capsys, "inspect", path)[0] == 0
