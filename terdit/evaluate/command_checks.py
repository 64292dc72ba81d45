"""What a parsed `python -m terdit.evaluate` command reads and writes, and which of its flags act,
all checked by `check_command` before any work (docs/design.md section 9):

- bounds of every count the user gave, and input files that are not regular files (a FIFO
  would block the reader);
- `inert_flags`: a flag given that would have no effect for the subcommand and the source of
  its images is refused, naming it and why (every flag acts or is refused). Flags whose
  default would hide whether they were given default to None; `fill_defaults` then puts in
  `FLAG_DEFAULTS`, which --help shows;
- `command_files`: every input and every output of the command, listed in this one place; an
  output that is, contains or lies inside an input, two outputs at one path, and an output that
  is a directory or a symbolic link are refused.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from terdit_common.cli import given_sampling_flags
from terdit_common.errors import UserError
from terdit_common.files import check_disjoint, check_writable_dir
from terdit_common.inputs import input_file, npz_headers
from terdit_common.limits import (MAX_BATCH, MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_IMAGES, MAX_SEED,
                                  MAX_SMOOTH, MAX_WIDTH, check_count, check_threads)

from ..train.data import FASHION_MNIST_DIR
from .fid import DATASET_SETS, cache_dir

FASHION_MNIST_SIZE = 28                # the smallest --image-size (the sets are padded to it)
FLAG_DEFAULTS = {"threads": 0, "image_size": 32, "ref_count": 1000, "progress": True}
CLASSIFIER_FIX = "train one with `python -m terdit.evaluate train-classifier --out PATH`"
IMAGE_SET_FIX = "pass an .npz, a folder of images or a dataset set"


def check_command(args) -> None:
    """Every check that needs no data, in order: bounds, input kinds, the reference cache,
    flags that would have no effect, outputs against inputs; then the defaults."""
    _check_bounds(args)
    _check_input_kinds(args)
    cache = ref_cache_dir(args)
    if cache is not None:
        if cache.exists() and not cache.is_dir():
            raise UserError(f"--ref-cache {cache}: is not a directory; --ref-cache names a "
                            f"directory of cached reference features: pass a directory, or none "
                            f"to compute them without a cache")
        check_writable_dir(cache, "--ref-cache")
    inert = inert_flags(args)
    if inert:
        raise UserError(inert[0])
    check_files(args)
    fill_defaults(args)


def fill_defaults(args) -> None:
    for name, value in FLAG_DEFAULTS.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)


def computes_fid(args) -> bool:
    return args.command == "metrics" and args.ref != "none"


def image_sets(args) -> list[tuple[str, str]]:
    """(flag, spec) of the image sets the command reads (`--samples`, the `--ref` of FID)."""
    sets = [("--samples", args.samples)] if getattr(args, "samples", None) else []
    return sets + ([("--ref", args.ref)] if computes_fid(args) else [])


def ref_cache_dir(args) -> Optional[Path]:
    """The directory of cached reference features, None when FID is off or the cache is."""
    if not computes_fid(args) or args.ref_cache == "none":
        return None
    return Path(args.ref_cache) if args.ref_cache else cache_dir()


def parse_runs(specs: list[str]) -> dict[str, Path]:
    """plot-losses --run LABEL=PATH, one curve per label."""
    runs: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise UserError(f"--run {spec!r}: expected LABEL=PATH/log.jsonl")
        if label in runs:
            raise UserError(f"--run {spec}: the label {label!r} is already given to --run "
                            f"{label}={runs[label]}, and a label names one curve: give each "
                            f"run its own label")
        runs[label] = Path(path)
    return runs


# ---- bounds and input kinds -------------------------------------------------------------------

def _check_bounds(args) -> None:
    check_threads(args.threads)
    command = args.command
    if command in ("metrics", "grid") and args.image_size is not None:
        check_count("--image-size", args.image_size, FASHION_MNIST_SIZE, MAX_IMAGE_SIZE, "pixels")
    if command == "metrics":
        if args.ref_count is not None:
            check_count("--ref-count", args.ref_count, 2, MAX_IMAGES,
                        "images (FID needs at least 2)")
        if args.num_images is not None:
            check_count("--num-images", args.num_images, 1, MAX_IMAGES, "images")
    elif command == "grid":
        check_count("--per-class", args.per_class, 1, MAX_IMAGES, "images")
    elif command == "train-classifier":
        check_count("--epochs", args.epochs, 1, MAX_EPOCHS)
        check_count("--batch-size", args.batch_size, 1, MAX_BATCH)
        check_count("--width", args.width, 1, MAX_WIDTH)
        check_count("--seed", args.seed, 0, MAX_SEED)
        if not math.isfinite(args.lr) or args.lr <= 0:
            raise UserError(f"--lr {args.lr}: must be a finite number > 0")
    elif command == "plot-losses":
        check_count("--smooth", args.smooth, 1, MAX_SMOOTH, "log rows")


def _check_input_kinds(args) -> None:
    """Inputs that exist but are not what they should be, before anything reads them."""
    for flag, spec in image_sets(args):
        if spec not in DATASET_SETS and Path(spec).exists() and not Path(spec).is_dir():
            input_file(spec, flag, IMAGE_SET_FIX)
    model = getattr(args, "model", None)
    if model and Path(model).exists() and not Path(model).is_dir():
        input_file(model, "--model", "pass a checkpoint or an export directory")
    if getattr(args, "classifier", None):
        input_file(args.classifier, "--classifier", CLASSIFIER_FIX)


# ---- flags that would have no effect ----------------------------------------------------------

def inert_flags(args) -> list[str]:
    """A message for each flag given that would have no effect with this subcommand and
    source; `check_command` refuses the first."""
    command = args.command
    found: list[str] = []

    def inert(shown: str, why: str) -> None:
        found.append(f"{shown}: {why}: drop {shown.split()[0]}")

    if command in ("metrics", "grid"):
        _inert_source_flags(args, inert)
        model = args.model is not None
        classifier = command == "metrics" and args.classifier is not None
        uses_torch = model or computes_fid(args) or classifier
        how = f"{command} --samples" + (" with --ref none" if command == "metrics" else "")
        no_torch = how + (" and no --classifier" if command == "metrics" else "") + \
            " runs no torch work"
    else:
        uses_torch = command == "train-classifier"
        no_torch = f"{command} runs no torch work"
    # --no-progress is a display preference, accepted wherever it is offered
    if args.threads is not None and not uses_torch:
        inert(f"--threads {args.threads}", no_torch)
    return found


def _inert_source_flags(args, inert) -> None:
    """The flags of `metrics` and `grid` that act only with one source of images."""
    samples = args.samples
    if samples:
        extra = ["--save-samples"] if getattr(args, "save_samples", None) else []
        for flag in given_sampling_flags(args) + extra:
            inert(flag, "only used to sample from --model; the --samples images are already "
                        "made")
    sets = image_sets(args)
    if args.image_size is not None and samples not in DATASET_SETS:
        own = "the --samples images keep their own size" if samples else \
            "the --model samples have the model's size"
        ref = "; a --ref set is padded to the samples' size" if computes_fid(args) else ""
        inert(f"--image-size {args.image_size}", f"it sets the size a fashion-mnist --samples "
                                                 f"set is padded to, and {own}{ref}")
    if args.data_path is not None and not any(spec in DATASET_SETS for _, spec in sets):
        names = " and ".join(flag for flag, _ in sets)
        what = (f"{names} {'are' if len(sets) > 1 else 'is'} not a fashion-mnist set" if sets
                else "this command reads no image set (the images come from --model)")
        inert(f"--data-path {args.data_path}", f"it locates the Fashion-MNIST files, and {what}")
    if args.command != "metrics":
        return
    if not computes_fid(args):
        for flag, value in (("--ref-count", args.ref_count), ("--ref-cache", args.ref_cache)):
            if value is not None:
                inert(f"{flag} {value}", "only used for FID, and --ref none computes no FID")
    if args.classifier and samples and not _has_labels(samples):
        inert(f"--classifier {args.classifier}",
              "the --samples images have no labels (an .npz holds them in arr_1; a folder of "
              "images has none), so there is no class accuracy to compute")


def _has_labels(spec: str) -> bool:
    if spec in DATASET_SETS or not Path(spec).exists():
        return True                     # a dataset has labels; a missing file fails when read
    if Path(spec).is_dir():
        return False
    return "arr_1" in npz_headers(spec, "--samples", IMAGE_SET_FIX)


# ---- inputs and outputs -----------------------------------------------------------------------

def command_files(args) -> tuple[dict[str, str], dict[str, str]]:
    """({flag: path} of every input, {flag: path} of every output) of the command."""
    command = args.command
    inputs: dict[str, Optional[str | os.PathLike]] = {}
    outputs: dict[str, Optional[str]] = {"--out": getattr(args, "out", None)}
    if command in ("metrics", "grid"):
        inputs["--model"] = args.model
        for flag, spec in image_sets(args):
            if spec in DATASET_SETS:
                inputs["--data-path"] = args.data_path or FASHION_MNIST_DIR
            else:
                inputs[flag] = spec
    if command == "metrics":
        inputs["--ref-cache"] = ref_cache_dir(args)
        inputs["--classifier"] = args.classifier
        outputs["--save-samples"] = args.save_samples
    elif command == "train-classifier":
        inputs["--data-path"] = args.data_path or FASHION_MNIST_DIR
    elif command == "plot-losses":
        inputs.update({f"--run {label}=": path for label, path in parse_runs(args.run).items()})
    return ({flag: str(p) for flag, p in inputs.items() if p is not None},
            {flag: p for flag, p in outputs.items() if p is not None})


def check_files(args) -> None:
    """Each output is a file path of its own, outside every input: what we write never
    replaces or changes what we read, nor another output."""
    inputs, outputs = command_files(args)
    done: dict[str, str] = {}
    for flag, out in outputs.items():
        if os.path.islink(out):
            raise UserError(f"{flag} {out}: is a symbolic link; we never write through one: "
                            f"remove it or choose another {flag}")
        if os.path.isdir(out):
            raise UserError(f"{flag} {out}: is a directory; pass the path of the file to write")
        check_disjoint(out, flag, inputs)
        if os.path.lexists(out) and not args.overwrite:
            raise UserError(f"{flag} {out}: exists; pass --overwrite to replace it, or choose "
                            f"another {flag}")
        for other_flag, other in done.items():
            if os.path.realpath(out) == os.path.realpath(other):
                raise UserError(f"{flag} {out}: is also the {other_flag} output, and one would "
                                f"replace the other: choose another {flag}")
        done[flag] = out
