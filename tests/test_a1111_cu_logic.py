"""The tab's logic functions (scripts/concept_unlearn_logic.py), run for real through the engine on the small
A1111-shaped model of test_a1111_backend, with a stand-in for shared.state that has the fields A1111's
modules/shared_state.py State uses (job, interrupted, skipped, sampling_step(s), textinfo, begin, end)."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from test_a1111_backend import sd_model, sd_model_factory, snapshot, assert_unchanged, tokenizer  # noqa: E402,F401

# the logic module the tab uses: the tab file, loaded by path as A1111 loads it, loads it through the backend's loader
_TAB = Path(__file__).resolve().parents[1] / "scripts" / "concept_unlearn_tab.py"
_spec = importlib.util.spec_from_file_location(_TAB.name, _TAB)
_tab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tab)
logic = _tab.logic


class State:
    def __init__(self):
        self.job, self.interrupted, self.skipped = "", False, False
        self.sampling_step = self.sampling_steps = 0
        self.textinfo, self.jobs = None, []

    def begin(self, job):
        self.job = job
        self.jobs.append(job)

    def end(self):
        self.job = ""


@pytest.fixture
def files(tmp_path):
    paths = []
    for i, colour in enumerate(("red", "blue")):
        p = tmp_path / f"ex{i}.png"
        Image.new("RGB", (40, 48), colour).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def host(sd_model, tokenizer, tmp_path):
    return logic.Host(sd_model=sd_model, lora_dir=tmp_path / "Lora", embeddings_dir=tmp_path / "embeddings",
                      state=State(), tokenizer=tokenizer, resolution=32)


def test_helpers():
    assert logic.busy(None) is None
    assert "txt2img" in logic.busy(type("S", (), {"job": "txt2img"})())
    assert logic.file_stem("Van Gogh style!") == "unlearn_Van_Gogh_style"
    assert logic.split_list("a, b\nc,,") == ("a", "b", "c")
    with pytest.raises(ValueError, match="name"):
        logic.file_stem("  !! ")


def test_files_are_found_by_name_inside_their_folder_only(tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    for name in ("mycat.safetensors", "sub/style.safetensors", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert logic.list_files(folder) == ["mycat", "sub/style"]
    assert logic.list_files(tmp_path / "missing") == []
    found = {logic.find_file(text, folder, "token") for text in ("mycat", "<mycat>", "mycat.safetensors",
                                                                 str(folder / "mycat.safetensors"))}
    assert found == {(folder / "mycat.safetensors").resolve()}
    assert logic.find_file("sub/style", folder, "token") == (folder / "sub" / "style.safetensors").resolve()
    assert logic.find_file("style", folder, "token") == folder / "sub" / "style.safetensors"
    assert logic.find_file("  ", folder, "token") is None
    with pytest.raises(FileNotFoundError, match="token: no dog.safetensors in"):
        logic.find_file("dog", folder, "token")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for text in ("../outside", str(tmp_path / "outside.safetensors")):
        with pytest.raises(ValueError, match="not inside"):
            logic.find_file(text, folder, "token")


def test_method_labels_map_to_engine_configs():
    host = logic.Host(sd_model=None, lora_dir=Path("."), embeddings_dir=Path("."), lr=3e-4)
    paper_label = next(label for label, method in logic.METHODS.items() if method == "fewshot-paper")
    paper = logic.erase_config(host, "cat", "kitty", paper_label, "All layers", 60, 8, 1)
    preset = __import__("unlearn_core").EraseConfig.fewshot_paper("cat")
    assert (paper.method, paper.lr, paper.betas, paper.preserve_weight) == ("fewshot", 1e-5, (0.9, 0.98), 0.0)
    # the paper's layers and steps stand whatever the inputs say; the full deltas are saved at the Rank slider's rank
    assert (paper.lora.mode, paper.lora.compress_rank, paper.lora.preset, paper.steps) == ("full", 8, "fewshot", 10)
    assert paper.steps == preset.steps and "10 steps" in paper_label and "rank-R LoRA by SVD" in paper_label
    weighted = logic.erase_config(host, " cat ", "", "Weighted (images + anchor, seed 000)", "Last layer", 5, 2, 0,
                                  kind="style", anchor="", preserve="a dog, a tree")
    assert (weighted.concept, weighted.method, weighted.lr, weighted.kind, weighted.anchor) == \
        ("cat", "weighted", 3e-4, "style", "a photo")
    assert weighted.preserve == ("a dog", "a tree", "") and weighted.lora.preset == "final"
    assert set(logic.METHODS.values()) - {"fewshot-paper"} == set(__import__("unlearn_core").config.METHODS)


def test_erase_saves_a_loadable_adapter_and_leaves_the_model_unchanged(host, files, sd_model):
    snap = snapshot(sd_model)
    message, path, curve = logic.do_erase(host, files, "cat", "kitten, kitty", "", "Weighted (images + anchor, seed 000)",
                                          "Few-shot layers (MLP of all + last attention)", 2, 2, 0)
    assert message.startswith("Saved unlearn_cat.safetensors") and "<lora:unlearn_cat:1>" in message
    assert Path(path).parent == host.lora_dir and curve.size[0] > 0
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v2"
    assert host.state.jobs == ["concept_unlearn"] and host.state.job == "" and host.state.sampling_step == 2
    assert_unchanged(sd_model, snap)
    again = logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0)
    assert again[0].startswith("Error: unlearn_cat.safetensors already exists") and "\n" not in again[0]


def test_paper_settings_run_their_own_steps_and_say_how_the_file_is_saved(host, files):
    label = next(label for label, method in logic.METHODS.items() if method == "fewshot-paper")
    message, path, _ = logic.do_erase(host, files, "cat", "", "", label, "Last layer", 60, 2, 0, name="paper")
    assert message.startswith("Saved unlearn_paper.safetensors"), message
    assert "Paper settings: 10 steps at lr 1e-05 (the Layers and Steps inputs are not used)" in message
    assert "saved as a rank-2 LoRA by SVD" in message and host.state.sampling_steps == 10
    with safe_open(path, framework="pt") as f:
        assert {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")} == {2}


def test_interrupt_saves_nothing(host, files, sd_model):
    snap = snapshot(sd_model)
    host.state.begin = lambda job: (setattr(host.state, "job", job), setattr(host.state, "interrupted", True))
    message, path, _ = logic.do_erase(host, files, "dog", "", "", "Few-shot (images, gradient ascent)",
                                      "Last layer", 5, 2, 0)
    assert message.startswith("Interrupted") and path is None
    assert not (host.lora_dir / "unlearn_dog.safetensors").exists()
    assert_unchanged(sd_model, snap)


def test_busy_and_errors_are_one_line(host, files):
    host.state.job = "txt2img"
    assert logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0)[0] \
        .startswith("Busy: another job (txt2img)")
    host.state.job = ""
    message = logic.do_erase(host, [], "cat", "", "", "Few-shot (images, gradient ascent)", "Last layer", 1, 2, 0)[0]
    assert message.startswith("Error:") and "images" in message
    message = logic.do_erase(host, files, "", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0)[0]
    assert message.startswith("Error:") and "concept" in message
    message = logic.do_learn_token(host, files, "<-cat>", "cat", "object", 1, 0)[0]  # a token, not a file name
    assert message.startswith("Error: token '<-cat>'") and "\n" not in message, message


def test_availability_disables_the_buttons_while_another_job_runs_and_shows_our_own_step(host, files):
    import threading

    assert logic.availability(None) == ("Ready", True)
    assert logic.availability(State()) == ("Ready", True)
    other = State()
    other.job, other.textinfo = "txt2img", "Sampling 3/20"
    assert logic.availability(other) == \
        ("AUTOMATIC1111 is busy with txt2img: the buttons come back when it finishes", False)
    other.job = "(unknown)"  # A1111's begin() default (wrap_gradio_gpu_call)
    assert logic.availability(other) == \
        ("AUTOMATIC1111 is busy with another job: the buttons come back when it finishes", False)
    other.end()
    assert logic.availability(other) == ("Ready", True)  # back when it ends
    lock = threading.Lock()  # A1111's queue_lock: held with no job (e.g. a checkpoint loading)
    with lock:
        text, enabled = logic.availability(State(), lock)
        assert not enabled and text.startswith("AUTOMATIC1111 is busy with a queued task")
    assert logic.availability(State(), lock) == ("Ready", True) and not lock.locked()  # only read, never taken
    assert logic.availability(State(), object()) == ("Ready", True)  # a lock without locked(): not looked at
    ours = State()
    ours.job = logic.JOB
    assert logic.availability(ours) == ("Concept Unlearn is running: starting (Interrupt stops it and saves "
                                        "nothing)", False)
    # during a real run the status line follows our steps; afterwards the buttons come back
    seen = []
    logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 2, 2, 0, name="avail",
                   progress=lambda *args, **kwargs: seen.append(logic.availability(host.state, host.lock)))
    assert seen == [(f"Concept Unlearn is running: Erase {i}/2 (Interrupt stops it and saves nothing)", False)
                    for i in (1, 2)], seen
    assert logic.availability(host.state, host.lock) == ("Ready", True)


def test_learn_token_then_erase_with_it_then_audit(host, files, monkeypatch):
    message, token_path, _ = logic.do_learn_token(host, files, "<mycat>", "cat", "object", 2, 0, n_vectors=2)
    # A1111 names an embedding after its file: no '<' '>' (not allowed in Windows file names)
    assert message.startswith("Saved mycat.safetensors: write mycat in prompts"), message
    assert Path(token_path) == host.embeddings_dir / "mycat.safetensors"
    with safe_open(token_path, framework="pt") as f:  # the single-tensor layout A1111's embedding loader accepts
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, 1024)
    message, adapter_path, _ = logic.do_erase(host, files, "cat", "", "<mycat>", "Weighted (images + anchor, seed 000)",
                                              "Last layer", 2, 2, 0, name="cat_tok")
    assert message.startswith("Saved unlearn_cat_tok"), message
    audited, read_adapter = [], logic.read_adapter

    def keep(*args):
        audited.append(read_adapter(*args))
        return audited[-1]

    monkeypatch.setattr(logic, "read_adapter", keep)
    message, _, curve = logic.do_audit(host, files, "unlearn_cat_tok", 2, 0)
    assert message.startswith("Audit of unlearn_cat_tok.safetensors: re-learned token loss") and curve is not None
    params = list(audited[0].deltas.parameters())  # the attack learns a token only: the adapter gets no gradients
    assert params and all(p.grad is None and not p.requires_grad for p in params)
    message = logic.do_erase(host, files, "cat", "", "nosuchtoken", "Anchor (no images needed)", "Last layer", 1,
                             2, 0, name="x")[0]
    assert message.startswith("Error: concept token: no nosuchtoken.safetensors in")
    assert logic.do_audit(host, files, "", 2, 0)[0].startswith("Error: adapter: pick an erasure adapter")


class Lock:
    def __init__(self, held=False):
        self.held, self.calls = held, []

    def acquire(self, blocking=True):
        self.calls.append(("acquire", blocking))
        if self.held:
            return False
        self.held = True
        return True

    def release(self):
        self.calls.append(("release",))
        self.held = False


def test_queue_lock_is_held_for_the_run_and_refuses_when_taken(host, files):
    host.lock = Lock(held=True)  # A1111 is generating (wrap_gradio_gpu_call holds queue_lock)
    message = logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0)[0]
    assert message.startswith("Busy: AUTOMATIC1111 is generating or training") and host.state.jobs == []
    host.lock = Lock()
    held = []
    host.state.begin = lambda job: held.append(host.lock.held)
    for concept in ("cat", ""):  # a finished run and a failed one both release it
        logic.do_erase(host, files, concept, "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0, name="lock")
    assert held == [True, True] and not host.lock.held
    assert host.lock.calls == [("acquire", False), ("release",)] * 2


def test_prepare_wraps_every_run_and_is_undone_after_error_and_interrupt(host, files, sd_model):
    from contextlib import contextmanager

    events = []

    @contextmanager
    def prepare():  # A1111: sd_hijack.undo_optimizations() ... apply_optimizations()
        events.append("undo")
        try:
            yield
        finally:
            events.append("apply")

    host.prepare = prepare
    ok = logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0, name="p")
    assert ok[0].startswith("Saved") and events == ["undo", "apply"]
    error = logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0, name="p")
    assert error[0].startswith("Error:") and events == ["undo", "apply"] * 2
    host.state.begin = lambda job: setattr(host.state, "interrupted", True)
    stopped = logic.do_learn_token(host, files, "<t>", "cat", "object", 3, 0)
    assert stopped[0].startswith("Interrupted") and events == ["undo", "apply"] * 3


def test_model_refusals_and_runtime_errors_are_one_line(host, files, sd_model, capsys):
    host.sd_model = None
    message = logic.do_erase(host, files, "cat", "", "", "Anchor (no images needed)", "Last layer", 1, 2, 0)[0]
    assert message.startswith("Error: no model is loaded: load an SD 2.0/2.1 checkpoint") and "\n" not in message
    host.sd_model = sd_model
    host.lowvram = True
    message = logic.do_learn_token(host, files, "<t>", "cat", "object", 1, 0)[0]
    assert message.startswith("Error: --lowvram/--medvram") and "\n" not in message
    host.lowvram = False
    original = sd_model.apply_model
    sd_model.apply_model = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory.\nTried 2 GiB"))
    try:
        message = logic.do_learn_token(host, files, "<t>", "cat", "object", 1, 0)[0]
    finally:
        del sd_model.apply_model
    assert sd_model.apply_model == original
    assert message == "Error: CUDA out of memory. (details in the console)"
    assert "Traceback" in capsys.readouterr().err and host.state.job == ""


def test_a1111_training_context_follows_the_train_tab(monkeypatch):
    calls = []
    shared = types.SimpleNamespace(opts=types.SimpleNamespace(training_xattention_optimizations=False))
    hijack = types.SimpleNamespace(undo_optimizations=lambda: calls.append("undo"),
                                   apply_optimizations=lambda: calls.append("apply"))
    devices = types.SimpleNamespace(torch_gc=lambda: calls.append("gc"))
    context = logic.a1111_training_context(shared, hijack, devices)
    with pytest.raises(RuntimeError):
        with context():
            assert calls == ["undo"]
            raise RuntimeError("boom")
    assert calls == ["undo", "apply", "gc"]
    shared.opts.training_xattention_optimizations = True  # "Use cross attention optimizations while training"
    calls.clear()
    with context():
        pass
    assert calls == ["gc"]


def test_a1111_host_reads_folders_and_settings(monkeypatch, tmp_path):
    """modules.shared.cmd_opts --lora-dir / --embeddings-dir, else models/Lora and <data>/embeddings; Settings."""
    state, lock = object(), object()
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = types.SimpleNamespace(lowvram=False, medvram=True, lora_dir=None, embeddings_dir=None)
    shared.opts = types.SimpleNamespace(concept_unlearn_resolution=768, concept_unlearn_overwrite=True,
                                        concept_unlearn_lr=0.0, training_xattention_optimizations=False)
    shared.state, shared.sd_model = state, "model"
    fakes = {"shared": shared, "paths": types.SimpleNamespace(models_path=str(tmp_path / "models"),
                                                               data_path=str(tmp_path)),
             "call_queue": types.SimpleNamespace(queue_lock=lock), "devices": types.SimpleNamespace(autocast=None),
             "sd_hijack": types.SimpleNamespace()}
    package = types.ModuleType("modules")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "modules", package)
    for name, module in fakes.items():
        setattr(package, name, module)
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
    h = logic.a1111_host()
    assert (h.lora_dir, h.embeddings_dir) == (tmp_path / "models" / "Lora", tmp_path / "embeddings")
    assert (h.sd_model, h.state, h.lock, h.medvram, h.lowvram) == ("model", state, lock, True, False)
    assert (h.resolution, h.overwrite, h.lr) == (768, True, None) and callable(h.prepare)
    shared.cmd_opts.lora_dir, shared.cmd_opts.embeddings_dir = str(tmp_path / "L"), str(tmp_path / "E")
    shared.opts.concept_unlearn_lr = 2e-4
    h = logic.a1111_host()
    assert (h.lora_dir, h.embeddings_dir, h.lr) == (tmp_path / "L", tmp_path / "E", 2e-4)
