"""js/concept_unlearn.js run by Node.js against small stand-ins for ComfyUI's app and api modules.

What the stand-ins provide is the part of the ComfyUI front end (1.27, shipped with ComfyUI 0.3.64) that the
extension uses: app.registerExtension, app.graph.getNodeById, api.addEventListener, and LiteGraph node methods
(addCustomWidget, computeSize, setSize, setDirtyCanvas). A seed's "control after generate" widget is named
control_after_generate and defaults to "randomize" there (addValueControlWidgets). Skipped without node.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_pack import load_pack

REPO = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
PACK = str(REPO).replace(".", "_x_")  # ComfyUI's module name for this pack (nodes.load_custom_node)

APP = """
export const registered = [];
const nodes = new Map();
export const app = {
  registerExtension(extension) { registered.push(extension); },
  graph: { getNodeById(id) { return nodes.get(Number(id)) ?? null; }, add(node) { nodes.set(node.id, node); } },
};
"""
API = """
const listeners = {};
export const api = {
  addEventListener(name, fn) { (listeners[name] ??= []).push(fn); },
  dispatch(name, detail) { for (const fn of listeners[name] ?? []) fn({ detail }); },
};
"""
DRIVER = """
import { app, registered } from "./scripts/app.js";
import { api } from "./scripts/api.js";
await import("./extensions/concept-unlearn/concept_unlearn.js");
const extension = registered[0];
extension.setup();

function NodeType() {}
NodeType.prototype.addCustomWidget = function (widget) { this.widgets.push(widget); };
NodeType.prototype.computeSize = function () { return [300, 200]; };
NodeType.prototype.setSize = function (size) { this.size = size; };
NodeType.prototype.setDirtyCanvas = function () {};
await extension.beforeRegisterNodeDef(NodeType, { name: "UnlearnConceptLoRA|ConceptUnlearn" });

const node = new NodeType();
Object.assign(node, { id: 5, type: "UnlearnConceptLoRA|ConceptUnlearn", size: [300, 200],
  widgets: [{ name: "seed", value: 0 }, { name: "control_after_generate", value: "randomize" }] });
node.onNodeCreated();
app.graph.add(node);
const out = { seed_control: node.widgets[1].value };

node.onExecuted({ concept_unlearn: [INFO] });
out.lines = node.__cuLines;
api.dispatch("concept_unlearn.progress", { node: "5", step: 1, total: 60, seconds_left: 5369, losses: { loss: 1 } });
out.progress_step = node.__cuProgress?.step;
api.dispatch("executing", "5");  // the node runs again: the previous run's text goes
out.after_executing = { lines: node.__cuLines, progress: node.__cuProgress };
node.onExecuted({ concept_unlearn: [INFO] });
api.dispatch("executing", { node: "5", display_node: "5", prompt_id: "p" });  // newer message form
out.after_executing_object = node.__cuLines;
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(NODE is None, reason="needs Node.js")
def test_front_end_fixes_seeds_clears_stale_text_and_draws_python_lines(tmp_path):
    import sys

    root = tmp_path / "web"
    (root / "scripts").mkdir(parents=True)
    (root / "extensions" / "concept-unlearn").mkdir(parents=True)
    (root / "package.json").write_text('{"type": "module"}')
    (root / "scripts" / "app.js").write_text(APP)
    (root / "scripts" / "api.js").write_text(API)
    shutil.copy(REPO / "js" / "concept_unlearn.js", root / "extensions" / "concept-unlearn" / "concept_unlearn.js")

    # the node text comes from nodes/host.py display_lines: load the pack as ComfyUI does to call it
    load_pack(PACK)
    host = sys.modules[f"{PACK}.nodes.host"]
    info = {"concept": "a red star <img src=x onerror=alert(1)>", "method": "weighted",
            "final_losses": {"loss": -1.228, "erase": -1.3, "keep": 0.072}}
    info["lines"] = host.display_lines(info)
    (root / "driver.mjs").write_text(DRIVER.replace("INFO", json.dumps(info)))
    done = subprocess.run([NODE, "driver.mjs"], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["seed_control"] == "fixed"
    assert "final loss: -1.228 (erase -1.3, keep 0.072)" in out["lines"]
    assert not any("loss loss" in line for line in out["lines"])
    assert out["lines"][0].startswith("concept: a red star <img")  # drawn as text, bounded to one line
    assert out["progress_step"] == 1
    assert out["after_executing"] == {"lines": [], "progress": None}
    assert out["after_executing_object"] == []
