"""Continual erasure (issue 13 item 2): concepts erased one after another, each run on the model with the earlier
erasures applied, into one file that grows by concept (unlearn_core/continual.py), on tiny models."""
from contextlib import ExitStack

import pytest
import torch
from safetensors import safe_open

from conftest import assert_identical, snapshot
from unlearn_core import kv_edit, prompt_cache, stacking
from unlearn_core.adapter_io import base_fingerprint, read_adapter, write_adapter
from unlearn_core.cli import main
from unlearn_core.config import EraseConfig, LoraConfig
from unlearn_core.continual import grown, read_earlier
from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.erase import applied_earlier, concept_shares, continual_targets, earlier_keep, erase
from unlearn_core.tokens import encode

CONTEXTS = ("a {} on a table", "a big {} in a room", "a small {} on grass")
EARLIER, NEW, NEIGHBOUR = "a red square on a table", "a blue triangle on a table", "a green circle on a table"


def _config(concept, **overrides):
    settings = dict(method="contextual", contexts=CONTEXTS, keep=("green circle",), steps=150, lr=1e-2,
                    max_contexts=8, lora=LoraConfig(preset="all"), unet_kv_edit=True) | overrides
    return EraseConfig(concept=concept, **settings)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _earlier_file(backend, folder, steps=150, concept="red square", synonyms=("crimson square",)):
    result = erase(backend, _config(concept, synonyms=synonyms, steps=steps))
    return write_adapter(folder / "red.safetensors", result.deltas, base_fingerprint(backend), result.info(),
                         unet=result.unet_deltas)


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _encode(backend, prompts, *deltas):
    """The prompts' conditioning with ``deltas`` hooked."""
    with torch.no_grad(), ExitStack() as stack:
        for d in deltas:
            stack.enter_context(d.inject(backend.linear))
        return {p: encode(backend, [p]) for p in prompts}


def test_keep_targets_are_the_earlier_concepts_on_the_model_with_the_earlier_erasures(backend, tmp_path,
                                                                                       monkeypatch):
    earlier = read_earlier(_earlier_file(backend, tmp_path, steps=30), backend)
    assert earlier.concepts == ("red square",) and earlier.phrases == ("red square", "crimson square")
    config = _config("blue triangle", steps=2)
    shares, _, _ = concept_shares(config)
    kept = earlier_keep(config, [earlier], shares)
    assert EARLIER in kept and "a big crimson square in a room" in kept and not any("blue" in k for k in kept)
    prompts = [EARLIER, NEIGHBOUR]
    with torch.no_grad():
        with applied_earlier(backend, [earlier]):  # what the run's frozen targets are computed on
            applied = {p: encode(backend, [p]) for p in prompts}
        with earlier.deltas.inject(backend.linear):
            reference = {p: encode(backend, [p]) for p in prompts}
        plain = {p: encode(backend, [p]) for p in prompts}  # hooks gone again
    for p in prompts:
        assert _relative(applied[p], reference[p]) < 1e-6 and _relative(plain[p], reference[p]) > 1e-3
    # the run's own frozen conditionings: the earlier concept's keep target is its conditioning under the earlier
    # adapter, so training holds it there (kept erased), not at the clean model's
    frozen_calls = []
    real_frozen = prompt_cache.PromptEncoder.frozen
    def recording(self, prompts, *args, **kwargs):
        frozen_calls.append((list(prompts), real_frozen(self, prompts, *args, **kwargs)))
        return frozen_calls[-1][1]
    monkeypatch.setattr(prompt_cache.PromptEncoder, "frozen", recording)
    erase(backend, config, earlier=earlier)
    targets = {p: cond for prompts, conds in frozen_calls for p, cond in zip(prompts, conds)}
    assert _relative(targets[EARLIER][None], reference[EARLIER]) < 1e-5
    assert _relative(targets[NEIGHBOUR][None], reference[NEIGHBOUR]) < 1e-5
    monkeypatch.undo()
    with pytest.raises(ValueError, match="erased by an earlier adapter"):
        erase(backend, _config("crimson square", steps=2), earlier=earlier)
    with pytest.raises(ValueError, match="contextual method"):
        erase(backend, EraseConfig(concept="blue triangle", method="anchor", steps=1), earlier=earlier)


def test_a_concept_erased_earlier_is_kept_but_never_a_target(backend, tmp_path):
    """Mutual nearest neighbours erased one after the other (orange, then red) would cancel: the second would go
    to where the first erasure sent the first, next to itself."""
    earlier = read_earlier(_earlier_file(backend, tmp_path, steps=30), backend)
    config = _config("blue triangle", steps=2, keep=("red square", "green circle"), neighbour_target="nearest")
    shares, _, _ = concept_shares(config)
    unmoved = [torch.ones(2)]
    trimmed, followers, notes = continual_targets(shares, [earlier], unmoved, unmoved)
    assert trimmed[0].neighbours == ("green circle",) and followers == [()] and "red square" in notes[0]
    assert continual_targets(shares, [], unmoved, unmoved) == (shares, [()], [])
    assert EARLIER in earlier_keep(config, [earlier], shares)  # still kept, at its erased conditioning
    result = erase(backend, config, earlier=earlier)
    assert any("never a target: red square" in n for n in result.notes)
    assert any("becomes its nearest neighbour 'green circle'" in n for n in result.notes)


def test_a_neighbour_pulled_onto_the_concept_is_never_a_target_and_goes_with_it():
    """Yellow erased onto orange carries "lemon" (a phrasing the engine was not told) with it: erasing orange next,
    "lemon" must neither be orange's target nor be held where it now renders as orange."""
    config = _config("orange", steps=2, keep=("yellow", "lemon", "green"), neighbour_target="nearest")
    shares, _, _ = concept_shares(config)
    earlier = type("Earlier", (), {"phrases": ("yellow",), "sent": ()})()
    clean, now = [torch.tensor([1.0, 1.0, 1.0])], [torch.tensor([0.3, 0.3, 0.9])]
    trimmed, followers, notes = continual_targets(shares, [earlier], clean, now)
    assert trimmed[0].neighbours == ("green",)
    assert followers == [("yellow", "lemon")]
    assert notes == ["neighbour(s) the earlier erasures pulled or sent onto 'orange', erased with it: yellow, lemon"]
    _, _, notes = continual_targets(shares, [earlier], clean, [torch.tensor([1.0, 0.6, 0.9])])
    assert notes == ["neighbour(s) erased earlier kept erased, never a target: yellow"]  # lemon: not pulled far enough
    between = [torch.tensor([[0.0, 0.1, 1.0, 0.6], [0.1, 0.0, 1.0, 0.6], [1.0, 1.0, 0.0, 1.0], [0.6, 0.6, 1.0, 0.0]])]
    trimmed, _, notes = continual_targets(shares, [earlier], clean, [torch.tensor([1.0, 0.6, 0.9])], between)
    assert trimmed[0].neighbours == ("green",)  # lemon, beside yellow, is taken for a phrasing of it
    assert notes[1] == "neighbour(s) taken for phrasings of a concept erased earlier, never a target: lemon"


def test_a_concept_an_earlier_erasure_sent_to_a_phrasing_of_this_one_goes_with_it():
    """Red sent to "tangerine", then orange (tangerine its synonym) erased: held where red's erasure put it, red
    would be held on orange, which the new erasure moves (on the benchmark world red came back, 0 -> 24 of 24)."""
    config = _config("orange", synonyms=("tangerine",), steps=2, keep=("red", "crimson", "green"),
                     neighbour_target="nearest")
    shares, _, _ = concept_shares(config)
    unmoved = [torch.ones(3)]
    red = type("Earlier", (), {"phrases": ("red", "crimson"), "sent": ((("red", "crimson"), "tangerine"),)})()
    trimmed, followers, notes = continual_targets(shares, [red], unmoved, unmoved)
    assert trimmed[0].neighbours == ("green",) and followers == [("red", "crimson")]
    assert notes == ["neighbour(s) the earlier erasures pulled or sent onto 'orange', erased with it: red, crimson"]
    elsewhere = type("Earlier", (), {"phrases": ("red", "crimson"), "sent": ((("red", "crimson"), "green"),)})()
    trimmed, followers, _ = continual_targets(shares, [elsewhere], unmoved, unmoved)
    assert trimmed[0].neighbours == ("green",) and followers == [()], "sent elsewhere: kept erased, as before"


def test_an_earlier_file_says_where_its_concepts_were_sent(backend, tmp_path):
    result = erase(backend, _config("red square", synonyms=("crimson square",), steps=2,
                                    keep=("blue triangle", "green circle"), neighbour_target="nearest"))
    path = write_adapter(tmp_path / "red.safetensors", result.deltas, base_fingerprint(backend), result.info(),
                         unet=result.unet_deltas)
    (target,) = result.neighbour_targets.values()
    assert read_earlier(path, backend).sent == ((("red square", "crimson square"), target),)


def test_a_concept_an_earlier_erasure_sent_onto_this_one_is_erased_with_it(backend, tmp_path):
    """Red square erased onto the blue triangle, then the blue triangle erased: the red square, which now reads as
    the blue triangle, goes with it to the green circle instead of being held at the blue triangle."""
    result = erase(backend, _config("red square", anchor="blue triangle"))
    path = write_adapter(tmp_path / "red.safetensors", result.deltas, base_fingerprint(backend), result.info(),
                         unet=result.unet_deltas)
    earlier = read_earlier(path, backend)
    config = _config("blue triangle", keep=("red square", "green circle"), neighbour_target="nearest")
    result = erase(backend, config, earlier=earlier)
    assert any("sent onto 'blue triangle', erased with it: red square" in n for n in result.notes)
    assert any("becomes its nearest neighbour 'green circle'" in n for n in result.notes)
    before = _encode(backend, [EARLIER, NEW], earlier.deltas)
    after = _encode(backend, [EARLIER, NEW], earlier.deltas, result.deltas)
    concept_moved = _relative(after[NEW], before[NEW])
    assert _relative(before[EARLIER], before[NEW]) < 0.5 * concept_moved  # the earlier erasure sent it there
    assert _relative(after[EARLIER], before[NEW]) > 0.5 * concept_moved  # and it left with it


def test_continual_run_keeps_the_earlier_concept_erased_and_grows_one_file(pipe, backend, tmp_path):
    earlier_path = _earlier_file(backend, tmp_path)
    earlier = read_earlier(earlier_path, backend)
    before = {name: snapshot(module) for name, module in (("text", pipe.text_encoder), ("unet", pipe.unet))}
    result = erase(backend, _config("blue triangle"), earlier=earlier)
    assert_identical(pipe.text_encoder, before["text"])  # the loaded model is never written
    assert_identical(pipe.unet, before["unet"])
    assert result.after == ("red square",) and "update" in result.history[-1]
    assert result.info()["after"] == ["red square"]
    independent = erase(backend, _config("blue triangle"))  # the same erasure, not told of the earlier one
    prompts = [EARLIER, NEW, NEIGHBOUR]
    only = _encode(backend, prompts, earlier.deltas)
    both = _encode(backend, prompts, earlier.deltas, result.deltas)
    apart = _encode(backend, prompts, earlier.deltas, independent.deltas)
    new_moved = _relative(both[NEW], only[NEW])
    assert _relative(both[EARLIER], only[EARLIER]) < 0.3 * new_moved  # the earlier concept stays where it was put
    assert _relative(both[EARLIER], only[EARLIER]) < 0.6 * _relative(apart[EARLIER], only[EARLIER])
    assert _relative(both[NEIGHBOUR], only[NEIGHBOUR]) < 0.3 * new_moved

    # one file, the exact sum: earlier + new part, each recorded; removing the new concept gives the earlier back
    stack = grown(earlier, result, base_fingerprint(backend), "blue.safetensors")
    path = stacking.write(tmp_path / "red-then-blue.safetensors", stack)
    assert [p.concept for p in stacking.load(path).parts()] == ["red square", "blue triangle"]
    combined, first = read_adapter(path, backend), read_adapter(earlier_path, backend)
    for t in combined.deltas.targets:
        expected = first.deltas.delta_weight(t).double() + result.deltas.delta_weight(t).half().double()
        assert _relative(combined.deltas.delta_weight(t).double(), expected) < 2e-3
    for name in combined.unet.names:
        expected = first.unet.delta_weight(name).double() + result.unet_deltas.delta_weight(name).double()
        assert _relative(combined.unet.delta_weight(name).double(), expected) < 2e-3
    back = stacking.remove(stacking.load(path), "blue triangle")
    original = _tensors(earlier_path)
    assert back.tensors.keys() == original.keys()
    assert all(torch.equal(back.tensors[k], original[k]) and back.tensors[k].dtype == original[k].dtype
               for k in original)


def test_the_update_regulariser_keeps_the_new_deltas_small(backend, tmp_path):
    earlier = read_earlier(_earlier_file(backend, tmp_path, steps=30), backend)
    sizes = {w: float(erase(backend, _config("blue triangle", steps=60, update_weight=w, unet_kv_edit=False),
                            earlier=earlier).deltas.squared_norm()) for w in (0.0, 100.0)}
    assert sizes[100.0] < 0.5 * sizes[0.0]


def test_the_key_value_edit_is_computed_on_the_weights_with_the_earlier_edit(backend):
    modules = backend.cross_attention_kv()
    width = next(iter(modules.values())).weight.shape[1]
    generator = torch.Generator().manual_seed(0)
    stats = kv_edit.Statistics(width)
    stats.add_concept(torch.randn(20, width, generator=generator), torch.randn(20, width, generator=generator))
    stats.add_keep(torch.randn(30, width, generator=generator))
    earlier = kv_edit.edit(modules, stats, 1.0, 1e-3, width)
    new = kv_edit.edit(modules, stats, 1.0, 1e-3, width, earlier=(earlier,))
    operator = stats.operator(1.0, 1e-3)
    for name, module in modules.items():
        effective = module.weight.detach().double() + earlier.delta_weight(name).double()
        assert _relative(new.delta_weight(name).double(), effective @ operator) < 1e-5


def test_cli_erase_after_grows_the_file_and_refuses_bad_files(backend, tiny_model_dir, other_model_dir, tmp_path,
                                                              capsys):
    earlier_path = _earlier_file(backend, tmp_path, steps=3)
    out = tmp_path / "grown.safetensors"
    common = ["erase", "--model", str(tiny_model_dir), "--context", CONTEXTS[0], "--keep", "green circle",
              "--steps", "3"]
    assert main(common + ["--concept", "blue triangle", "--after", str(earlier_path), "--out", str(out)]) == 0
    parts = stacking.load(out).parts()
    assert [p.concept for p in parts] == ["red square", "blue triangle"]
    assert parts[1].adapter.info("after") == '["red square"]'
    rest = tmp_path / "rest.safetensors"
    assert main(["remove", str(out), "--concept", "blue triangle", "--out", str(rest)]) == 0
    original, back = _tensors(earlier_path), _tensors(rest)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    capsys.readouterr()

    other = DiffusersBackend(load_pipeline(other_model_dir))
    foreign = erase(other, _config("red square", steps=2))
    foreign_path = write_adapter(tmp_path / "foreign.safetensors", foreign.deltas, base_fingerprint(other),
                                 foreign.info(), unet=foreign.unet_deltas)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    for bad, message in ((foreign_path, "another base model"), (broken, "not a readable"),
                         (tmp_path / "missing.safetensors", "does not exist")):
        target = tmp_path / f"from-{bad.stem}.safetensors"
        assert main(common + ["--concept", "blue triangle", "--after", str(bad), "--out", str(target)]) == 2
        assert message in capsys.readouterr().err and not target.exists()
    assert main(common + ["--concept", "blue triangle", "--method", "anchor", "--after", str(earlier_path),
                          "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "contextual method" in capsys.readouterr().err


def test_merging_parts_that_send_their_concepts_to_each_other_warns(backend, tmp_path, capsys):
    """Orange sent to red and red to amber: merged, each edit carries the other's concept back (bench: both still
    drawn by the stack of ten). A merge says so, and names the way out; parts with other targets merge silently."""
    def part(concept, keep, name):
        result = erase(backend, _config(concept, steps=2, keep=keep, neighbour_target="nearest"))
        assert result.info()["neighbour_targets"] == {concept: keep[0]}
        return write_adapter(tmp_path / name, result.deltas, base_fingerprint(backend), result.info(),
                             unet=result.unet_deltas)
    red = part("red square", ("blue triangle",), "red.safetensors")
    blue = part("blue triangle", ("red square",), "blue.safetensors")
    green = part("yellow star", ("green circle",), "yellow.safetensors")
    assert main(["merge", str(red), str(blue), str(green), "--out", str(tmp_path / "stack.safetensors")]) in (0, None)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "red.safetensors sends 'red square' to 'blue triangle', which blue.safetensors erases" in warnings[0]
    assert "one after the other" in warnings[1]
    assert main(["merge", str(red), str(green), "--out", str(tmp_path / "fine.safetensors")]) in (0, None)
    assert "warning:" not in capsys.readouterr().err


def test_a_continual_file_does_not_warn_of_parts_made_one_after_the_other(backend, tmp_path):
    """Red sent to the blue triangle, then the blue triangle erased after it: the later run took red along, so the
    grown file is not the merge of two parts that undo each other."""
    from unlearn_core.continual import undoing_each_other

    first = erase(backend, _config("red square", steps=2, keep=("blue triangle",), neighbour_target="nearest"))
    path = write_adapter(tmp_path / "red.safetensors", first.deltas, base_fingerprint(backend), first.info(),
                         unet=first.unet_deltas)
    earlier = read_earlier(path, backend)
    second = erase(backend, _config("blue triangle", steps=2, keep=("red square", "green circle"),
                                    neighbour_target="nearest"), earlier=earlier)
    stack = grown(earlier, second, base_fingerprint(backend), "blue.safetensors")
    assert undoing_each_other(stack.parts("grown.safetensors")) == []
    alone = erase(backend, _config("blue triangle", steps=2, keep=("red square",), neighbour_target="nearest"))
    apart = write_adapter(tmp_path / "blue.safetensors", alone.deltas, base_fingerprint(backend), alone.info(),
                          unet=alone.unet_deltas)
    merged = stacking.merge([stacking.Part(stacking.load(path), "red.safetensors"),
                             stacking.Part(stacking.load(apart), "blue.safetensors")])
    assert len(undoing_each_other(merged.parts("merged.safetensors"))) == 2, "made apart, they do warn"

