"""Command-line checks made before any model loads or training starts: each bad option is one clear line."""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed's range
# what --paper-settings keeps from the command line; every other erase option is fixed by the paper's recipe
PAPER_SETTINGS_KEEP = {"command", "func", "model", "prediction_type", "device", "dtype", "resolution", "force",
                       "concept", "images", "token_file", "synonym", "kind", "seed", "out", "paper_settings", "rank",
                       "method"}


def seed_value(text: str) -> int:
    """argparse type for --seed: an integer 0..2**64-1."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..2**64-1; use a smaller seed, e.g. 0")
    return seed


def check_device(name: str | None) -> None:
    """Refuse a --device this torch cannot use, before the model loads."""
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device torch knows: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) has no CUDA support or sees no GPU; "
                             "install a CUDA build of torch, or leave --device out to run on the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible (cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available here; leave --device out to use the CPU")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: only cpu, cuda and mps are supported")


def check_token_name_option(name: str) -> None:
    """learn-token's --name is the token's name in prompts, not a file."""
    if name.strip().lower().endswith(".safetensors") or "/" in name or "\\" in name:
        raise ValueError(f"--name {name}: give the token's name as you will write it in prompts, e.g. <my-cat>; "
                         "the file it is saved to goes in --out")


def check_token_file_option(path: str | None) -> None:
    """erase's and generate's --token-file is the file learn-token wrote, not a token name."""
    if path is None:
        return
    file = Path(path)
    if file.is_file():
        return
    if file.suffix.lower() != ".safetensors":
        raise ValueError(f"--token-file {path}: give the .safetensors file learn-token wrote (its --out), e.g. "
                         "my-cat.safetensors, not the token's name (the name is read from the file)")
    raise ValueError(f"--token-file {path}: no such file")


def check_generate_options(strength: float, sample_steps: int) -> None:
    if not math.isfinite(strength):
        raise ValueError(f"--strength {strength}: give a finite number, e.g. 1.0 (0 = no effect)")
    if sample_steps < 1:
        raise ValueError(f"--sample-steps {sample_steps}: give 1 or more sampling steps (default 25)")


def paper_settings_conflicts(args: argparse.Namespace, defaults: dict) -> list[str]:
    """The options given with --paper-settings that its fixed recipe would ignore (as --flag names)."""
    given = {dest: value for dest, value in vars(args).items() if dest not in PAPER_SETTINGS_KEEP}
    return sorted("--" + dest.replace("_", "-") for dest, value in given.items() if value != defaults.get(dest))


def check_paper_settings(args: argparse.Namespace, defaults: dict) -> None:
    conflicts = paper_settings_conflicts(args, defaults)
    if conflicts:
        raise ValueError(f"--paper-settings fixes the method, targets, steps, learning rate, batch size and loss "
                         f"weights, so it would ignore {', '.join(conflicts)}: drop those options, or drop "
                         "--paper-settings and set everything yourself")


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable_folder(folder: Path, option: str = "--out") -> None:
    """The folder (or, when it does not exist yet, the one it will be made in) must take new files."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ValueError(f"{option}: {existing} is a file, not a folder: choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"{option}: cannot write in {existing} ({error.strerror}): choose a folder you can "
                         "write to") from None


def check_output(path: str, force: bool, suffix: str | None = None, option: str = "--out") -> Path:
    """Refuse a bad output path before any model loads or training starts, not after."""
    path = Path(path)
    if suffix and path.suffix != suffix:
        raise ValueError(f"{option} {path}: the file name must end in {suffix} (lower case, as hosts list files)")
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file name inside it, e.g. {path / ('out' + (suffix or '.png'))}")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists: choose another {option} or pass --force")
    check_writable_folder(path.parent, option)
    return path
