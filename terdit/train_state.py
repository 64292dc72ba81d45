"""The trainer's resumable state: the EMA of the parameters, RNG states, and training
checkpoints (OUT/checkpoints/step_XXXXXXX/ with {model,ema}/ checkpoint directories, the
optimizer state and the RNG states), written so that a kill at any point loses nothing."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from terdit_common.errors import UserError
from terdit_common.files import atomic_write_text

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TerDiTConfig
from .distributed import Dist, full_tensor, unwrap
from .model import TerDiT

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


class EMA:
    """Exponential moving average of the parameters (same sharding as the live parameters):
    ema = decay * ema + (1 - decay) * param after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {name: p.detach().clone().float()
                       for name, p in unwrap(model).named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: Optional[float] = None) -> None:
        weight = 1.0 - (self.decay if decay is None else decay)
        for name, p in unwrap(model).named_parameters():
            self.params[name].lerp_(p.detach().float(), weight)

    def full_state(self) -> dict[str, Tensor]:
        return {name: full_tensor(t).detach().cpu() for name, t in self.params.items()}

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
    from .loading import model_from_state_dict
    return model_from_state_dict(cfg, params)


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
                             opt: torch.optim.Optimizer, tc, cfg: TerDiTConfig,
                             d: Dist, extra: dict) -> Optional[Path]:
    """OUT/checkpoints/step_XXXXXXX/ with {model,ema}/ checkpoint dirs and the train state.
    Collective under FSDP (every rank must call it); rank 0 writes."""
    from safetensors.torch import save_file

    params = {name: full_tensor(p).detach().cpu() for name, p in unwrap(model).named_parameters()}
    osd = _optimizer_full_state(model, opt)
    ema_params = ema.full_state()
    if not d.main:
        return None
    path = out / "checkpoints" / f"step_{step:07d}"
    tensors, rng_meta = _rng_state()
    groups = []
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{fqn}.{key}"] = torch.as_tensor(full_tensor(value)).detach().cpu().clone()
    for group in osd["param_groups"]:
        groups.append(dict(group))
    meta = {"step": step, "train_config": tc.to_dict(), "model_config": cfg.to_dict(),
            "optimizer": {"param_groups": groups}, "rng": rng_meta, **extra}
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_checkpoint(model_from_params(cfg, params), tmp / "model",
                    metadata={"step": step, "role": "live"})
    save_checkpoint(model_from_params(cfg, ema_params), tmp / "ema",
                    metadata={"step": step, "role": "ema", "ema_decay": tc.ema_decay})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    # Re-saving a step that exists (after resuming from an earlier one): the old directory is
    # moved aside, not deleted, until the new one is in place, so a kill here loses neither.
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    atomic_write_text(out / "checkpoints" / "latest", path.name + "\n")
    if old.exists():
        shutil.rmtree(old)
    return path


def recover_interrupted_save(out: Path) -> None:
    """A kill between moving an existing step directory aside and renaming its replacement into
    place leaves `.step_X.old` and no `step_X`: put the old copy back (the replacement, a
    `.partial`, is then removed with the other temporaries), and point `latest` at the newest
    complete checkpoint."""
    ckpts = out / "checkpoints"
    if not ckpts.is_dir():
        return
    for old in ckpts.glob(".step_*.old"):
        path = ckpts / old.name[1:-len(".old")]
        if not path.exists() and is_complete(old):
            os.replace(old, path)
    newest = latest_checkpoint(out)
    pointer = ckpts / "latest"
    if newest is not None and (not pointer.is_file() or pointer.read_text().strip() != newest.name):
        atomic_write_text(pointer, newest.name + "\n")


def is_complete(path: Path) -> bool:
    return all((path / need).exists() for need in (STATE_JSON, STATE_TENSORS, "model", "ema"))


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run: the `latest` pointer, or (when a kill came
    between a checkpoint's rename and the pointer's update) the highest complete step."""
    ckpts = out / "checkpoints"
    pointer = ckpts / "latest"
    if pointer.is_file():
        path = ckpts / pointer.read_text().strip()
        if is_complete(path):
            return path
    steps = sorted(p for p in ckpts.glob("step_*") if p.is_dir() and is_complete(p))
    return steps[-1] if steps else None


def find_resume(out: Path, resume: str) -> Path:
    if resume == "latest":
        path = latest_checkpoint(out)
        if path is None:
            raise UserError(f"--resume latest: {out / 'checkpoints'} holds no complete "
                                    f"checkpoint (none was written yet); start without --resume")
        return path
    path = Path(resume)
    if not is_complete(path):
        missing = next(n for n in (STATE_JSON, STATE_TENSORS, "model", "ema")
                       if not (path / n).exists())
        raise UserError(f"--resume {resume}: {path / missing} is missing; pass a "
                                f"checkpoints/step_XXXXXXX directory or 'latest'")
    return path


def load_training_checkpoint(path: Path, model: nn.Module, ema: EMA,
                             opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    meta = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    live = load_checkpoint(path / "model").model.state_dict()
    inner = unwrap(model)
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
