"""Stacks of erasure adapters (unlearn_core/stacking.py): the merged file's effect is the parts' deltas added,
removing a part gives back the others bit for bit, and the file loads in diffusers like any adapter."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from closeness import effect_error, relative_effect, relative_error
from unlearn_core import stacking
from unlearn_core.adapter_io import AdapterFileError, base_fingerprint, read_adapter, write_adapter
from unlearn_core.cli import main
from unlearn_core.diffusers_backend import load_pipeline
from unlearn_core.lora import Deltas, target_shapes
from unlearn_core.targets import Target, complete_attention


def _adapter_file(folder, backend, concept, targets, rank, alpha, seed, dtype=torch.float16, fingerprint=None):
    """A written adapter with random, non-zero deltas on ``targets`` (as the erase command writes them)."""
    deltas = Deltas(target_shapes(backend.linear, complete_attention(targets)), rank=rank, alpha=alpha, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for up in deltas.up.values():
            up.copy_(torch.randn(up.shape, generator=generator) * 0.3)
    info = {"concept": concept, "method": "contextual", "steps": 3, "audit": {"conditioning_shift": {concept: 0.5}}}
    fingerprint = base_fingerprint(backend) if fingerprint is None else fingerprint
    return write_adapter(folder / f"{concept.replace(' ', '-')}.safetensors", deltas, fingerprint, info, dtype=dtype)


@pytest.fixture
def parts(backend, tmp_path):
    """Three adapters with different ranks, alphas and (overlapping) modules."""
    return [
        _adapter_file(tmp_path, backend, "a red square", [Target(0, "fc1"), Target(1, "fc2")], 4, 1.0, seed=1),
        _adapter_file(tmp_path, backend, "a blue circle", [Target(1, "fc2"), Target(2, "q")], 2, 3.0, seed=2),
        _adapter_file(tmp_path, backend, "stripes", [Target(0, "fc1"), Target(2, "fc1")], 3, 3.0, seed=3),
    ]


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def _assert_same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        bits = stacking._BITS[a[key].dtype]
        assert torch.equal(a[key].reshape(-1).view(bits), b[key].reshape(-1).view(bits)), key


def _delta_sum(paths_and_strengths):
    total = {}
    for path, strength in paths_and_strengths:
        deltas = read_adapter(path).deltas
        for t in deltas.targets:
            total[t] = total.get(t, 0) + strength * deltas.delta_weight(t).double()
    return total


def test_stack_is_the_exact_sum_of_its_parts(parts):
    strengths = [1.0, 0.7, -1.3]
    stack = stacking.merge(stacking.parts_from_files(parts, strengths))
    assert stack.is_stack and all(t.dtype == torch.float32 for t in stack.tensors.values())
    deltas = Deltas.from_kohya(stack.tensors)
    assert deltas.rank == 4 + 2 + 3
    assert {float(t) for k, t in stack.tensors.items() if k.endswith(".alpha")} == {9.0}  # scale 1 for every part
    expected = _delta_sum(zip(parts, strengths))
    assert set(deltas.targets) == set(expected)  # modules of any part, zero blocks where a part has none
    for t, weight in expected.items():
        assert relative_error(deltas.delta_weight(t).double(), weight) < 1e-6, t

    record = json.loads(stack.metadata[stacking.STACK_KEY])
    assert [p["ranks"] for p in record["parts"]] == [[0, 4], [4, 6], [6, 9]]
    assert [p["concept"] for p in record["parts"]] == ["a red square", "a blue circle", "stripes"]
    assert [p["file"] for p in record["parts"]] == [p.name for p in parts]
    assert record["parts"][1]["strength"] == 0.7 and record["parts"][0]["alpha"] == 1.0
    assert json.loads(record["parts"][2]["metadata"]["concept_unlearn.audit"]) == {"conditioning_shift": {"stripes": 0.5}}
    assert stack.metadata["ss_network_dim"] == "9" and stack.metadata["ss_network_alpha"] == "9"


def test_remove_gives_back_the_other_parts_bit_for_bit(parts, tmp_path):
    a, b, c = parts
    abc = stacking.merge(stacking.parts_from_files([a, b, c]))
    ac = stacking.merge(stacking.parts_from_files([a, c]))
    without_b = stacking.remove(abc, "a blue circle")
    _assert_same_bits(without_b.tensors, ac.tensors)
    assert without_b.metadata == ac.metadata

    only_a = stacking.remove(without_b, "stripes.safetensors")  # by file name too
    original, metadata = _tensors(a)
    _assert_same_bits(only_a.tensors, original)  # the original file: float16, its own alpha, its metadata
    assert only_a.metadata == metadata and not only_a.is_stack


def test_merge_then_remove_files_gives_back_the_original_file(parts, tmp_path):
    a, b, _ = parts
    merged, _ = stacking.merge_files([a, b], tmp_path / "ab.safetensors")
    assert read_adapter(merged).deltas.rank == 6  # a valid adapter for our own reader
    out, _ = stacking.remove_from_file(merged, "A Blue Circle", tmp_path / "back.safetensors")
    back, back_metadata = _tensors(out)
    original, metadata = _tensors(a)
    _assert_same_bits(back, original)
    assert back_metadata == metadata


def test_stacks_inside_a_merge_open_into_their_parts(parts, tmp_path):
    a, b, c = parts
    ab, _ = stacking.merge_files([a, b], tmp_path / "ab.safetensors", strengths=[1.0, 0.5])
    nested = stacking.merge(stacking.parts_from_files([ab, c], [2.0, 1.0]))
    flat = stacking.merge(stacking.parts_from_files([a, b, c], [2.0, 1.0, 1.0]))
    _assert_same_bits(nested.tensors, flat.tensors)
    assert [p.strength for p in stacking.unstack(nested)] == [2.0, 1.0, 1.0]


def test_float32_parts_with_awkward_scales_stay_exact(backend, tmp_path):
    a = _adapter_file(tmp_path, backend, "a", [Target(0, "fc1")], 3, 1.0, seed=4, dtype=torch.float32)
    b = _adapter_file(tmp_path, backend, "b", [Target(0, "fc1")], 2, 2.0, seed=5, dtype=torch.float32)
    stack = stacking.merge(stacking.parts_from_files([a, b], [0.3, 1.0]))
    assert stack.tensors[f"{Target(0, 'fc1').kohya_name}.lora_up.weight"].dtype == torch.float64
    _assert_same_bits(stacking.remove(stack, "a").tensors, _tensors(b)[0])


def test_other_base_models_are_refused(backend, parts, tmp_path):
    other = dict(base_fingerprint(backend))
    other["probe"] = [v + 0.5 for v in other["probe"]]
    foreign = _adapter_file(tmp_path, backend, "a dog", [Target(0, "fc1")], 2, 2.0, seed=6, fingerprint=other)
    with pytest.raises(AdapterFileError, match="different base models"):
        stacking.merge(stacking.parts_from_files([parts[0], foreign]))
    assert stacking.merge(stacking.parts_from_files([parts[0], foreign]), allow_other_base=True).is_stack

    tensors, metadata = _tensors(parts[1])
    del metadata["concept_unlearn.base_fingerprint"]
    unchecked = tmp_path / "unchecked.safetensors"
    save_file(tensors, str(unchecked), metadata)
    with pytest.raises(AdapterFileError, match="records no base-model fingerprint"):
        stacking.merge(stacking.parts_from_files([parts[0], unchecked]))


def test_bad_stacks_are_refused_clearly(backend, parts, tmp_path):
    with pytest.raises(ValueError, match="both erase 'a red square'"):
        stacking.merge(stacking.parts_from_files([parts[0], parts[0]]))
    with pytest.raises(ValueError, match="other than 0"):
        stacking.merge(stacking.parts_from_files([parts[0], parts[1]], [1.0, 0.0]))
    with pytest.raises(ValueError, match="one per adapter"):
        stacking.parts_from_files(parts, [1.0])
    with pytest.raises(ValueError, match="nothing to merge"):
        stacking.merge([])
    with pytest.raises(AdapterFileError, match="not a stack"):
        stacking.remove(stacking.load(parts[0]), "a red square")

    full = Deltas(target_shapes(backend.linear, [Target(0, "fc1")]), mode="full")
    full_file = write_adapter(tmp_path / "full.safetensors", full, base_fingerprint(backend), {"concept": "full"})
    with pytest.raises(AdapterFileError, match="full-weight deltas"):
        stacking.merge(stacking.parts_from_files([parts[0], full_file]))

    stack = stacking.merge(stacking.parts_from_files(parts[:2]))
    with pytest.raises(ValueError, match="has no part 'a cat'; its parts: 'a red square'"):
        stacking.remove(stack, "a cat")
    alone = stacking.merge(stacking.parts_from_files(parts[:1], [0.5]))
    with pytest.raises(ValueError, match="only part"):
        stacking.remove(alone, "a red square")

    damaged = stack.with_info(stack="{not json")
    with pytest.raises(AdapterFileError, match="stack record .* is damaged"):
        stacking.unstack(damaged)
    record = json.loads(stack.metadata[stacking.STACK_KEY])
    record["parts"][1]["ranks"] = [3, 6]
    with pytest.raises(AdapterFileError, match="rank ranges"):
        stacking.unstack(stacking.StoredAdapter(stack.tensors, {**stack.metadata, stacking.STACK_KEY: json.dumps(record)}))
    edited = dict(stack.tensors)
    key = f"{Target(2, 'q').kohya_name}.lora_down.weight"  # adapted by the second part only
    edited[key] = edited[key].clone()
    edited[key][0] = 1.0  # in the first part's rank range
    with pytest.raises(AdapterFileError, match="edited after stacking"):
        stacking.unstack(stacking.StoredAdapter(edited, stack.metadata))


def _conditioning(pipe, prompt):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_stack_loads_in_diffusers_with_the_parts_effect(parts, tiny_model_dir, tmp_path):
    strengths = [1.0, 0.5, 1.0]
    merged, _ = stacking.merge_files(parts, tmp_path / "stack.safetensors", strengths)
    prompt = "a photo of a red square next to a blue circle"

    together = load_pipeline(tiny_model_dir)
    before = _conditioning(together, prompt)
    for i, path in enumerate(parts):
        together.load_lora_weights(str(path), adapter_name=f"part{i}")
    together.set_adapters([f"part{i}" for i in range(len(parts))], adapter_weights=strengths)
    expected = _conditioning(together, prompt)

    stacked = load_pipeline(tiny_model_dir)
    stacked.load_lora_weights(str(merged))
    got = _conditioning(stacked, prompt)
    assert relative_effect(expected, before) > 1e-2, "the parts should change the conditioning"
    assert effect_error(got, expected, before) < 1e-3


def test_cli_merge_and_remove(parts, tmp_path, capsys):
    a, b, c = parts
    out = tmp_path / "abc.safetensors"
    args = ["merge", str(a), str(b), str(c), "--strength", "1", "--strength", "0.5", "--strength", "1", "--out", str(out)]
    assert main(args) == 0
    assert "a stack of 3 (a red square, a blue circle x0.5, stripes), rank 9" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(args) == 2  # no overwrite without --force
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(args + ["--force"]) == 0

    ac = tmp_path / "ac.safetensors"
    assert main(["remove", str(out), "--concept", "a blue circle", "--out", str(ac)]) == 0
    assert main(["remove", str(out), "--concept", "a blue circle", "--out", str(ac)]) == 2
    expected = stacking.merge(stacking.parts_from_files([a, c]))
    _assert_same_bits(_tensors(ac)[0], expected.tensors)

    assert main(["remove", str(out), "--concept", "a dog", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "has no part 'a dog'" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--strength", "2", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert main(["inspect", str(ac)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "erasure adapter"
