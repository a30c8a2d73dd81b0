"""The shipped example images (examples/images/) and what uses them: the README's command-line example and
the ComfyUI example workflows."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "examples" / "images"


def test_example_images_are_what_the_world_code_draws(tmp_path):
    from examples.make_images import CONCEPTS, make

    written = make(tmp_path)
    assert {p.parent.name for p in written} == set(CONCEPTS) == {p.name for p in IMAGES.iterdir() if p.is_dir()}
    for path in written:
        shipped = IMAGES / path.parent.name / path.name
        assert shipped.stat().st_size < 4096, f"{shipped} should be a few KB"
        assert np.array_equal(np.asarray(Image.open(shipped)), np.asarray(Image.open(path))), shipped
    for concept in CONCEPTS:
        assert 4 <= len(list((IMAGES / concept).glob("*.png"))) <= 5


def _sources(workflow: dict, node_id: int) -> set[int]:
    """Every node upstream of node_id."""
    found, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        for link in workflow["links"]:
            if link[3] == current and link[1] not in found:
                found.add(link[1])
                todo.append(link[1])
    return found


@pytest.mark.parametrize("name", ["erase-a-concept-and-compare", "learn-a-token"])
def test_example_workflows_train_on_four_shipped_images(name):
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    loads = {n["id"]: n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadImage"}
    assert len(loads) == 4
    shipped = {p.name for p in IMAGES.glob("*/*.png")}
    assert set(loads.values()) <= shipped
    trainer = next(n for n in workflow["nodes"] if n["type"] in ("UnlearnConceptLoRA|ConceptUnlearn",
                                                                  "LearnConceptToken|ConceptUnlearn"))
    images_link = next(i["link"] for i in trainer["inputs"] if i["name"] == "images")
    batch = next(link[1] for link in workflow["links"] if link[0] == images_link)
    assert nodes[batch]["type"] == "ImageBatch" and set(loads) <= _sources(workflow, batch)
    ids = {link[0] for link in workflow["links"]}
    assert len(ids) == len(workflow["links"]) and max(ids) <= workflow["last_link_id"]
    assert max(nodes) <= workflow["last_node_id"]
    for link in workflow["links"]:  # both ends agree on every link
        assert link[0] in nodes[link[1]]["outputs"][link[2]]["links"]
        assert nodes[link[3]]["inputs"][link[4]]["link"] == link[0]


def readme_cli_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Command line\s+```bash\n(.*?)```", text, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line)[1:] for line in joined.splitlines() if line.startswith("concept-unlearn ")]


def test_readme_command_line_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """Each README command on the bundled world model and the shipped images (fewer steps, same options)."""
    from unlearn_core.cli import main

    commands = readme_cli_commands()
    assert [c[0] for c in commands] == ["learn-token", "erase", "generate", "inspect"]
    for folder in ("bench", "examples"):
        (tmp_path / folder).symlink_to(REPO / folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    quick = {"learn-token": ["--steps", "3"], "erase": ["--steps", "3"], "generate": ["--sample-steps", "2"]}
    for argv in commands:
        assert main(argv + quick.get(argv[0], [])) == 0, (argv, capsys.readouterr().err[-2000:])
    summary = json.loads(capsys.readouterr().out.split("wrote after.png\n")[-1])
    assert summary["metadata"]["concept_unlearn.concept"] == "on stripes"
    assert summary["metadata"]["concept_unlearn.token"] == "<my-stripes>"
    assert (tmp_path / "after.png").is_file() and (tmp_path / "my-stripes.safetensors").is_file()
