"""AUTOMATIC1111 tab "Concept Unlearn" (loaded by A1111 from scripts/; gradio 3.41 API).

All work is in a1111_tab_logic (tested without A1111); this file only builds the UI and connects
A1111's shared.sd_model, folders, queue lock and shared.state (progress, Interrupt).
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.dirname(_HERE)):  # scripts/ (sibling modules) and the repo root (unlearn_core)
    if _path not in sys.path:
        sys.path.insert(0, _path)


def _host():
    from contextlib import contextmanager
    from pathlib import Path

    from modules import paths, shared

    import a1111_backend
    import a1111_tab_logic as logic

    lora_dir = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    embeddings_dir = getattr(shared.cmd_opts, "embeddings_dir", None) or os.path.join(paths.data_path, "embeddings")

    @contextmanager
    def job(name, steps):
        from modules import sd_hijack

        # as A1111's own Train tab (textual_inversion/ui.py train_embedding): cross-attention optimizations
        # are undone for training unless the user's "Use cross attention optimizations while training" is on
        keep_optimizations = bool(getattr(shared.opts, "training_xattention_optimizations", False))
        shared.state.begin(job=name)
        shared.state.job_count = 1
        shared.state.sampling_steps = steps
        try:
            if not keep_optimizations:
                sd_hijack.undo_optimizations()
            yield
        finally:
            if not keep_optimizations:
                sd_hijack.apply_optimizations()
            shared.state.end()

    def progress(info):
        shared.state.sampling_step = info.step
        shared.state.textinfo = f"step {info.step}/{info.total}, loss {info.losses.get('loss', 0):.4g}"

    return logic.Host(backend=a1111_backend.from_shared, lora_dir=Path(lora_dir), embeddings_dir=Path(embeddings_dir),
                      interrupted=lambda: bool(shared.state.interrupted), progress=progress, job=job)


def _locked(fn):
    def run(*args):
        from modules.call_queue import queue_lock

        with queue_lock:  # one job at a time with A1111's own generation / training
            out = fn(_host(), *args)
        return out.message, out.curve
    return run


def _erase(host, name, concept, synonyms, method, kind, anchor, preserve, steps, lr, preset, rank, seed, files):
    import a1111_tab_logic as logic

    return logic.erase_concept(host, name, concept, synonyms, method, kind, anchor, preserve, steps, lr, preset,
                               rank, seed, images=files or None)


def _token(host, token, files, n_vectors, init_word, kind, steps, lr, seed):
    import a1111_tab_logic as logic

    return logic.learn_concept_token(host, token, files or None, n_vectors, init_word, kind, steps, lr, seed)


def on_ui_tabs():
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("Erase a concept from the loaded **SD 2.x** checkpoint: trains a text-encoder LoRA saved to "
                    "models/Lora (use it with `<lora:name:1>`). The checkpoint itself is not changed.")
        with gr.Row():
            with gr.Column():
                name = gr.Textbox(label="Adapter name", value="erase_concept")
                concept = gr.Textbox(label="Concept to erase", placeholder="a red square")
                synonyms = gr.Textbox(label="Synonyms (comma-separated)")
                method = gr.Dropdown(["anchor", "weighted", "fewshot"], value="anchor", label="Method")
                kind = gr.Radio(["object", "style"], value="object", label="Kind")
                anchor = gr.Textbox(label="Anchor prompt", value="a photo")
                preserve = gr.Textbox(label="Prompts to preserve (comma-separated; empty: defaults)")
                with gr.Row():
                    steps = gr.Slider(1, 1000, value=60, step=1, label="Steps")
                    lr = gr.Number(value=1e-3, label="Learning rate")
                with gr.Row():
                    preset = gr.Dropdown(["fewshot", "final", "all"], value="fewshot", label="Targets")
                    rank = gr.Slider(1, 128, value=4, step=1, label="Rank")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                files = gr.File(label="Example images (fewshot/weighted)", file_count="multiple", file_types=["image"])
                run = gr.Button("Erase", variant="primary")
                with gr.Accordion("Learn a concept token (textual inversion)", open=False):
                    token = gr.Textbox(label="Token", value="<concept>")
                    n_vectors = gr.Slider(1, 16, value=1, step=1, label="Vectors")
                    init_word = gr.Textbox(label="Initial word", value="object")
                    token_steps = gr.Slider(1, 2000, value=200, step=1, label="Steps")
                    token_lr = gr.Number(value=5e-3, label="Learning rate")
                    learn = gr.Button("Learn token")
            with gr.Column():
                message = gr.Textbox(label="Result", interactive=False)
                curve = gr.Image(label="Loss", type="pil", interactive=False)
                interrupt = gr.Button("Interrupt")

        run.click(_locked(_erase), inputs=[name, concept, synonyms, method, kind, anchor, preserve, steps, lr,
                                           preset, rank, seed, files], outputs=[message, curve])
        learn.click(_locked(_token), inputs=[token, files, n_vectors, init_word, kind, token_steps, token_lr, seed],
                    outputs=[message, curve])

        def _interrupt():
            from modules import shared

            shared.state.interrupt()

        interrupt.click(_interrupt, inputs=[], outputs=[])
    return [(tab, "Concept Unlearn", "concept_unlearn")]


try:
    from modules import script_callbacks
except ImportError:  # outside AUTOMATIC1111 (tests import the logic modules directly)
    script_callbacks = None

if script_callbacks is not None:
    script_callbacks.on_ui_tabs(on_ui_tabs)
