"""bench.many: several concepts erased at once (joint run, merged stack, one removed again), on the world model."""
from pathlib import Path

import pytest

from bench import evaluate, many, world
from bench.suite import SPLITS

HAS_MODEL = (Path(many.__file__).parent / "world_model" / "model_index.json").exists()


def test_concepts_are_drawn_across_kinds_nested_and_seeded_and_the_rest_names_none_of_them():
    order = many.concept_order("test", seed=0)
    assert sorted(order) == sorted(SPLITS["test"]) and order == many.concept_order("test", seed=0)
    assert len({world.CONCEPT_KINDS[c] for c in order[:3]}) == 3  # one of each kind first
    erased = order[:5]
    for entry in many.rest_set(erased, per_set=20, seed=1):
        assert set(entry["expect"]) == {"shape", "colour", "style"}
        assert not set(entry["expect"].values()) & set(erased)


def test_every_kind_keeps_a_value_for_the_rest_even_when_the_split_holds_all_of_it():
    order = many.concept_order("all", seed=0)
    for kind in ("shape", "colour", "style"):
        assert sum(world.CONCEPT_KINDS[c] == kind for c in order) == sum(k == kind for k in world.CONCEPT_KINDS.values()) - 1
    assert len(many.rest_set(order, per_set=8, seed=0)) == 8  # the longest order still leaves a rest


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_tiny_run_reports_every_field_and_removing_a_concept_leaves_the_other_part(tmp_path):
    report = many.many(sizes=(1, 2), per_set=2, steps=2, sample_steps=3, images=2, modes=many.MODES)
    assert [(r["n"], r["mode"]) for r in report["rows"]] == [(n, m) for n in (1, 2) for m in many.MODES]
    for row in report["rows"]:
        n = row["n"]
        assert row["concepts"] == report["order"][:n] and not set(row["concepts"]) & set(row["rest_concepts"])
        for name, count in (("erased_before", 2 * n), ("erased", 2 * n), ("rest_before", 2), ("rest", 2)):
            m = row[name]
            assert m["n"] == count and 0 <= m["k"] <= count and m["ci95"][0] <= m["value"] <= m["ci95"][1], name
        assert list(row["per_concept"]) == row["concepts"]
        assert row["seconds"] > 0 and row["bytes"] > 0
        assert [(part, m["n"]) for part, m in row["rest_by_part"].items()] == [("text_encoder", 2), ("unet_edit", 2)]
        assert isinstance(row["warnings"], list)
    joint_1, merged_1, continual_1 = report["rows"][:3]  # one concept: the same erasure, the same file
    assert joint_1["bytes"] == merged_1["bytes"] == continual_1["bytes"]
    assert joint_1["erased"] == merged_1["erased"] == continual_1["erased"]
    (removed,) = report["remove_one"]
    kept = [c for c in report["order"][:2] if c != removed["removed"]]
    assert removed["parts_left"] == [evaluate.erase_config("contextual", kept[0], ()).concept]
    assert removed["equals_merge_of_others"]  # the other part's file, bit for bit
    for name in ("removed_clean", "removed_in_stack", "removed_after", "others_in_stack", "others_after", "rest"):
        assert removed[name]["n"] == 2, name
    text = many.table(report, "tiny")
    assert "| 2 | merged |" in text and "Remove one concept" in text and "| 2 | continual |" in text
    _check_continual_steps(report)


def _check_continual_steps(report):
    """The continual file after each step of the largest N: the first concept, those erased so far, the rest."""
    order, steps = report["order"], report["continual"]
    names = [evaluate.erase_config("contextual", c, ()).concept for c in order[:2]]
    assert [(s["step"], s["concept"], s["concepts"]) for s in steps] == [(1, order[0], order[:1]),
                                                                         (2, order[1], order[:2])]
    for s in steps:
        k = s["step"]
        for name, count in (("first_before", 2), ("first", 2), ("erased_before", 2 * k), ("erased", 2 * k),
                            ("rest_before", 2), ("rest", 2)):
            m = s[name]
            assert m["n"] == count and 0 <= m["k"] <= count and m["ci95"][0] <= m["value"] <= m["ci95"][1], name
        assert s["first"] == s["per_concept"][order[0]]["after"] and list(s["per_concept"]) == order[:k]
        assert s["first_target_met"] == (s["first"]["value"] <= 0.10)
        drop = 100 * (s["rest_before"]["value"] - s["rest"]["value"])
        assert s["rest_drop_points"] == round(drop, 1) and s["rest_target_met"] == (drop <= 3)
        assert s["parts"] == names[:k] and 0 < s["seconds"] <= s["total_seconds"] and s["bytes"] > 0
    one, two = steps
    assert one["total_seconds"] == one["seconds"] and two["total_seconds"] == pytest.approx(
        one["total_seconds"] + two["seconds"], abs=0.02) and two["bytes"] > one["bytes"]
    last = next(r for r in report["rows"] if r["mode"] == "continual" and r["n"] == 2)  # the whole sequence's row
    assert two["erased"] == last["erased"] and two["rest"] == last["rest"] and two["bytes"] == last["bytes"]
    assert "continual: after each step" in many.table(report, "tiny")


def test_named_concepts_are_erased_in_the_order_given_and_bad_lists_are_refused():
    report = many.many(sizes=(2,), per_set=2, steps=2, sample_steps=3, images=2, modes=("continual",),
                       concepts=("orange", "stripes"))
    assert report["order"] == ["orange", "stripes"] and report["rows"][0]["concepts"] == ["orange", "stripes"]
    assert [s["concept"] for s in report["continual"]] == ["orange", "stripes"]
    with pytest.raises(ValueError, match="distinct world concepts"):
        many.many(sizes=(1,), concepts=("orange", "teal"))
    with pytest.raises(ValueError, match="at least one value of each kind"):
        many.many(sizes=(1,), concepts=tuple(evaluate.KINDS["style"]))


def test_erase_settings_given_with_set_reach_every_erasure_and_bad_ones_are_refused(tmp_path):
    bench = many.Bench(evaluate.MODEL, per_set=2, seed=0, images=2, steps=2, sample_steps=3, folder=tmp_path,
                       overrides={"preserve_weight": 3.0})
    assert bench.config(["orange"]).preserve_weight == 3.0
    assert bench.config(["orange", "stripes"]).preserve_weight == 3.0, "the joint run too"
    assert many.Bench(evaluate.MODEL, 2, 0, 2, 2, 3, tmp_path).config(["orange"]).preserve_weight != 3.0
    assert many.Bench(evaluate.MODEL, 2, 0, 2, None, 3, tmp_path, overrides={"steps": 7}).config(["orange"]).steps == 7
    with pytest.raises(ValueError, match="preserv_weight is not an erase setting"):
        many.many(sizes=(1,), overrides={"preserv_weight": 3.0})
    with pytest.raises(ValueError, match="disagree"):
        many.many(sizes=(1,), steps=2, overrides={"steps": 3})
