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


@pytest.mark.skipif(not HAS_MODEL, reason="world model not committed yet")
def test_tiny_run_reports_every_field_and_removing_a_concept_leaves_the_other_part(tmp_path):
    report = many.many(sizes=(1, 2), per_set=2, steps=2, sample_steps=3, images=2)
    assert [(r["n"], r["mode"]) for r in report["rows"]] == [(1, "joint"), (1, "merged"), (2, "joint"), (2, "merged")]
    for row in report["rows"]:
        n = row["n"]
        assert row["concepts"] == report["order"][:n] and not set(row["concepts"]) & set(row["rest_concepts"])
        for name, count in (("erased_before", 2 * n), ("erased", 2 * n), ("rest_before", 2), ("rest", 2)):
            m = row[name]
            assert m["n"] == count and 0 <= m["k"] <= count and m["ci95"][0] <= m["value"] <= m["ci95"][1], name
        assert list(row["per_concept"]) == row["concepts"]
        assert row["seconds"] > 0 and row["bytes"] > 0
    joint_1, merged_1 = report["rows"][:2]  # one concept: the same erasure, the same file
    assert joint_1["bytes"] == merged_1["bytes"] and joint_1["erased"] == merged_1["erased"]
    (removed,) = report["remove_one"]
    kept = [c for c in report["order"][:2] if c != removed["removed"]]
    assert removed["parts_left"] == [evaluate.erase_config("contextual", kept[0], ()).concept]
    assert removed["equals_merge_of_others"]  # the other part's file, bit for bit
    for name in ("removed_clean", "removed_in_stack", "removed_after", "others_in_stack", "others_after", "rest"):
        assert removed[name]["n"] == 2, name
    text = many.table(report, "tiny")
    assert "| 2 | merged |" in text and "Remove one concept" in text
