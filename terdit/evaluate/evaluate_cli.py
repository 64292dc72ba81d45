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

Every check that needs no data (bounds, flags that would have no effect, outputs against inputs)
is made first by terdit.evaluate.command_checks; each output is then written atomically while
holding its lock (terdit_common.files.file_output).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from terdit_common.cli import RESTART, add_sampling_args, run_cli, sample_options
from terdit_common.errors import UserError
from terdit_common.files import atomic_write_text
from terdit_common.images import from_uint8, write_grid, write_npz
from terdit_common.limits import MAX_IMAGES, check_count
from terdit_common.locks import file_output

from ..inference import sample_images
from ..train.data import load_dataset
from ..train.plots import plot_losses, read_log
from .classifier import (ClassifierConfig, check_classifier_input, classifier_accuracy,
                         load_classifier, save_classifier, train_classifier)
from .command_checks import (FLAG_DEFAULTS, check_command, command_files, computes_fid,
                             parse_runs, ref_cache_dir)
from .fid import (DATASET_SETS, INCEPTION_FILE, InceptionFeatures, cache_dir, fid_from_features,
                  load_image_set, reference_features)


def _load_model(path: str):
    from ..checkpoint import load_checkpoint
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


def cmd_metrics(args) -> dict:
    classifier = None
    if args.classifier:                   # a bad classifier is refused before any work
        classifier = load_classifier(args.classifier, "--classifier")[0]
    t0 = time.perf_counter()
    if args.samples:
        images, labels, _ = load_image_set(args.samples, args.num_images, args.image_size,
                                           args.data_path, "--samples", "--num-images")
        source = {"samples": args.samples}
    else:
        images, labels, source = generate(args)
        if args.save_samples:
            write_npz(args.save_samples, images, labels)
    if classifier is not None:
        check_classifier_input(classifier, images.shape, int(labels.max()),
                               f"--classifier {args.classifier}")
    t_gen = time.perf_counter() - t0
    feature_fn = ref = None
    if computes_fid(args):
        feature_fn = _inception(args.progress)
        ref = reference_features(feature_fn, args.ref, args.ref_count, images.shape[1],
                                 args.data_path, ref_cache_dir(args), network=INCEPTION_FILE,
                                 flag="--ref", count_flag="--ref-count")
    result = evaluate_images(images, labels, feature_fn=feature_fn, ref_features=ref,
                             classifier=classifier)
    result.update(source)
    result.update({"ref": args.ref, "generation_s": round(t_gen, 1),
                   "total_s": round(time.perf_counter() - t0, 1)})
    return result


def _inception(progress: bool):
    """Inception features, the network loaded on first use (once the reference set is known to
    be good)."""
    nets: list = []

    def features(x: np.ndarray) -> np.ndarray:
        if not nets:
            nets.append(InceptionFeatures(batch_size=50))
        return nets[0](x, progress=progress)
    return features


def cmd_grid(args) -> dict:
    """One column per class, `--per-class` rows: the layout of the runtime's grid."""
    if args.samples:
        all_images, all_labels, _ = load_image_set(args.samples, None, args.image_size,
                                                   args.data_path, "--samples")
        if all_labels is None:
            raise UserError(f"--samples {args.samples}: no labels (arr_1); a class grid needs "
                            f"them: pass an .npz with labels")
        counts = np.bincount(all_labels)
        short = np.flatnonzero(counts < args.per_class)
        if len(short):
            c = int(short[0])
            raise UserError(f"--samples {args.samples}: class {c} has {int(counts[c])} samples, "
                            f"fewer than --per-class {args.per_class}; pass a smaller --per-class")
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
    runs = parse_runs(args.run)
    for label, path in runs.items():                       # refused before plotting
        if not any("loss" in row for row in read_log(path, "--run", missing_ok=False)):
            raise UserError(f"--run {label}={path}: holds no row with a loss, so its curve "
                            f"would be missing; pass the log.jsonl of a run that has logged a "
                            f"loss, or drop this --run")
    plot_losses(runs, Path(args.out), smooth=args.smooth)
    return {"plot": args.out}


HANDLERS = {"metrics": cmd_metrics, "grid": cmd_grid, "train-classifier": cmd_train_classifier,
            "plot-losses": cmd_plot_losses}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m terdit.evaluate",
                                description="Sample-quality metrics for TerDiT models.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 0, torch's own; only where torch runs)")
    sub = p.add_subparsers(dest="command", required=True)

    def source(q, what: str) -> None:
        src = q.add_mutually_exclusive_group(required=True)
        src.add_argument("--model", help="checkpoint or export directory to sample from")
        src.add_argument("--samples", help=f"existing images to {what}: an ADM-style .npz "
                                           f"(e.g. a runtime run's samples.npz), a folder of "
                                           f"images, or {' / '.join(DATASET_SETS)}")
        q.add_argument("--image-size", type=int, default=None,
                       help=f"size a fashion-mnist --samples set is padded to (default: "
                            f"{FLAG_DEFAULTS['image_size']})")
        q.add_argument("--data-path", help="Fashion-MNIST directory, where --samples or --ref "
                                           "is a fashion-mnist set (default: the Debian "
                                           "package's)")
        q.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                       help="no progress bars")
        add_sampling_args(q.add_argument_group("sampling (with --model; as runtime sample)"))

    m = sub.add_parser("metrics", help="FID and class accuracy of samples")
    source(m, "evaluate")
    m.add_argument("--num-images", type=int, default=None,
                   help="images to generate (labels 0..C-1 cycled) or to take from --samples "
                        "(default: 1000 / all)")
    m.add_argument("--ref", default="fashion-mnist:test",
                   help=f"reference set for FID: {' / '.join(DATASET_SETS)}, an ADM .npz, a "
                        f"folder of images, or none; a fashion-mnist set is padded to the "
                        f"samples' size (default: %(default)s)")
    m.add_argument("--ref-count", type=int, default=None,
                   help=f"reference images (the first N of the set; default: "
                        f"{FLAG_DEFAULTS['ref_count']})")
    m.add_argument("--ref-cache", default=None,
                   help=f"directory of cached reference features, keyed by the set's content "
                        f"(default: {cache_dir()}; 'none' disables it)")
    m.add_argument("--classifier", help="classifier .safetensors for the class accuracy")
    m.add_argument("--save-samples", metavar="NPZ",
                   help="also write the generated samples as an ADM-style .npz")
    m.add_argument("--out", help="also write the metrics as JSON here")
    _overwrite(m)

    g = sub.add_parser("grid", help="a labelled grid: one column per class")
    source(g, "arrange")
    g.add_argument("--out", required=True, help="PNG to write")
    g.add_argument("--per-class", type=int, default=8, help="images per class (grid rows)")
    _overwrite(g)

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
    c.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    _overwrite(c)

    pl = sub.add_parser("plot-losses", help="loss curves of several runs on one plot")
    pl.add_argument("--run", action="append", required=True, metavar="LABEL=LOG",
                    help="a run's label and its log.jsonl (repeat for several runs)")
    pl.add_argument("--out", required=True, help="PNG to write")
    pl.add_argument("--smooth", type=int, default=20, help="moving-average window in log rows")
    _overwrite(pl)
    return p


def _overwrite(q) -> None:
    q.add_argument("--overwrite", action="store_true",
                   help="replace output files that exist (only regular files; without it an "
                        "existing output is refused)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        check_command(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        with contextlib.ExitStack() as outputs:      # each output's lock, held for the run
            for flag, path in command_files(args)[1].items():
                outputs.enter_context(file_output(path, flag))
            result = HANDLERS[args.command](args)
            text = json.dumps(result, indent=2, sort_keys=True)
            if args.command == "metrics" and args.out:
                atomic_write_text(args.out, text + "\n")
        print(text)
        return 0

    return run_cli(body, f"terdit.evaluate {args.command}", RESTART)
