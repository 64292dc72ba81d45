"""Sample-quality metrics: `python -m terdit.evaluate {metrics,grid,train-classifier,plot-losses}`.

- FID (terdit.evaluate.fid) between generated samples and a reference set:
  `fashion-mnist:train|test`, an ADM-style `.npz` (arr_0 uint8 NHWC) or a folder of images;
  reference features are cached under a key of the set's content.
- Class accuracy of generated samples under the small classifier of
  terdit.evaluate.classifier.

Samples come from a model (a checkpoint or an export directory), drawn by the runtime's sampler
(terdit_common.sampling, through the same PyTorch graph as `python -m runtime sample --backend
torch`, with the same flags, defaults and per-image noise: image i of `--num-images N` here is
image i of `runtime sample --num N` there), or from an existing image set (`--samples`, e.g. the
`samples.npz` a runtime run wrote).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from terdit_common.cli import (RESTART, add_sampling_args, given_sampling_flags, run_cli,
                               sample_options)
from terdit_common.errors import UserError
from terdit_common.files import atomic_write_text, check_disjoint
from terdit_common.images import from_uint8, write_grid, write_npz
from terdit_common.inputs import input_file
from terdit_common.limits import (MAX_BATCH, MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_IMAGES, MAX_SEED,
                                  MAX_SMOOTH, MAX_WIDTH, check_count, check_threads)

from ..inference import sample_images
from ..train.data import load_dataset
from ..train.plots import plot_losses, read_log
from .classifier import (ClassifierConfig, classifier_accuracy, load_classifier, save_classifier,
                         train_classifier)
from .fid import (DATASET_SETS, INCEPTION_FILE, InceptionFeatures, cache_dir, fid_from_features,
                  load_image_set, reference_features)

FASHION_MNIST_SIZE = 28                # the smallest --image-size (the sets are padded to it)


def _load_model(path: str):
    from ..checkpoint import load_checkpoint
    if Path(path).exists() and not Path(path).is_dir():
        input_file(path, "--model", "pass a checkpoint or an export directory")
    loaded = load_checkpoint(path, packed=True)
    return loaded.model.eval(), loaded.metadata


def balanced_labels(n: int, num_classes: int) -> list[int]:
    """Labels 0, 1, ..., C-1, 0, 1, ... (the runtime's default for --num without --classes)."""
    return [i % num_classes for i in range(n)]


def generate(args, labels_fn=balanced_labels) -> tuple[np.ndarray, np.ndarray, dict]:
    """Samples of --model with the sampling flags: uint8 images, labels, and their settings."""
    n = 1000 if args.num_images is None else args.num_images
    check_count("--num-images", n, 1, MAX_IMAGES, "images")
    options = sample_options(args)
    model, metadata = _load_model(args.model)
    labels = labels_fn(n, model.cfg.num_classes)
    images = sample_images(model, labels, options, progress=args.progress, metadata=metadata)
    return images, np.asarray(labels, np.int64), {
        "model": args.model, **options.result_settings(), "num_images": len(labels)}


def evaluate_images(images: np.ndarray, labels: Optional[np.ndarray], *, feature_fn=None,
                    ref_features: Optional[np.ndarray] = None, classifier=None) -> dict:
    """FID (if feature_fn and ref_features) and class accuracy (if classifier and labels)."""
    result: dict = {"num_samples": int(images.shape[0])}
    if feature_fn is not None and ref_features is not None:
        result["fid"] = fid_from_features(feature_fn(images), ref_features)
        result["num_ref"] = int(ref_features.shape[0])
    if classifier is not None and labels is not None:
        x = torch.from_numpy(from_uint8(images))
        result["accuracy"] = classifier_accuracy(classifier, x, torch.from_numpy(labels))
    return result


def check_source_args(args) -> None:
    """Flags of `metrics` and `grid` that need no data, checked before any work: bounds, image
    sets that are neither a directory nor a regular file (a FIFO would block), outputs that are
    inputs, and sampling flags given with --samples (they would be ignored: refused)."""
    check_count("--image-size", args.image_size, FASHION_MNIST_SIZE, MAX_IMAGE_SIZE, "pixels")
    _image_set_arg(args.samples, "--samples")
    _image_set_arg(getattr(args, "ref", None), "--ref")
    classifier = getattr(args, "classifier", None)
    if classifier and Path(classifier).exists():
        input_file(classifier, "--classifier", "pass a classifier written by `python -m "
                                               "terdit.evaluate train-classifier`")
    if args.samples:
        given = given_sampling_flags(args) + (["--save-samples"] if getattr(
            args, "save_samples", None) else [])
        if given:
            raise UserError(f"{given[0]}: only used to sample from --model; the --samples "
                            f"images are already made: drop {given[0]}")
    inputs = {"--samples": args.samples, "--ref": getattr(args, "ref", None),
              "--classifier": getattr(args, "classifier", None)}
    inputs = {flag: path for flag, path in inputs.items() if path and Path(path).exists()}
    for flag in ("--out", "--save-samples"):
        out = getattr(args, flag[2:].replace("-", "_"), None)
        if out:
            check_disjoint(out, flag, inputs)


def _image_set_arg(spec: Optional[str], flag: str) -> None:
    if spec and Path(spec).exists() and not Path(spec).is_dir():
        input_file(spec, flag, "pass an .npz, a folder of images or a dataset set")


def cmd_metrics(args) -> dict:
    check_source_args(args)
    if args.ref != "none":
        check_count("--ref-count", args.ref_count, 2, MAX_IMAGES, "images (FID needs at least 2)")
    if args.num_images is not None:
        check_count("--num-images", args.num_images, 1, MAX_IMAGES, "images")
    t0 = time.perf_counter()
    if args.samples:
        images, labels, _ = load_image_set(args.samples, args.num_images, args.image_size,
                                           args.data_path)
        source = {"samples": args.samples}
    else:
        images, labels, source = generate(args)
        if args.save_samples:
            write_npz(args.save_samples, images, labels)
    t_gen = time.perf_counter() - t0
    feature_fn = ref = None
    if args.ref != "none":
        nets: list = []

        def feature_fn(x: np.ndarray) -> np.ndarray:
            if not nets:                  # loaded once the reference set is known to be good
                nets.append(InceptionFeatures(batch_size=50))
            return nets[0](x, progress=args.progress)
        cache = None if args.ref_cache == "none" else Path(args.ref_cache or cache_dir())
        ref = reference_features(feature_fn, args.ref, args.ref_count, images.shape[1],
                                 args.data_path, cache, network=INCEPTION_FILE)
    classifier = load_classifier(args.classifier)[0] if args.classifier else None
    result = evaluate_images(images, labels, feature_fn=feature_fn, ref_features=ref,
                             classifier=classifier)
    result.update(source)
    result.update({"ref": args.ref, "generation_s": round(t_gen, 1),
                   "total_s": round(time.perf_counter() - t0, 1)})
    return result


def cmd_grid(args) -> dict:
    """One column per class, `--per-class` rows: the layout of the runtime's grid."""
    check_source_args(args)
    check_count("--per-class", args.per_class, 1, MAX_IMAGES, "images")
    if args.samples:
        all_images, all_labels, _ = load_image_set(args.samples, None, args.image_size,
                                                   args.data_path)
        if all_labels is None:
            raise UserError(f"{args.samples}: no labels (arr_1); a class grid needs them")
        counts = np.bincount(all_labels)
        short = np.flatnonzero(counts < args.per_class)
        if len(short):
            c = int(short[0])
            raise UserError(f"{args.samples}: class {c} has {int(counts[c])} samples, fewer "
                            f"than --per-class {args.per_class}")
        classes = len(counts)
        order = np.argsort(all_labels, kind="stable")      # each class's samples, in file order
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        picks = order[starts[:, None] + np.arange(args.per_class)[None, :]]    # (classes, rows)
        order = picks.T.reshape(-1)                          # row r holds sample r of each class
        images, labels, source = all_images[order], all_labels[order], {"samples": args.samples}
        names = None
    else:
        model, metadata = _load_model(args.model)
        classes = model.cfg.num_classes
        check_count("--per-class", args.per_class, 1, MAX_IMAGES // classes,
                    f"images ({classes} classes, at most {MAX_IMAGES} images)")
        args.num_images = classes * args.per_class
        images, labels, source = generate(args)
        names = metadata.get("class_names")
    names = names or [str(i) for i in range(classes)]
    write_grid(args.out, images, [names[v] for v in labels], ncols=classes)
    return {"grid": args.out, **source}


def cmd_train_classifier(args) -> dict:
    check_count("--epochs", args.epochs, 1, MAX_EPOCHS)
    check_count("--batch-size", args.batch_size, 1, MAX_BATCH)
    check_count("--width", args.width, 1, MAX_WIDTH)
    check_count("--seed", args.seed, 0, MAX_SEED)
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UserError(f"--lr {args.lr}: must be a finite number > 0")
    t0 = time.perf_counter()
    train = load_dataset("fashion-mnist", args.data_path, split="train")
    test = load_dataset("fashion-mnist", args.data_path, split="test")
    cc = ClassifierConfig(args.epochs, args.batch_size, args.lr, args.width, args.seed)
    model, acc = train_classifier(cc, train.data, train.labels, test.data, test.labels,
                                  train.num_classes, progress=args.progress)
    wall = time.perf_counter() - t0
    save_classifier(model, cc, Path(args.out), {"test_accuracy": acc, "dataset": "fashion-mnist",
                                                "wall_s": round(wall, 1)})
    return {"classifier": args.out, "test_accuracy": acc, "wall_s": round(wall, 1)}


def cmd_plot_losses(args) -> dict:
    check_count("--smooth", args.smooth, 1, MAX_SMOOTH, "log rows")
    runs = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep:
            raise UserError(f"--run {spec!r}: expected LABEL=PATH/log.jsonl")
        read_log(Path(path), "--run", missing_ok=False)       # refused before plotting
        runs[label] = Path(path)
    check_disjoint(args.out, "--out", {f"--run {label}=": p for label, p in runs.items()})
    plot_losses(runs, Path(args.out), smooth=args.smooth)
    return {"plot": args.out}



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m terdit.evaluate",
                                description="Sample-quality metrics for TerDiT models.")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    sub = p.add_subparsers(dest="command", required=True)

    def source(q, what: str) -> None:
        src = q.add_mutually_exclusive_group(required=True)
        src.add_argument("--model", help="checkpoint or export directory to sample from")
        src.add_argument("--samples", help=f"existing images to {what}: an ADM-style .npz "
                                           f"(e.g. a runtime run's samples.npz), a folder of "
                                           f"images, or {' / '.join(DATASET_SETS)}")
        q.add_argument("--image-size", type=int, default=32,
                       help="size the Fashion-MNIST sets are padded to (default: %(default)s)")
        q.add_argument("--data-path", help="Fashion-MNIST directory (default: the Debian "
                                           "package's)")
        q.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars")
        add_sampling_args(q.add_argument_group("sampling (with --model; as runtime sample)"))

    m = sub.add_parser("metrics", help="FID and class accuracy of samples")
    source(m, "evaluate")
    m.add_argument("--num-images", type=int, default=None,
                   help="images to generate (labels 0..C-1 cycled) or to take from --samples "
                        "(default: 1000 / all)")
    m.add_argument("--ref", default="fashion-mnist:test",
                   help=f"reference set for FID: {' / '.join(DATASET_SETS)}, an ADM .npz, a "
                        f"folder of images, or none (default: %(default)s)")
    m.add_argument("--ref-count", type=int, default=1000,
                   help="reference images (the first N of the set; default: %(default)s)")
    m.add_argument("--ref-cache", default=None,
                   help=f"directory of cached reference features, keyed by the set's content "
                        f"(default: {cache_dir()}; 'none' disables it)")
    m.add_argument("--classifier", help="classifier .safetensors for the class accuracy")
    m.add_argument("--save-samples", metavar="NPZ",
                   help="also write the generated samples as an ADM-style .npz")
    m.add_argument("--out", help="also write the metrics as JSON here")

    g = sub.add_parser("grid", help="a labelled grid: one column per class")
    source(g, "arrange")
    g.add_argument("--out", required=True, help="PNG to write")
    g.add_argument("--per-class", type=int, default=8, help="images per class (grid rows)")

    c = sub.add_parser("train-classifier", help="train the Fashion-MNIST classifier")
    cd = ClassifierConfig()
    c.add_argument("--out", required=True, help=".safetensors file to write")
    c.add_argument("--epochs", type=int, default=cd.epochs, help="(default: %(default)s)")
    c.add_argument("--batch-size", type=int, default=cd.batch_size, help="(default: %(default)s)")
    c.add_argument("--lr", type=float, default=cd.lr, help="peak learning rate (default: "
                                                           "%(default)s)")
    c.add_argument("--width", type=int, default=cd.width, help="channels of the first conv "
                                                               "(default: %(default)s)")
    c.add_argument("--seed", type=int, default=cd.seed, help="(default: %(default)s)")
    c.add_argument("--data-path", help="Fashion-MNIST directory")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    pl = sub.add_parser("plot-losses", help="loss curves of several runs on one plot")
    pl.add_argument("--run", action="append", required=True, metavar="LABEL=LOG",
                    help="a run's label and its log.jsonl (repeat for several runs)")
    pl.add_argument("--out", required=True, help="PNG to write")
    pl.add_argument("--smooth", type=int, default=20, help="moving-average window in log rows")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        check_threads(args.threads)
        if args.threads:
            torch.set_num_threads(args.threads)
        handlers = {"metrics": cmd_metrics, "grid": cmd_grid,
                    "train-classifier": cmd_train_classifier, "plot-losses": cmd_plot_losses}
        result = handlers[args.command](args)
        text = json.dumps(result, indent=2, sort_keys=True)
        if getattr(args, "out", None) and args.command == "metrics":
            atomic_write_text(args.out, text + "\n")
        print(text)
        return 0

    return run_cli(body, f"terdit.evaluate {args.command}", RESTART)

