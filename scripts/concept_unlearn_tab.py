"""AUTOMATIC1111 tab "Concept Unlearn" (gradio 3.41 API) and its Settings section.

The only file of scripts/ that registers callbacks (script_callbacks.on_ui_tabs / on_ui_settings). All work is in
concept_unlearn_logic.py (tested without A1111); this file builds the UI and hands each button A1111's Host
(shared.sd_model, models/Lora, embeddings/, shared.state, queue_lock, cross-attention optimizations undone for the
run).

Loading: A1111 loads every scripts/*.py by path without a sys.modules entry, so nothing here is imported by name:
this file loads the backend file by path once (``_backend``); the backend's ``sibling`` loads the logic file (and
the backend loads the engine), registered, the one loader of scripts/ files (see the backend's docstring).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BACKEND = "concept_unlearn_a1111_backend"


def _backend():
    """scripts/concept_unlearn_a1111_backend.py, loaded by path once and registered under its name."""
    if BACKEND not in sys.modules:
        spec = importlib.util.spec_from_file_location(BACKEND, Path(__file__).with_name(f"{BACKEND}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # what it registers itself (engine, siblings) its loader removes on failure
        sys.modules[BACKEND] = module  # registered only once loaded: a failed load leaves nothing behind
    return sys.modules[BACKEND]


logic = _backend().sibling("logic")

SECTION = ("concept_unlearn", "Concept Unlearn")
TITLE = "Concept Unlearn"
STATUS_EVERY = 1.0  # seconds between two looks at A1111's state (status line, buttons enabled or not)


def on_ui_settings():
    """Rarely changed options, on A1111's Settings page (read by logic.a1111_host)."""
    import gradio as gr
    from modules import shared

    options = {
        "concept_unlearn_resolution": shared.OptionInfo(
            512, "Training image size in pixels (512 for SD 2.x 512-base, 768 for 768-v)", gr.Slider,
            {"minimum": 256, "maximum": 1024, "step": 64}, section=SECTION),
        "concept_unlearn_overwrite": shared.OptionInfo(
            False, "Overwrite an adapter / token file of the same name", section=SECTION),
        "concept_unlearn_lr": shared.OptionInfo(
            0.0, "Erase learning rate (0: the method's default; the paper preset keeps its own)", gr.Number,
            section=SECTION),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)


def _choices(which: str) -> list[str]:
    lora_dir, embeddings_dir = logic.a1111_folders()
    return logic.list_files(lora_dir if which == "lora" else embeddings_dir)


def _earlier_choices() -> list[str]:
    """The "erase after" list: none (a plain erasure) and the adapters of models/Lora."""
    return [logic.NO_EARLIER] + _choices("lora")


def on_ui_tabs():
    import gradio as gr

    def erase_click(files, concept, synonyms, token, method, preset, steps, rank, seed, name, kind, anchor, preserve,
                    keep, contexts, robust, unet_kv_edit, erase_after, progress=gr.Progress()):
        message, path, curve = logic.do_erase(logic.a1111_host(), files, concept, synonyms, token, method, preset,
                                              steps, rank, seed, name=name, progress=progress, kind=kind,
                                              anchor=anchor, preserve=preserve, keep=keep, contexts=contexts,
                                              robust=robust, unet_kv_edit=unet_kv_edit, erase_after=erase_after)
        adapter = gr.Dropdown.update(choices=_choices("lora"), value=Path(path).stem) if path else gr.Dropdown.update()
        earlier = gr.Dropdown.update(choices=_earlier_choices()) if path else gr.Dropdown.update()
        return message, curve, adapter, earlier

    def learn_click(files, token, init_word, kind, steps, seed, n_vectors, progress=gr.Progress()):
        message, path, curve = logic.do_learn_token(logic.a1111_host(), files, token, init_word, kind, steps, seed,
                                                    progress=progress, n_vectors=n_vectors)
        chosen = gr.Dropdown.update(choices=_choices("token"), value=Path(path).stem) if path else gr.Dropdown.update()
        return message, curve, chosen

    def audit_click(files, adapter, steps, seed, progress=gr.Progress()):
        message, _path, curve = logic.do_audit(logic.a1111_host(), files, adapter, steps, seed, progress=progress)
        return message, curve

    def lora_lists(path):
        """New choices for the four adapter lists after a file was saved (the lists keep their values; the last
        is "erase after", which also offers none)."""
        choices = _choices("lora")  # one update dict per output: gradio 3.41 pops keys from each while sending it
        lists = (choices, choices, choices, [logic.NO_EARLIER] + choices)
        return tuple(gr.Dropdown.update(choices=c) if path else gr.Dropdown.update() for c in lists)

    def merge_click(adapters, strengths, name):
        message, path, _ = logic.do_merge(logic.a1111_host(), adapters, strengths, name=name)
        return (message,) + lora_lists(path)

    def remove_click(stack, concept, name):
        message, path, _ = logic.do_remove(logic.a1111_host(), stack, concept, name=name)
        return (message,) + lora_lists(path)

    def interrupt_click():
        from modules import shared

        shared.state.interrupt()

    def status():
        """The status line and the three buttons as A1111's state allows now (polled; Interrupt is left alone)."""
        from modules import call_queue, shared

        text, enabled = logic.availability(shared.state, getattr(call_queue, "queue_lock", None))
        # one update dict per output: gradio 3.41 pops keys from each while sending it
        return (gr.Markdown.update(value=text),) + tuple(gr.Button.update(interactive=enabled) for _ in range(3))

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("Erase a concept from the loaded **Stable Diffusion 2.x** checkpoint: *Erase* trains a "
                    "text-encoder LoRA on it and saves it to models/Lora (use it with `<lora:name:1>`); the "
                    "checkpoint itself is not changed. *Learn token* saves a concept token to embeddings/; *Audit* "
                    "tries to re-learn an erased concept. While A1111 generates or trains, the buttons are disabled "
                    "(the status line says why) and come back when it finishes; *Interrupt* stops a run and saves "
                    "nothing. More options: Settings > Concept Unlearn.")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Example images (4-5 of the concept)", file_count="multiple",
                                file_types=["image"], elem_id="concept_unlearn_images")
                concept = gr.Textbox(label="Concept to erase", placeholder="a red square",
                                     elem_id="concept_unlearn_concept")
                synonyms = gr.Textbox(label="Synonyms (comma-separated)", elem_id="concept_unlearn_synonyms")
                with gr.Row():
                    token = gr.Dropdown(choices=_choices("token"), value=None, allow_custom_value=True,
                                        label="Concept token (optional: a file in embeddings/)",
                                        elem_id="concept_unlearn_token")
                    refresh_tokens = gr.Button("Refresh", size="sm", elem_id="concept_unlearn_refresh_tokens")
                with gr.Row():
                    method = gr.Dropdown(list(logic.METHODS), value=next(iter(logic.METHODS)), label="Method",
                                         elem_id="concept_unlearn_method")
                    preset = gr.Dropdown(list(logic.PRESETS), value=next(iter(logic.PRESETS)), label="Layers",
                                         elem_id="concept_unlearn_preset")
                with gr.Row():
                    steps = gr.Slider(1, 1000, value=200, step=1, label="Steps (contextual 200, the others 60)",
                                      elem_id="concept_unlearn_steps")
                    rank = gr.Slider(1, 64, value=4, step=1, label="Rank", elem_id="concept_unlearn_rank")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="concept_unlearn_seed")
                with gr.Accordion("More erase options", open=False):
                    name = gr.Textbox(label="Adapter name (empty: unlearn_<concept>)", elem_id="concept_unlearn_name")
                    kind = gr.Radio(["object", "style"], value="object", label="Kind", elem_id="concept_unlearn_kind")
                    anchor = gr.Textbox(label="Anchor (what the concept becomes; empty: contextual drops its words, "
                                              "the others use 'a photo')", value="", elem_id="concept_unlearn_anchor")
                    keep = gr.Textbox(label="Keep: neighbours that must stay, one per line (contextual)", lines=3,
                                      elem_id="concept_unlearn_keep")
                    contexts = gr.Textbox(label="Contexts: prompts with {} where the concept goes, one per line "
                                                "(contextual; your images' captions are best)", lines=3,
                                          elem_id="concept_unlearn_contexts")
                    robust = gr.Checkbox(label="Robust: erase tokens learned against the adapter too (contextual; "
                                               "needs images; slower)", value=False, elem_id="concept_unlearn_robust")
                    unet_kv_edit = gr.Checkbox(label="UNet key/value edit: also change what the UNet reads of the "
                                                     "text (contextual; other methods ignore it; the same <lora:...> applies it)",
                                               value=True, elem_id="concept_unlearn_unet_kv_edit")
                    preserve = gr.Textbox(label="Prompts to preserve (comma-separated; empty: defaults)",
                                          elem_id="concept_unlearn_preserve")
                    erase_after = gr.Dropdown(choices=_earlier_choices(), value=logic.NO_EARLIER,
                                              allow_custom_value=True,
                                              label="Erase after (optional, contextual: an earlier erasure adapter "
                                                    "or stack in models/Lora; the new concept is erased with it "
                                                    "applied and the saved file is it plus the new erasure, one "
                                                    "stack that grows by concept; the earlier file is not changed)",
                                              elem_id="concept_unlearn_erase_after")
                with gr.Accordion("Learn a concept token (textual inversion)", open=False):
                    token_name = gr.Textbox(label="Token name", value="<my-concept>", elem_id="concept_unlearn_token_name")
                    init_word = gr.Textbox(label="Initial word", value="object", elem_id="concept_unlearn_init_word")
                    with gr.Row():
                        n_vectors = gr.Slider(1, 16, value=1, step=1, label="Vectors", elem_id="concept_unlearn_vectors")
                        token_steps = gr.Slider(1, 2000, value=200, step=1, label="Token steps",
                                                elem_id="concept_unlearn_token_steps")
                with gr.Accordion("Audit an adapter (re-learning attack)", open=False):
                    with gr.Row():
                        adapter = gr.Dropdown(choices=_choices("lora"), value=None, allow_custom_value=True,
                                              label="Adapter (a file in models/Lora)", elem_id="concept_unlearn_adapter")
                        refresh_adapters = gr.Button("Refresh", size="sm", elem_id="concept_unlearn_refresh_adapters")
                    audit_steps = gr.Slider(1, 2000, value=100, step=1, label="Attack steps",
                                            elem_id="concept_unlearn_audit_steps")
                with gr.Accordion("Stack adapters (several concepts in one file)", open=False):
                    gr.Markdown("*Merge* saves one LoRA whose effect is the sum of the chosen adapters' (each at its "
                                "strength); *Remove* takes one concept out of such a stack again, exactly.")
                    stack_adapters = gr.Dropdown(choices=_choices("lora"), value=[], multiselect=True,
                                                 label="Adapters to merge (files in models/Lora)",
                                                 elem_id="concept_unlearn_stack_adapters")
                    with gr.Row():
                        stack_strengths = gr.Textbox(label="Strengths (comma-separated, one per adapter; empty: 1)",
                                                     elem_id="concept_unlearn_stack_strengths")
                        stack_name = gr.Textbox(label="Stack name (empty: unlearn_stack_<names>)",
                                                elem_id="concept_unlearn_stack_name")
                    merge = gr.Button("Merge", elem_id="concept_unlearn_merge")
                    with gr.Row():
                        remove_stack = gr.Dropdown(choices=_choices("lora"), value=None, allow_custom_value=True,
                                                   label="Stack to remove from", elem_id="concept_unlearn_remove_stack")
                        remove_concept = gr.Textbox(label="Concept to remove", elem_id="concept_unlearn_remove_concept")
                        remove_name = gr.Textbox(label="New name (empty: <stack>_without_<concept>)",
                                                 elem_id="concept_unlearn_remove_name")
                    remove = gr.Button("Remove", elem_id="concept_unlearn_remove")
            with gr.Column():
                with gr.Row():
                    learn = gr.Button("Learn Token", elem_id="concept_unlearn_learn")
                    run = gr.Button("Erase", variant="primary", elem_id="concept_unlearn_erase")
                    audit = gr.Button("Audit", elem_id="concept_unlearn_audit")
                    interrupt = gr.Button("Interrupt", elem_id="concept_unlearn_interrupt")
                status_line = gr.Markdown(logic.availability(None)[0], elem_id="concept_unlearn_status")
                message = gr.Textbox(label="Result", interactive=False, elem_id="concept_unlearn_message")
                curve = gr.Image(label="Loss curve", type="pil", interactive=False, elem_id="concept_unlearn_curve")

        run.click(erase_click, inputs=[files, concept, synonyms, token, method, preset, steps, rank, seed, name, kind,
                                       anchor, preserve, keep, contexts, robust, unet_kv_edit, erase_after],
                  outputs=[message, curve, adapter, erase_after])
        learn.click(learn_click, inputs=[files, token_name, init_word, kind, token_steps, seed, n_vectors],
                    outputs=[message, curve, token])
        audit.click(audit_click, inputs=[files, adapter, audit_steps, seed], outputs=[message, curve])
        interrupt.click(interrupt_click, inputs=[], outputs=[], queue=False)
        merge.click(merge_click, inputs=[stack_adapters, stack_strengths, stack_name],
                    outputs=[message, adapter, stack_adapters, remove_stack, erase_after])
        remove.click(remove_click, inputs=[remove_stack, remove_concept, remove_name],
                     outputs=[message, adapter, stack_adapters, remove_stack, erase_after])
        refresh_tokens.click(lambda: gr.Dropdown.update(choices=_choices("token")), inputs=[], outputs=[token])
        refresh_adapters.click(lambda: lora_lists(True), inputs=[], outputs=[adapter, stack_adapters, remove_stack,
                                                                              erase_after])
        # live state: polled while the page is open (a continuous event: gradio 3.41 runs it outside the queue's
        # workers, but needs the queue, which A1111 enables); the buttons' own busy check stays behind it
        tab.load(status, inputs=None, outputs=[status_line, learn, run, audit], every=STATUS_EVERY,
                 show_progress="hidden", api_name=False)
    return [(tab, TITLE, "concept_unlearn")]


try:
    from modules import script_callbacks
except ImportError:  # outside AUTOMATIC1111 (tests load this file by path)
    script_callbacks = None

if script_callbacks is not None:
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
