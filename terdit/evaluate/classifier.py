"""The small Fashion-MNIST classifier behind the demo's class accuracy: a CNN on 32x32
model-space images, its training (Adam + one-cycle schedule, 2-pixel shift augmentation), and
safetensors I/O."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terdit_common.errors import UserError
from terdit_common.files import atomic_write
from terdit_common.limits import INT_BOUNDS, MAX_WIDTH, check_count

IMAGE_SIZE = 32                        # the side of the images the classifier takes


class SmallCNN(nn.Module):
    """A small Fashion-MNIST classifier on IMAGE_SIZE x IMAGE_SIZE model-space images in
    [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2))
        side = IMAGE_SIZE // 4                                 # after two 2x2 max-pools
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * w * side ** 2, 128),
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
    from tqdm.auto import tqdm
    # the bar is closed however the loop ends (an interrupt's message starts on its own line)
    with tqdm(total=steps, desc="classifier", file=sys.stderr, disable=not progress) as bar:
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
                bar.update(1)
                if progress:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
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
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cc.__dict__), "in_channels": str(model.features[0].in_channels),
            "num_classes": str(model.head[-1].out_features),
            **{k: json.dumps(v) for k, v in metadata.items()}}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_classifier(path: str | Path, flag: str = "") -> tuple[SmallCNN, dict]:
    """The classifier a `save_classifier` wrote, and its metadata; messages name `flag`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    where = f"{flag} {path}" if flag else f"classifier {path}"
    if not path.is_file():
        raise UserError(f"{where}: file not found; train one with `python -m terdit.evaluate "
                        f"train-classifier --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        cc = ClassifierConfig(**json.loads(meta["config"]))
        sizes = {"in_channels": int(meta["in_channels"]), "num_classes": int(meta["num_classes"])}
        for name, value in sizes.items():              # bounded before anything is allocated
            check_count(name, value, *INT_BOUNDS[name])
        check_count("width", cc.width, 1, MAX_WIDTH)
        model = SmallCNN(sizes["in_channels"], sizes["num_classes"], cc.width)
        model.load_state_dict(load_file(str(path)))
        info = {k: json.loads(v) for k, v in meta.items()
                if k not in ("config", "in_channels", "num_classes")}
    except Exception as err:  # noqa: BLE001 - any damage to the file is one message
        raise UserError(f"{where}: not a classifier written by `terdit.evaluate "
                        f"train-classifier` ({type(err).__name__}: {str(err)[:120]}); pass "
                        f"one, or train one with `python -m terdit.evaluate train-classifier "
                        f"--out PATH`") from None
    return model.eval(), info


def check_classifier_input(model: SmallCNN, shape: tuple[int, ...], max_label: int,
                           where: str) -> None:
    """UserError (naming `where`) unless images of `shape` (N, H, W, C) with labels up to
    `max_label` are what `model` scores."""
    channels, classes = model.features[0].in_channels, model.head[-1].out_features
    _, h, w, c = shape
    if (h, w, c) != (IMAGE_SIZE, IMAGE_SIZE, channels):
        raise UserError(f"{where}: scores {IMAGE_SIZE}x{IMAGE_SIZE} images of {channels} "
                        f"channel(s), the samples are {h}x{w} with {c}; pass samples of that "
                        f"size or a classifier trained on images like them")
    if max_label >= classes:
        raise UserError(f"{where}: scores {classes} classes, the samples hold label "
                        f"{max_label}; pass a classifier trained on the samples' classes")
