"""Compact QAT trainer for ternary DiTs: `python -m terdit.train`.

IDDPM objective (eps MSE + VB for the learned-range variance), uniform timesteps, class dropout
for classifier-free guidance, AdamW, gradient clipping, EMA, periodic resumable checkpoints.
One GPU or CPU by default; under `torchrun` (WORLD_SIZE > 1) DDP, or FSDP with
`--strategy fsdp`. Every random draw of a step (data order, timesteps, noise, dropped labels) is
a function of (seed, step) and of the sample's position in the global batch, so a resume
continues bit-identically and N ranks train the same model as one.

Output layout (OUT = --out):
  OUT/checkpoints/step_XXXXXXX/{model,ema}/     our checkpoint dirs (latent weights)
  OUT/checkpoints/step_XXXXXXX/train_state.safetensors + train_state.json
  OUT/final/                                    the EMA model (packed for ternary by default;
                                                --final-from live: the last step's weights)
  OUT/log.jsonl, OUT/loss.png, OUT/samples/step_XXXXXXX.png
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, TerDiTConfig
from .data import DATASETS, ArrayDataset, _mix, batch_indices, load_dataset
from .diffusion import GaussianDiffusion, sample_images
from .io_utils import atomic_write, atomic_write_text
from .model import TerDiT

STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
FINAL_WEIGHTS = ("packed", "latent")
FINAL_FROM = ("ema", "live")
LR_SCHEDULES = ("constant", "cosine")
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass(frozen=True)
class TrainConfig:
    """Every training default lives here; the CLI only maps flags onto these fields."""

    out: str = "runs/terdit"
    model: str = "TerDiT-demo"
    model_config: Optional[str] = None     # JSON file of TerDiTConfig fields (overrides model)
    fp: bool = False                       # train the same architecture in full precision
    init_from: Optional[str] = None        # fp checkpoint to start ternary QAT from
    data: str = "fashion-mnist"
    data_path: Optional[str] = None
    steps: int = 10_000
    global_batch: int = 64
    lr: float = 5e-4                       # TerDiT's learning rate (peak of the schedule)
    lr_schedule: str = "cosine"            # constant | cosine (decays to min_lr_ratio * lr)
    warmup_steps: Optional[int] = None     # linear warm-up; None: min(500, steps // 10)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    ema_decay: float = 0.9999              # the decay the EMA warms up to
    ema_warmup: bool = True                # decay of update n: min(ema_decay, (1 + n) / (10 + n))
    class_dropout: float = 0.1
    num_timesteps: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    sample_every: int = 0                  # 0: no preview grids
    sample_steps: int = 50                 # DDIM steps of the previews
    sample_cfg: float = 1.0
    final_weights: str = "packed"
    final_from: str = "ema"                # which weights OUT/final holds
    strategy: str = "ddp"
    precision: str = "auto"                # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    threads: int = 0                       # torch CPU threads (0: leave torch's default)
    compile: bool = False                  # torch.compile the training forward
    resume: Optional[str] = None           # "latest" or a checkpoints/step_XXXXXXX directory
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, choices in (("strategy", STRATEGIES), ("precision", PRECISIONS),
                              ("device", DEVICES), ("final_weights", FINAL_WEIGHTS),
                              ("final_from", FINAL_FROM), ("lr_schedule", LR_SCHEDULES),
                              ("data", DATASETS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is not one of "
                                 f"{choices}")
        for name in ("steps", "global_batch", "log_every", "ckpt_every", "num_timesteps",
                     "sample_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be positive")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} must be in "
                             f"[0, steps={self.steps}]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"TrainConfig.class_dropout={self.class_dropout} must be in [0, 1)")

    @property
    def warmup(self) -> int:
        return min(500, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr`, then
        constant or a cosine decay to `min_lr_ratio * lr` at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup - 1)
        progress = min(1.0, (step - self.warmup) / span)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def ema_decay_at(self, step: int) -> float:
        """EMA decay of the update after optimizer step `step` (0-based). The warm-up keeps a
        short run from ending with an EMA that is still mostly the random initialisation."""
        if not self.ema_warmup:
            return self.ema_decay
        return min(self.ema_decay, (1.0 + step) / (10.0 + step))

    def ema_init_weight(self, steps: Optional[int] = None) -> float:
        """The share of the initial weights left in the EMA after `steps` updates."""
        weight = 1.0
        for step in range(self.steps if steps is None else steps):
            weight *= self.ema_decay_at(step)
            if weight < 1e-9:
                break
        return weight

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- distributed plumbing ------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(tc: TrainConfig) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    want_cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    if want_cuda:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", rank=rank, world_size=world)
    if tc.global_batch % world:
        raise ValueError(f"--global-batch {tc.global_batch} must be divisible by the number of "
                         f"ranks ({world})")
    return Dist(rank, world, local, device)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _full(t: Tensor) -> Tensor:
    """The full tensor of a (possibly FSDP-sharded DTensor) parameter or state."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


# ---- model construction ------------------------------------------------------------------------

def model_config(tc: TrainConfig, dataset: ArrayDataset) -> TerDiTConfig:
    """The model config from --model-config (JSON) or --model, checked against the data."""
    if tc.model_config:
        cfg = TerDiTConfig.load(tc.model_config)
    else:
        cfg = TerDiTConfig.from_name(tc.model)
    cfg = cfg.replace(ternary=not tc.fp, class_dropout_prob=tc.class_dropout)
    c, h, w = dataset.sample_shape
    if (c, h, w) != (cfg.in_channels, cfg.input_size, cfg.input_size):
        raise ValueError(f"{dataset.name} holds samples of shape {(c, h, w)} but the model takes "
                         f"({cfg.in_channels}, {cfg.input_size}, {cfg.input_size}); choose a "
                         f"matching --model / --model-config")
    if dataset.num_classes > cfg.num_classes:
        raise ValueError(f"{dataset.name} has {dataset.num_classes} classes but the model only "
                         f"{cfg.num_classes}")
    return cfg


def build_model(tc: TrainConfig, cfg: TerDiTConfig) -> TerDiT:
    torch.manual_seed(tc.seed)
    model = TerDiT(cfg)
    if tc.init_from:
        init_from_fp(model, tc.init_from)
    return model


@torch.no_grad()
def init_from_fp(model: TerDiT, path: str | Path) -> None:
    """Copy full-precision weights into the model being trained: a latent ternary model (QAT
    from fp weights; every alpha is reset to the absmean (gamma) of its copied latent weight)
    or a full-precision one (fp fine-tuning, e.g. the fp twin of a QAT run)."""
    src = load_checkpoint(path).model
    arch = dataclasses.replace(src.cfg, ternary=model.cfg.ternary, class_dropout_prob=0.1)
    if arch != dataclasses.replace(model.cfg, class_dropout_prob=0.1):
        raise ValueError(f"--init-from {path}: its config {src.cfg} does not match the model "
                         f"being trained {model.cfg}")
    if src.cfg.ternary:
        raise ValueError(f"--init-from {path}: expected a full-precision checkpoint "
                         f"(weights 'float'), got a ternary one")
    state = src.state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(".alphas")]
    if missing:
        raise ValueError(f"--init-from {path}: missing keys {missing[:5]}")
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()})
    for layer in model.ternary_layers():
        layer.reset_alpha()


# ---- EMA ---------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of the parameters (same sharding as the live parameters):
    ema = decay * ema + (1 - decay) * param after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {name: p.detach().clone().float()
                       for name, p in _unwrap(model).named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: Optional[float] = None) -> None:
        weight = 1.0 - (self.decay if decay is None else decay)
        for name, p in _unwrap(model).named_parameters():
            self.params[name].lerp_(p.detach().float(), weight)

    def full_state(self) -> dict[str, Tensor]:
        return {name: _full(t).detach().cpu() for name, t in self.params.items()}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, Tensor]) -> None:
        for name, t in self.params.items():
            src = state[name]
            if hasattr(t, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor
                src = distribute_tensor(src.to(t.device), t.device_mesh, t.placements)
            t.copy_(src)


def model_from_params(cfg: TerDiTConfig, params: dict[str, Tensor]) -> TerDiT:
    """A latent TerDiT holding `params` (built on the meta device: no random init, no copy)."""
    from .checkpoint import model_from_state_dict
    return model_from_state_dict(cfg, params)


# ---- the step ------------------------------------------------------------------------------------

def step_draws(tc: TrainConfig, step: int, shape: Sequence[int], null_class: int,
               labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Timesteps, noise and CFG-dropped labels of the global batch of `step` (CPU, from a
    generator seeded by (seed, step) only)."""
    g = torch.Generator().manual_seed(_mix(tc.seed, step, 0xD1FF))
    b = shape[0]
    t = torch.randint(0, tc.num_timesteps, (b,), generator=g)
    noise = torch.randn(tuple(shape), generator=g)
    drop = torch.rand(b, generator=g) < tc.class_dropout
    return t, noise, torch.where(drop, torch.full_like(labels, null_class), labels)


def _call(model: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    return model(x, t, y)


def _autocast(tc: TrainConfig, device: torch.device):
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---- checkpoints --------------------------------------------------------------------------------

def _rng_state() -> tuple[dict[str, Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy.keys"].numpy().view(np.uint32), pos, has_gauss,
                         cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _optimizer_full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def save_training_checkpoint(out: Path, step: int, model: nn.Module, ema: EMA,
                             opt: torch.optim.Optimizer, tc: TrainConfig, cfg: TerDiTConfig,
                             d: Dist, extra: dict) -> Optional[Path]:
    """OUT/checkpoints/step_XXXXXXX/ with {model,ema}/ checkpoint dirs and the train state.
    Collective under FSDP (every rank must call it); rank 0 writes."""
    from safetensors.torch import save_file

    params = {name: _full(p).detach().cpu() for name, p in _unwrap(model).named_parameters()}
    osd = _optimizer_full_state(model, opt)
    ema_params = ema.full_state()
    if not d.main:
        return None
    path = out / "checkpoints" / f"step_{step:07d}"
    tensors, rng_meta = _rng_state()
    groups = []
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{fqn}.{key}"] = torch.as_tensor(_full(value)).detach().cpu().clone()
    for group in osd["param_groups"]:
        groups.append(dict(group))
    meta = {"step": step, "train_config": tc.to_dict(), "model_config": cfg.to_dict(),
            "optimizer": {"param_groups": groups}, "rng": rng_meta, **extra}
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_checkpoint(model_from_params(cfg, params), tmp / "model",
                    metadata={"step": step, "role": "live"})
    save_checkpoint(model_from_params(cfg, ema_params), tmp / "ema",
                    metadata={"step": step, "role": "ema", "ema_decay": tc.ema_decay})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if path.exists():
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)
    atomic_write_text(out / "checkpoints" / "latest", path.name + "\n")
    return path


def find_resume(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
    else:
        pointer = out / "checkpoints" / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"--resume latest: {pointer} not found (no checkpoint was "
                                    f"written in {out}); start without --resume")
        path = out / "checkpoints" / pointer.read_text().strip()
    for need in (STATE_JSON, STATE_TENSORS, "model", "ema"):
        if not (path / need).exists():
            raise FileNotFoundError(f"--resume {resume}: {path / need} is missing; pass a "
                                    f"checkpoints/step_XXXXXXX directory")
    return path


def load_training_checkpoint(path: Path, model: nn.Module, ema: EMA,
                             opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    meta = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    live = load_checkpoint(path / "model").model.state_dict()
    inner = _unwrap(model)
    with torch.no_grad():
        for name, p in inner.named_parameters():
            src = live[name]
            if hasattr(p, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor
                src = distribute_tensor(src.to(p.device), p.device_mesh, p.placements)
            p.copy_(src)
    ema.load_full_state(dict(load_checkpoint(path / "ema").model.named_parameters()))
    state: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            fqn, _, leaf = key[len("optim."):].rpartition(".")
            state.setdefault(fqn, {})[leaf] = value
    osd = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))
    _set_rng_state(tensors, meta["rng"])
    return meta


# ---- logging and plots ---------------------------------------------------------------------------

def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(runs: dict[str, Path], out: Path, smooth: int = 20,
                title: str = "training loss (mse + vb)") -> Path:
    """One loss curve per run (label -> log.jsonl), moving-average smoothed, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, log in runs.items():
        rows = [r for r in read_log(Path(log)) if "loss" in r]
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        ax.plot(steps, loss, alpha=0.25, lw=0.8)
        k = max(1, min(smooth, len(loss)))
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"),
                color=ax.lines[-1].get_color(), label=label, lw=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


def save_image_grid(images: Tensor, path: Path, nrow: int,
                    row_labels: Optional[Sequence[str]] = None, scale: int = 2) -> Path:
    """Images (N, C, H, W) in [-1, 1] -> a PNG grid with nrow images per row and an optional
    label to the left of each row."""
    from PIL import Image, ImageDraw

    from .data import to_uint8
    x = to_uint8(images).numpy()                      # (N, H, W, C)
    if x.shape[-1] not in (1, 3):                     # latents: show the first channel(s)
        x = x[..., :3] if x.shape[-1] > 3 else x[..., :1]
    n, h, w, c = x.shape
    rows = math.ceil(n / nrow)
    pad = 2
    label_w = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    grid = np.full((rows * (h * scale + pad) + pad, label_w + nrow * (w * scale + pad) + pad, 3),
                   255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        tile = np.repeat(np.repeat(x[i], scale, 0), scale, 1)
        if c == 1:
            tile = np.repeat(tile, 3, axis=2)
        y0 = pad + r * (h * scale + pad)
        x0 = label_w + pad + col * (w * scale + pad)
        grid[y0:y0 + h * scale, x0:x0 + w * scale] = tile
    img = Image.fromarray(grid)
    if row_labels:
        draw = ImageDraw.Draw(img)
        for r, text in enumerate(row_labels[:rows]):
            draw.text((4, pad + r * (h * scale + pad) + h * scale // 2 - 5), text, fill=(0, 0, 0))
    atomic_write(path, lambda p: img.save(p, format="PNG"))
    return path


# ---- training ------------------------------------------------------------------------------------

def _wrap(model: TerDiT, tc: TrainConfig, d: Dist) -> nn.Module:
    if d.world == 1:
        return model
    if tc.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        return fully_shard(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def train(tc: TrainConfig, dataset: Optional[ArrayDataset] = None) -> Path:
    """Train per `tc`; returns OUT/final. `dataset` overrides --data (tests pass one)."""
    if tc.threads:
        torch.set_num_threads(tc.threads)
    d = setup_distributed(tc)
    out = Path(tc.out)
    if dataset is None:
        dataset = load_dataset(tc.data, tc.data_path, image_size=_image_size(tc),
                               channels=_channels(tc))
    cfg = model_config(tc, dataset)
    stale = tc.ema_init_weight()
    if d.main and tc.final_from == "ema" and stale > 0.01:
        print(f"warning: after {tc.steps} steps the EMA (decay {tc.ema_decay}"
              f"{', warm-up' if tc.ema_warmup else ', no warm-up'}) still holds {stale:.0%} of "
              f"the random initialisation, so OUT/final will sample noise; lower --ema-decay, "
              f"keep the EMA warm-up, train longer or pass --final-from live", file=sys.stderr)
    resume_path = find_resume(out, tc.resume) if tc.resume else None
    if d.main and resume_path is None and (out / "checkpoints").exists():
        if not tc.overwrite:
            raise FileExistsError(f"{out} already holds checkpoints; pass --resume latest to "
                                  f"continue or --overwrite to start over")
        import shutil
        shutil.rmtree(out / "checkpoints")
    model = build_model(tc, cfg).to(d.device)
    model.train()
    ema = EMA(model, tc.ema_decay)
    wrapped = _wrap(model, tc, d)
    if tc.strategy == "fsdp" and d.world > 1:
        ema = EMA(wrapped, tc.ema_decay)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=tc.lr_at(0), weight_decay=tc.weight_decay)
    forward = torch.compile(wrapped) if tc.compile else wrapped
    diffusion = GaussianDiffusion.create(None, tc.num_timesteps, learn_sigma=cfg.learn_sigma)

    start = 0
    if resume_path is not None:
        meta = load_training_checkpoint(resume_path, wrapped, ema, opt)
        start = int(meta["step"])
    log_path = out / "log.jsonl"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json",
                          json.dumps({"train_config": tc.to_dict(), "model_config": cfg.to_dict(),
                                      "world_size": d.world}, indent=2, sort_keys=True) + "\n")
        kept = [r for r in read_log(log_path) if r.get("step", 0) <= start]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
    d.barrier()

    local = tc.global_batch // d.world
    lo, hi = d.rank * local, (d.rank + 1) * local
    shape = (tc.global_batch, *dataset.sample_shape)
    bar = None
    if d.main and tc.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True,
                   file=sys.stderr)
    window: dict[str, list[float]] = {}
    t_window = time.perf_counter()
    t_start = time.perf_counter()
    for step in range(start, tc.steps):
        idx = batch_indices(tc.seed, step, tc.global_batch, len(dataset))
        x, y = dataset.batch(idx)
        t, noise, y = step_draws(tc, step, shape, cfg.null_class, y)
        x, y, t, noise = (v[lo:hi].to(d.device) for v in (x, y, t, noise))

        with _autocast(tc, d.device):
            terms = diffusion.training_losses(functools.partial(_call, forward, y=y), x, t, noise)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), tc.grad_clip)
        lr = tc.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ema.update(wrapped, tc.ema_decay_at(step))

        names = [k for k in ("loss", "mse", "vb") if k in terms] + ["grad_norm"]
        stats = torch.stack([terms[k].detach().float().mean() for k in names[:-1]]
                            + [_full(grad_norm).detach().float()])
        if d.world > 1:
            dist.all_reduce(stats)
            stats /= d.world
        for k, v in zip(names, stats.tolist(), strict=True):
            window.setdefault(k, []).append(v)
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{window['loss'][-1]:.4f}")
        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            row = {"step": done, **{k: float(np.mean(v)) for k, v in window.items()},
                   "lr": lr, "it_s": len(window["loss"]) / max(now - t_window, 1e-9),
                   "elapsed_s": now - t_start}
            window, t_window = {}, now
            if d.main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if tc.sample_every and done % tc.sample_every == 0:
            ema_params = ema.full_state()          # collective under FSDP: every rank calls it
            if d.main:
                preview(model_from_params(cfg, ema_params).to(d.device), tc, dataset,
                        out / "samples" / f"step_{done:07d}.png")
        if done % tc.ckpt_every == 0 or done == tc.steps:
            save_training_checkpoint(out, done, wrapped, ema, opt, tc, cfg, d,
                                     {"elapsed_s": time.perf_counter() - t_start})
            if d.main:
                plot_losses({"ternary" if cfg.ternary else "fp": log_path}, out / "loss.png")
            d.barrier()
    if bar is not None:
        bar.close()

    final = out / "final"
    if tc.final_from == "ema":
        final_params = ema.full_state()
    else:
        final_params = {n: _full(p).detach().cpu() for n, p in _unwrap(wrapped).named_parameters()}
    if d.main:
        final_model = model_from_params(cfg, final_params)
        if cfg.ternary and tc.final_weights == "packed":
            from .ternary import pack_model_
            pack_model_(final_model)
        meta = {"step": tc.steps, "role": tc.final_from, "train_config": tc.to_dict()}
        from .data import class_names
        names = list(class_names(tc.data))
        if names:
            meta["class_names"] = names  # the runtime captions its grids with them
        if tc.final_from == "ema":
            meta["ema_decay"] = tc.ema_decay
        save_checkpoint(final_model, final, overwrite=True, metadata=meta)
    d.barrier()
    return final


@torch.no_grad()
def preview(model: TerDiT, tc: TrainConfig, dataset: ArrayDataset, path: Path,
            per_class: int = 8) -> Path:
    """A grid of samples, one row per class (at most 10 rows), from a fixed generator (the
    training draws come from their own generators, so previews do not change training)."""
    device = next(model.parameters()).device
    rows = min(dataset.num_classes, 10)
    labels = torch.arange(rows).repeat_interleave(per_class)
    g = torch.Generator(device=device).manual_seed(tc.seed)
    x = sample_images(model, labels, steps=tc.sample_steps, sampler="ddim",
                      cfg_scale=tc.sample_cfg, generator=g)
    return save_image_grid(x.clamp(-1, 1).cpu(), path, per_class,
                           [dataset.classes[i] for i in range(rows)])


def _image_size(tc: TrainConfig) -> int:
    if tc.model_config:
        return TerDiTConfig.load(tc.model_config).input_size
    return TerDiTConfig.from_name(tc.model).input_size


def _channels(tc: TrainConfig) -> int:
    if tc.model_config:
        return TerDiTConfig.load(tc.model_config).in_channels
    return TerDiTConfig.from_name(tc.model).in_channels


# ---- CLI ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m terdit.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--model", default=d.model, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--model-config", default=d.model_config,
                   help="JSON file of TerDiTConfig fields (instead of --model)")
    p.add_argument("--fp", action="store_true", help="train the same architecture in full "
                                                     "precision")
    p.add_argument("--init-from", default=d.init_from, metavar="CKPT",
                   help="start ternary QAT from a full-precision checkpoint")
    p.add_argument("--data", default=d.data, choices=DATASETS)
    p.add_argument("--data-path", default=d.data_path,
                   help="dataset directory / file (default: the dataset's standard location)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--global-batch", type=int, default=d.global_batch,
                   help="samples per step over all ranks")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES,
                   help="after the warm-up: constant, or a cosine decay to --min-lr-ratio x lr")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up (default: min(500, steps / 10))")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="final learning rate of the cosine schedule, as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="EMA decay (reached gradually with the warm-up)")
    p.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                   help="use --ema-decay from the first step (short runs then sample noise)")
    p.add_argument("--class-dropout", type=float, default=d.class_dropout,
                   help="probability of replacing a label by the null class (CFG)")
    p.add_argument("--num-timesteps", type=int, default=d.num_timesteps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--sample-every", type=int, default=d.sample_every,
                   help="write an EMA sample grid every N steps (0: never)")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps of the "
                                                                            "previews")
    p.add_argument("--sample-cfg", type=float, default=d.sample_cfg,
                   help="guidance scale of the previews")
    p.add_argument("--final-weights", default=d.final_weights, choices=FINAL_WEIGHTS,
                   help="form of the ternary model in OUT/final")
    p.add_argument("--final-from", default=d.final_from, choices=FINAL_FROM,
                   help="OUT/final holds the EMA or the live (last-step) weights")
    p.add_argument("--strategy", default=d.strategy, choices=STRATEGIES,
                   help="multi-rank strategy under torchrun")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    p.add_argument("--device", default=d.device, choices=DEVICES)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (faster after a one-off compile)")
    p.add_argument("--resume", default=d.resume, metavar="latest|DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that already holds checkpoints")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tc = TrainConfig(**vars(args))
        final = train(tc)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final EMA model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
