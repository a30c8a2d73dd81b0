"""concept-unlearn: learn concept tokens, erase concepts, generate and inspect, over diffusers."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
file sizes (SD2, fewshot targets = fc1/fc2 of 23 layers + attention of the last):
  --mode lora --rank 4       about 2 MB    (default; loads in ComfyUI, A1111 and diffusers)
  --mode full                about 400 MB  (kohya .diff keys: A1111 and ComfyUI load them, diffusers does not)
  --mode full --compress-rank 8   about 4 MB (full fine-tuning, then SVD to a LoRA every host loads)

what they give on the benchmark world (bench/RESULTS.md, 60 steps, weighted): the default LoRA at lr 1e-3
erased stripes; full-weight deltas at lr 1e-4 changed nothing, compressed or not (the SVD to rank 8 lost
nothing measurable). --paper-settings changed nothing at its published lr 1e-5 on that small model; the
same recipe at lr 1e-3 (about: --method fewshot --mode full --steps 10 --lr 1e-3 --preserve-weight 0)
erased red.
"""

CONCEPT_FILE_EXAMPLE = ('[{"name": "green", "synonyms": ["lime"], "contexts": ["a {} cube on dots"], '
                        '"keep": ["red", "blue"], "kind": "object"}]')


def _progress(total: int, description: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="step", leave=True)

    def callback(info):
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in info.losses.items()})
        if info.step == info.total:
            bar.close()
    return callback


def _load(args):
    from .cli_checks import check_device
    from .diffusers_backend import DiffusersBackend, load_pipeline

    import torch

    check_device(args.device)
    pipe = load_pipeline(args.model, prediction_type=args.prediction_type, dtype=getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    if args.device:
        pipe.to(args.device)
    return pipe, DiffusersBackend(pipe)


def _images(args, backend):
    from .images import load_images

    images, notes = load_images(args.images, args.resolution or backend.resolution)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return images


def _check_out(path: str, force: bool, suffix: str | None = None) -> Path:
    """Refuse a bad --out (name, existing file or folder, unwritable folder) before any model loads."""
    from .cli_checks import check_output

    return check_output(path, force, suffix)


def cmd_learn_token(args) -> None:
    from .adapter_io import base_fingerprint, write_token
    from .config import TokenConfig
    from .images import find_images
    from .inversion import learn_token
    from .cli_checks import check_token_name_option
    from .tokens import check_token_is_not_a_word

    check_token_name_option(args.name)
    config = TokenConfig(token=args.name, n_vectors=args.vectors, init_word=args.init_word, kind=args.kind,
                         steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    check_token_is_not_a_word(config.token)
    out = _check_out(args.out, args.force, ".safetensors")
    find_images(args.images)
    _, backend = _load(args)
    images = _images(args, backend)
    result = learn_token(backend, images, config, _progress(config.steps, f"learning {config.token}"))
    write_token(out, result.token, base_fingerprint(backend), overwrite=args.force)
    print(f"wrote {out}: token {config.token!r}, {config.n_vectors} vector(s), loss "
          f"{result.history[0]['loss']:.4f} -> {result.history[-1]['loss']:.4f}, {result.seconds:.1f} s")


def erase_config_from_args(args):
    from .config import Concept
    from .methods import method_config

    method = "fewshot-paper" if args.paper_settings else args.method
    if args.unet_kv_edit and method != "contextual":
        raise ValueError(f"--unet-kv-edit: only the contextual method edits the UNet's keys/values, not {method!r}")
    # each --concept is NAME or NAME=SYNONYM|SYNONYM; --synonym adds to the first; more than one: a joint erasure
    first, *others = [Concept.parse(text) for text in args.concept]
    others += concepts_from_file(args.concept_file) if args.concept_file else []
    if args.paper_settings:
        from .cli_checks import check_paper_settings

        check_paper_settings(args, _erase_defaults())
    settings = dict(synonyms=first.synonyms + tuple(args.synonym or ()), also=tuple(others) or None,
                    kind=args.kind, anchor=args.anchor, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    seed=args.seed, ascent_weight=args.ascent_weight, anchor_weight=args.anchor_weight,
                    preserve_weight=args.preserve_weight,
                    gradient_surgery=args.gradient_surgery or None,
                    preserve=tuple(args.preserve) if args.preserve is not None else None,
                    keep=tuple(args.keep or ()), contexts=tuple(args.context or ()),
                    negative_guidance=args.negative_guidance, neighbour_target=args.neighbour_target,
                    adversarial_rounds=args.adversarial_rounds,
                    unet_kv_edit=args.unet_kv_edit, update_weight=args.update_weight,
                    preset=args.preset, last_k=args.last_k,
                    targets=tuple(args.target or ()), mode=args.mode, rank=args.rank, alpha=args.alpha,
                    compress_rank=args.compress_rank)
    if args.mode == "full" and args.lr is None:
        settings["lr"] = 1e-5  # full-weight deltas move whole weights: the paper's rate, not LoRA's
    try:
        return method_config(method, first.name, **settings)
    except ValueError as error:  # the list of concepts is --concept (and --concept-file) here, not the field "also"
        if str(error).startswith("also: "):
            option = "--concept/--concept-file" if args.concept_file else "--concept"
            raise ValueError(f"{option}: {str(error).removeprefix('also: ')}") from None
        raise


def concepts_from_file(path: str) -> list:
    """--concept-file: a JSON list of concepts, each a mapping of name and, optionally, synonyms, contexts, keep
    and kind (``Concept``'s fields)."""
    from .config import Concept

    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"--concept-file {path}: cannot read it ({error.strerror})") from None
    except ValueError as error:  # not JSON, or not UTF-8
        raise ValueError(f"--concept-file {path}: not a JSON file ({error})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--concept-file {path}: give a JSON list of concepts, e.g. " + CONCEPT_FILE_EXAMPLE)
    try:
        return [Concept.of(entry) for entry in entries]
    except ValueError as error:
        raise ValueError(f"--concept-file {path}: {str(error).removeprefix('also: ')}") from None


def _erase_defaults() -> dict:
    """The erase command's option values when none is given."""
    return vars(build_parser().parse_args(["erase", "--model", "-", "--concept", "-", "--out", "-"]))


def cmd_erase(args) -> None:
    from .adapter_io import base_fingerprint, read_token, write_adapter
    from . import stacking
    from .cli_checks import check_token_file_option
    from .continual import check_config, check_earlier, grown, read_earlier
    from .erase import erase
    from .images import find_images
    from .plots import loss_curve

    config = erase_config_from_args(args)
    out = _check_out(args.out, args.force, ".safetensors")
    if args.after:
        check_config(config, "--after", " (add --method contextual)")
    earlier = [read_earlier(path) for path in args.after or ()]  # the files, before any model loads
    if args.images:
        find_images(args.images)
    check_token_file_option(args.token_file)
    _, backend = _load(args)
    for adapter in earlier:
        check_earlier(adapter, backend)
    images = _images(args, backend) if args.images else None
    token = read_token(args.token_file, backend) if args.token_file else None
    result = erase(backend, config, images, token, _progress(config.total_steps, f"erasing {config.concept_label!r}"),
                   earlier=earlier)
    if earlier:  # the earlier file(s) with the new part stacked on: one file that grows by concept
        stacking.write(out, grown(earlier, result, base_fingerprint(backend), out.name), overwrite=args.force)
    else:
        write_adapter(out, result.deltas, base_fingerprint(backend), result.info(), overwrite=args.force,
                      unet=result.unet_deltas)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    curve = out.with_suffix(".loss.png")
    written = [f"{out} ({out.stat().st_size / 1e6:.2f} MB)"]
    if not curve.exists() or args.force:
        loss_curve(result.history, f"erase {config.concept_label!r} ({config.method})").save(curve)
        written.append(curve.name)
    print(f"wrote {' and '.join(written)}: {config.method}, {config.steps} steps, {result.seconds:.1f} s, "
          f"{result.unet_calls} UNet calls ({result.unet_samples} samples)")


def apply_adapter_to_pipeline(pipe, backend, path, strength: float, allow_other_base: bool) -> None:
    """Validate the file, then apply it with diffusers' own loader (LoRA) or by adding .diff to our copy."""
    import torch

    from .adapter_io import read_adapter

    adapter = read_adapter(path, backend, allow_other_base)
    for note in adapter.notes:
        print(f"note: {note}", file=sys.stderr)
    if adapter.deltas.mode == "lora" and adapter.deltas.uniform_alpha is not None:
        pipe.load_lora_weights(str(path), adapter_name="erasure")
        pipe.set_adapters(["erasure"], adapter_weights=[strength])
        return
    # Added to our own copy of the pipeline, module by module: kohya .diff keys (diffusers does not read them), and
    # LoRAs whose modules have their own alphas (diffusers 0.42 keys such alphas by the text encoder's transformers-4
    # module paths, text_model.encoder...; under transformers 5 they match nothing, peft ignores them with a warning
    # and every module gets the most common alpha)
    with torch.no_grad():
        for target in adapter.deltas.targets:
            weight = backend.linear(target).weight
            weight += strength * adapter.deltas.delta_weight(target).to(device=weight.device, dtype=weight.dtype)
        for name, module in (backend.cross_attention_kv().items() if adapter.unet is not None else ()):
            if name in adapter.unet.names:  # the UNet key/value edit, added the same way
                delta = adapter.unet.delta_weight(name)
                module.weight += strength * delta.to(module.weight.device, module.weight.dtype)


def cmd_generate(args) -> None:
    import torch

    from .adapter_io import read_token
    from .cli_checks import check_generate_options, check_token_file_option

    check_generate_options(args.strength, args.sample_steps)
    out = _check_out(args.out, args.force)
    check_token_file_option(args.token_file)
    pipe, backend = _load(args)
    if args.token_file:
        token = read_token(args.token_file, backend)
        pipe.load_textual_inversion(args.token_file, token=token.name)
    if args.adapter:
        apply_adapter_to_pipeline(pipe, backend, args.adapter, args.strength, args.force_base)
    size = args.resolution or backend.resolution
    generator = torch.Generator().manual_seed(args.seed)
    image = pipe(args.prompt, num_inference_steps=args.sample_steps, guidance_scale=args.guidance,
                 height=size, width=size, generator=generator).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out}")


def cmd_inspect(args) -> None:
    from .adapter_io import AdapterFileError, inspect

    summary = inspect(args.file)
    print(json.dumps(summary, indent=2))
    if "problem" in summary:
        raise AdapterFileError(summary["problem"])


def _describe(adapter) -> str:
    from .stacking import unstack

    if not adapter.is_stack:
        return f"one adapter ({adapter.info('concept') or 'no concept recorded'})"
    parts = unstack(adapter)
    listed = ", ".join(p.concept if p.strength == 1 else f"{p.concept} x{p.strength:g}" for p in parts)
    return f"a stack of {len(parts)} ({listed}), rank {sum(p.rank for p in parts)}"


def cmd_merge(args) -> None:
    from .continual import undoing_each_other
    from .stacking import merge_files

    out = _check_out(args.out, args.force, ".safetensors")
    path, merged = merge_files(args.adapters, out, args.strength, overwrite=args.force,
                               allow_other_base=args.force_base)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {_describe(merged)}")
    for warning in undoing_each_other(merged.parts(path.name)):
        print(f"warning: {warning}", file=sys.stderr)


def cmd_remove(args) -> None:
    from .stacking import remove_from_file

    out = _check_out(args.out, args.force, ".safetensors")
    path, rest = remove_from_file(args.stack, args.concept, out, overwrite=args.force)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {_describe(rest)}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), force=args.force)


def _model_options(parser) -> None:
    parser.add_argument("--model", required=True, help="diffusers folder (model_index.json) or SD2 .safetensors/.ckpt")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                        help="override the model's prediction type (single files: v unless named 512/base)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="model weights' dtype (float16 halves GPU memory; deltas always train in float32)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--force", action="store_true", help="overwrite the output file if it exists")


def build_parser() -> argparse.ArgumentParser:
    from .cli_checks import seed_value
    from .methods import DEFAULT_METHOD, METHODS
    from .neighbours import TARGETS

    parser = argparse.ArgumentParser(prog="concept-unlearn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("learn-token", help="learn a concept token (textual inversion) from example images")
    _model_options(p)
    p.add_argument("--images", required=True, help="folder with 1 or more example images")
    p.add_argument("--name", "--token", dest="name", required=True, metavar="NAME",
                   help="the token's name as you will write it in prompts, e.g. <my-cat> (the file goes in --out; "
                        "--token is the older spelling of this option)")
    p.add_argument("--out", required=True, help="output .safetensors (emb_params; loads in ComfyUI, A1111, diffusers)")
    p.add_argument("--vectors", type=int, default=1, help="number of embedding vectors (default 1)")
    p.add_argument("--init-word", default="object", help="word whose embedding starts the token (default object)")
    p.add_argument("--kind", choices=("object", "style"), default="object", help="prompt templates to use")
    p.add_argument("--steps", type=int, default=200, help="optimisation steps (default 200)")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate (default 5e-3)")
    p.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed (same seed, same result)")
    p.set_defaults(func=cmd_learn_token)

    p = sub.add_parser("erase", help="train an erasure adapter (text-encoder LoRA) for a concept",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _model_options(p)
    p.add_argument("--concept", required=True, action="append",
                   help="the concept as it appears in prompts, e.g. 'a red star'; repeat it to erase several concepts "
                        "jointly in one run (contextual method): --concept 'a cat' --concept 'a dog=a puppy|a hound' "
                        "(after '=', that concept's synonyms separated by '|'; --synonym adds to the first concept)")
    p.add_argument("--concept-file", metavar="JSON",
                   help="more concepts to erase jointly with --concept (contextual), each with its own captions, "
                        "neighbours and kind, as a JSON list: " + CONCEPT_FILE_EXAMPLE + " (only name is needed; "
                        "a concept without contexts/keep/kind takes --context/--keep/--kind, as --concept's do)")
    p.add_argument("--images", help="folder with 4-5 example images (needed by methods fewshot and weighted)")
    p.add_argument("--token-file", "--token", dest="token_file", metavar="FILE",
                   help="a concept token file written by learn-token (its --out), whose name is erased as well "
                        "(--token is the older spelling of this option)")
    p.add_argument("--synonym", action="append", help="another phrase for the concept (repeatable)")
    p.add_argument("--method", choices=[m for m in METHODS if m != "fewshot-paper"], default=DEFAULT_METHOD,
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values() if m.name != "fewshot-paper")
                   .replace("%", "%%"))
    p.add_argument("--paper-settings", action="store_true",
                   help="Fuchi & Takagi 2024 exactly: fewshot, full weights, Adam lr 1e-5 betas (0.9, 0.98), "
                        "batch 2, 10 steps, no preserve term; saved as a rank --rank LoRA by SVD (other options "
                        "refused except synonyms/kind/seed/rank)")
    p.add_argument("--kind", choices=("object", "style"), default="object", help="prompt templates to use")
    p.add_argument("--anchor", default=None, help="what the concept becomes: contextual replaces it by this in "
                   "each context (default: nothing, its words are dropped); anchor/weighted: the anchor prompt "
                   "(default 'a photo')")
    p.add_argument("--keep", action="append", help="a neighbour to keep, put in the concept's place in every "
                   "context, e.g. --keep 'a dog' when erasing 'a cat' (repeatable; contextual)")
    p.add_argument("--context", action="append", help="a prompt with {} where the concept goes, e.g. 'a {} on a "
                   "sofa' (repeatable; contextual: the captions of your images are the best contexts)")
    p.add_argument("--adversarial-rounds", type=int, default=None,
                   help="contextual, robust option: rounds of a token learned against the adapter from --images, "
                        "then erased too (default 0; 2 is the hosts' 'robust'; each round costs 100 token steps)")
    p.add_argument("--unet-kv-edit", action=argparse.BooleanOptionalAction, default=None,
                   help="contextual (on by default; --no-unet-kv-edit for a text-encoder-only file): after the text "
                        "encoder, also edit the UNet's cross-attention keys/values in "
                        "closed form (seconds; the concept's directions are mapped onto the neighbours'/anchor's, so "
                        "a token re-learned later reads less of it); saved in the same file as kohya "
                        "lora_unet_*attn2_to_k/to_v keys, which diffusers, ComfyUI and A1111 load")
    p.add_argument("--after", action="append", metavar="FILE",
                   help="continual erasure (contextual): an earlier erasure adapter or stack of this model "
                        "(repeatable); the new concept is erased on the model with it applied, its concepts are "
                        "kept erased, and --out is that file with the new adapter stacked on (remove takes it out)")
    p.add_argument("--update-weight", type=float, default=None,
                   help="with --after: weight of the regulariser keeping the new update small (its squared size "
                        "relative to the adapted weights'; default 0.1)")
    p.add_argument("--negative-guidance", type=float, default=None,
                   help="contextual: push the concept's target this many times its distance past the anchor or "
                        "chosen neighbour, away from the concept (default "
                        f"{METHODS['contextual'].defaults['negative_guidance']:g}; 0: onto it)")
    p.add_argument("--neighbour-target", choices=TARGETS, default=None,
                   help="contextual, no --anchor: where the concept goes in each context (nearest: the --keep "
                        "neighbour nearest the concept, the default; typical: the --keep neighbour nearest the "
                        "neighbours' average; mean: that average, which renders as the concept itself when the "
                        "concept is central to its kind)")
    p.add_argument("--preserve", action="append", help="a prompt whose conditioning must not change (repeatable; "
                                                        "replaces the default list)")
    p.add_argument("--preset", choices=("fewshot", "first", "final", "all"), default=None,
                   help="which projections to adapt (fewshot: fc1/fc2 of every layer + last attention; first: "
                        "fc1/fc2 of the first layer, the contextual method's; default: the method's)")
    p.add_argument("--last-k", type=int, default=1, help="layers adapted by --preset final (default 1)")
    p.add_argument("--target", action="append", help="explicit LAYER.PROJ (proj: q k v out fc1 fc2); repeatable")
    p.add_argument("--mode", choices=("lora", "full"), default=None, help="LoRA deltas (default) or full-weight deltas")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 4; with --paper-settings the rank of "
                   "the SVD the full delta is saved as)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    p.add_argument("--compress-rank", type=int, default=None, help="full mode: save as a LoRA of this rank (SVD)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the method's, "
                   "contextual 200, the others 60)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 LoRA, 1e-5 full)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 2)")
    p.add_argument("--ascent-weight", type=float, default=None, help="weight of the gradient-ascent term (default 1)")
    p.add_argument("--anchor-weight", type=float, default=None, help="weight of the anchor term (default 1)")
    p.add_argument("--preserve-weight", type=float, default=None, help="weight of the preserve term (default 1)")
    p.add_argument("--gradient-surgery", action="store_true",
                   help="DoCo: drop the part of the erase gradient that conflicts with the preserve gradient")
    p.add_argument("--seed", type=seed_value, default=None, help="random seed (default 0; same seed, same result)")
    p.add_argument("--out", required=True, help="output adapter .safetensors (a loss curve PNG is written beside it)")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("generate", help="generate an image, optionally with an adapter and/or a token")
    _model_options(p)
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--adapter", help="erasure adapter .safetensors to apply")
    p.add_argument("--strength", type=float, default=1.0, help="adapter strength (default 1.0)")
    p.add_argument("--force-base", action="store_true", help="apply an adapter made for another base model anyway")
    p.add_argument("--token-file", "--token", dest="token_file", metavar="FILE",
                   help="a concept token file written by learn-token; its name (recorded in the file) can be used "
                        "in --prompt (--token is the older spelling of this option)")
    p.add_argument("--sample-steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=seed_value, default=0, help="sampling seed")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="print an adapter's or token's metadata as JSON")
    p.add_argument("file", help="a .safetensors adapter or token")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="stack erasure adapters into one file whose effect is the exact sum of theirs")
    p.add_argument("adapters", nargs="+", help="erasure adapter .safetensors files (a stack adds its parts)")
    p.add_argument("--strength", type=float, action="append",
                   help="strength of each adapter, in order (repeat once per adapter; default 1 each)")
    p.add_argument("--out", required=True, help="output .safetensors (loads in every host like any adapter)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--force-base", action="store_true", help="stack adapters whose base-model fingerprints differ "
                                                               "or are missing")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("remove", help="take one concept's adapter out of a stack (the others come back exactly)")
    p.add_argument("stack", help="a stacked .safetensors written by merge")
    p.add_argument("--concept", required=True, help="the concept to remove (as inspect lists it) or its part's "
                                                    "file name")
    p.add_argument("--out", required=True, help="output .safetensors (the original file when one part remains)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("demo", help="run every command end to end on a tiny built-in model with RANDOM weights "
                                    "(the flow, not erasure quality: `make demo` shows erasure on the world model)")
    p.add_argument("--out", default="out/cli-demo", help="output folder (default out/cli-demo)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier demo's files")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .adapter_io import AdapterFileError
    from .backend import UnsupportedModelError
    from .train import Cancelled, TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (KeyboardInterrupt, Cancelled):
        print("cancelled: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, AdapterFileError, UnsupportedModelError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
