"""The tab's Merge and Remove (scripts/concept_unlearn_logic.py do_merge / do_remove) on adapters the tab's Erase
wrote for the small A1111-shaped model: the stack changes A1111's weights by the sum of what its parts change
(A1111's LoRA arithmetic as tests/a1111_reference.py re-implements it), and removing a part gives back the other
part's file bit for bit."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import a1111_reference as ref  # noqa: E402
from closeness import relative_error  # noqa: E402
from test_a1111_cu_logic import State, files, host, logic  # noqa: E402,F401
from unlearn_core import stacking  # noqa: E402
from test_a1111_backend import sd_model, sd_model_factory, tokenizer  # noqa: E402,F401

ANCHOR = "Anchor (no images needed)"


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def _weight_changes(sd_model, tensors, strength=1.0):
    blocks = sd_model.cond_stage_model.model.transformer.resblocks
    params = dict(blocks.named_parameters())
    with torch.no_grad():
        return {name: value.double() - params[name].double()
                for name, value in ref.merged_weights(blocks, tensors, strength).items()}


def test_merge_in_the_tab_then_remove_gives_back_the_file(host, files, sd_model):
    paths = {}
    for concept, preset in (("cat", "Last layer"), ("dog", "Few-shot layers (MLP of all + last attention)")):
        message, path, _ = logic.do_erase(host, files, concept, "", "", ANCHOR, preset, 1, 2, 0)
        assert path, message
        paths[concept] = Path(path)

    message, stack, curve = logic.do_merge(host, ["unlearn_cat", "unlearn_dog"], "1, 0.5", name="pets")
    assert message.startswith("Saved unlearn_pets.safetensors: cat, dog x0.5") and curve is None, message
    assert Path(stack).parent == host.lora_dir and host.state.jobs == ["concept_unlearn"] * 2  # no job of its own

    stacked = _weight_changes(sd_model, _tensors(stack)[0])
    cat = _weight_changes(sd_model, _tensors(paths["cat"])[0])
    dog = _weight_changes(sd_model, _tensors(paths["dog"])[0], strength=0.5)
    assert set(stacked) == set(cat) | set(dog)
    for name, change in stacked.items():
        expected = cat.get(name, 0) + dog.get(name, 0)
        assert relative_error(change, expected) < 1e-3, name  # float32 rounding of weight + small change

    message, back, _ = logic.do_remove(host, "unlearn_pets", "dog")
    assert message.startswith("Saved unlearn_pets_without_dog.safetensors: the adapter of cat"), message
    restored, restored_metadata = _tensors(back)
    original, original_metadata = _tensors(paths["cat"])
    assert restored.keys() == original.keys() and all(torch.equal(restored[k], original[k]) for k in original)
    assert restored_metadata == original_metadata


def test_merge_and_remove_answer_with_one_line(host, files):
    assert logic.do_merge(host, [], "")[0].startswith("Error: adapters: pick")
    assert logic.do_merge(host, "unlearn_missing", "")[0].startswith("Error: adapter: no unlearn_missing.safetensors")
    _, path, _ = logic.do_erase(host, files, "cat", "", "", ANCHOR, "Last layer", 1, 2, 0)
    assert logic.do_merge(host, "unlearn_cat", "1, 2")[0].startswith("Error: strengths: 2 given for 1 adapter(s)")
    assert "both erase 'cat'" in logic.do_merge(host, "unlearn_cat, unlearn_cat", "")[0]
    message, stack, _ = logic.do_merge(host, "unlearn_cat", "0.5", name="half")
    assert stack and "cat x0.5" in message
    again = logic.do_merge(host, "unlearn_cat", "0.5", name="half")[0]
    assert again.startswith("Error: unlearn_half.safetensors already exists") and "\n" not in again
    assert logic.do_remove(host, "unlearn_cat", "cat")[0].startswith("Error: unlearn_cat.safetensors is not a stack")
    assert "only part" in logic.do_remove(host, "unlearn_half", "cat")[0]
    assert logic.do_remove(host, "", "cat")[0].startswith("Error: stack: pick")


CONTEXTUAL = "Contextual (default; images optional, no UNet pass)"


def _erase(host, files, concept, erase_after="", name=""):
    return logic.do_erase(host, files, concept, "", "", CONTEXTUAL, "Last layer", 3, 2, 0, name=name,
                          keep="green circle", contexts="a {} on a table\na big {} in a room",
                          erase_after=erase_after, unet_kv_edit=False)  # the tiny UNet is not SD 2.x's layout


def test_erase_after_an_earlier_adapter_saves_the_grown_stack(host, files):
    message, earlier, _ = _erase(host, files, "red square")
    assert earlier, message
    before = Path(earlier).read_bytes()
    message, path, curve = _erase(host, files, "blue triangle", erase_after=Path(earlier).stem)
    assert path and curve is not None, message
    assert "unlearn_red_square.safetensors is unchanged" in message and "\n" not in message
    stacked = stacking.load(path)
    assert [p.concept for p in stacking.unstack(stacked)] == ["red square", "blue triangle"]
    assert Path(earlier).read_bytes() == before  # the earlier file is untouched
    # the new part comes out again with the tab's Remove, leaving the earlier adapter
    message, rest, _ = logic.do_remove(host, Path(path).stem, "blue triangle")
    assert rest and [p.concept for p in stacking.load(rest).parts("rest")] == ["red square"], message
    # "none" (the list's first choice) is a plain erasure
    message, plain, _ = _erase(host, files, "green star", erase_after="none")
    assert plain and not stacking.load(plain).is_stack, message


def test_erase_after_a_bad_earlier_file_is_one_line(host, files, sd_model_factory, tokenizer, tmp_path):
    (Path(host.lora_dir)).mkdir(parents=True, exist_ok=True)
    (Path(host.lora_dir) / "broken.safetensors").write_bytes(b"not a safetensors file")
    message, path, _ = _erase(host, files, "blue triangle", erase_after="broken")
    assert message.startswith("Error: ") and "broken.safetensors" in message and "\n" not in message and not path
    message, path, _ = logic.do_erase(host, files, "blue triangle", "", "", ANCHOR, "Last layer", 1, 2, 0,
                                      erase_after="broken")
    assert message.startswith("Error: erase after: ") and "contextual" in message and not path
    message, path, _ = _erase(host, files, "blue triangle", erase_after="nosuchfile")
    assert message.startswith("Error: erase after: no nosuchfile.safetensors") and not path
    # an adapter made for another base model (other text-encoder weights) is refused before any training
    other = sd_model_factory()
    with torch.no_grad():
        for parameter in other.cond_stage_model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    other_host = logic.Host(sd_model=other, lora_dir=host.lora_dir, embeddings_dir=host.embeddings_dir,
                            state=State(), tokenizer=tokenizer, resolution=32)
    _, foreign, _ = _erase(other_host, files, "red square", name="foreign")
    assert foreign
    host.state.textinfo = None
    message, path, _ = _erase(host, files, "blue triangle", erase_after="unlearn_foreign")
    assert message.startswith("Error: ") and "another base model" in message and not path
    assert host.state.textinfo is None  # no training step ran


def test_merging_parts_that_undo_each_other_says_so_in_the_message(host, files):
    from safetensors.torch import save_file

    paths = {}
    for concept in ("cat", "dog"):
        paths[concept] = Path(logic.do_erase(host, files, concept, "", "", ANCHOR, "Last layer", 1, 2, 0)[1])
    tensors, metadata = _tensors(paths["cat"])  # as a contextual erasure that sent "cat" to "dog" records it
    save_file(tensors, str(paths["cat"]), {**metadata, "concept_unlearn.neighbour_targets": '{"cat": "dog"}'})
    message = logic.do_merge(host, ["unlearn_cat", "unlearn_dog"], "", name="pets")[0]
    assert message.startswith("Saved unlearn_pets.safetensors") and "Warning: unlearn_cat.safetensors sends 'cat' " \
        "to 'dog', which unlearn_dog.safetensors erases: merged, the two can undo each other" in message, message
