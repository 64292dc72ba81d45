"""The trainer's resumable state: the EMA of the parameters, RNG states, and training
checkpoints (OUT/checkpoints/step_XXXXXXX/ with {model,ema}/ checkpoint directories, the
optimizer state and the RNG states), written so that a kill at any point loses nothing.

A run directory holds only the names of RUN_FILES (`check_run_dir`): train_config.json, written
when a run starts, is its record; without it nothing named like our outputs is ours. What
--overwrite clears (`clear_checkpoints`) is what our layout names, nothing else."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from terdit_common.errors import UserError
from terdit_common.files import (LOCK_NAME, atomic_write_text, is_temp_name, refuse_foreign,
                                 remove_all)
from terdit_common.inputs import input_file, read_json_file
from terdit_common.limits import MAX_WEIGHTS_BYTES

from ..checkpoint import CHECKPOINT_FILES, load_checkpoint, save_checkpoint
from ..config import TerDiTConfig
from ..model import TerDiT
from .distributed import Dist, full_tensor, unwrap

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
CONFIG_JSON = "train_config.json"
# everything the trainer writes in OUT (the module docstring of terdit.train)
RUN_FILES = {"checkpoints": "dir", "final": "dir", "samples": "dir", "log.jsonl": "file",
             "loss.png": "file", CONFIG_JSON: "file", LOCK_NAME: "file"}
STEP_RE = re.compile(r"step_\d{7}")
# a step directory being written (`.step_X.partial`) or moved aside for its rewrite (`.old`)
STEP_TEMP_RE = re.compile(r"\.step_\d{7}\.(?:partial|old)")
STEP_FILES = (STATE_JSON, STATE_TENSORS, "model", "ema")      # what a step directory holds
MAX_POINTER_BYTES = 64


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
    from ..loading import model_from_state_dict
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
    try:
        save_checkpoint(model_from_params(cfg, params), tmp / "model",
                        metadata={"step": step, "role": "live"})
        save_checkpoint(model_from_params(cfg, ema_params), tmp / "ema",
                        metadata={"step": step, "role": "ema", "ema_decay": tc.ema_decay})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    except BaseException:                     # interrupted or failed: leave no temporary
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    place leaves `.step_X.old` and no `step_X`: put the old copy back, remove the step
    temporaries left (the replacement `.partial`, an old copy whose step exists), and point
    `latest` at the newest complete checkpoint. Call it only while holding the run's lock."""
    ckpts = out / "checkpoints"
    if not ckpts.is_dir():
        return
    for old in ckpts.glob(".step_*.old"):
        path = ckpts / old.name[1:-len(".old")]
        if not path.exists() and is_complete(old):
            os.replace(old, path)
    remove_all(p for p in ckpts.iterdir() if STEP_TEMP_RE.fullmatch(p.name))
    newest = latest_checkpoint(out)
    if newest is not None and _pointer(ckpts) != newest.name:
        atomic_write_text(ckpts / "latest", newest.name + "\n")


def is_complete(path: Path) -> bool:
    return all((path / need).exists() for need in (STATE_JSON, STATE_TENSORS, "model", "ema"))


def _pointer(ckpts: Path) -> Optional[str]:
    """The step directory named by checkpoints/latest, or None when it names none of ours."""
    pointer = ckpts / "latest"
    if pointer.is_symlink() or not pointer.is_file() or \
            pointer.stat().st_size > MAX_POINTER_BYTES:
        return None
    name = pointer.read_bytes().decode("ascii", "replace").strip()
    return name if STEP_RE.fullmatch(name) else None


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run: the `latest` pointer, or (when a kill came
    between a checkpoint's rename and the pointer's update) the highest complete step."""
    ckpts = out / "checkpoints"
    name = _pointer(ckpts)
    if name is not None:
        path = ckpts / name
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
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"--resume {resume}: not a directory; pass a checkpoints/step_XXXXXXX "
                        f"directory the trainer wrote, or 'latest'")
    if not is_complete(path):
        missing = next(n for n in (STATE_JSON, STATE_TENSORS, "model", "ema")
                       if not (path / n).exists())
        raise UserError(f"--resume {resume}: {path / missing} is missing; pass a "
                                f"checkpoints/step_XXXXXXX directory or 'latest'")
    for name in (STATE_JSON, STATE_TENSORS):
        input_file(path / name, "--resume", "pass a checkpoints/step_XXXXXXX directory the "
                   "trainer wrote", MAX_WEIGHTS_BYTES, "MAX_WEIGHTS_BYTES")
    return path


def read_train_state(path: Path) -> dict:
    """A checkpoint's train_state.json with the fields a resume reads checked (UserError naming
    the file and the field)."""
    fix = ("the file is damaged: resume from another checkpoints/step_XXXXXXX (or 'latest' after "
           "removing this one), or start over with --overwrite")
    where = f"--resume {path / STATE_JSON}"
    meta = read_json_file(path / STATE_JSON, "--resume", fix)
    need = {"step": int, "train_config": dict, "optimizer": dict, "rng": dict}
    for field, kind in need.items():
        value = meta.get(field) if isinstance(meta, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: field {field!r} is {type(value).__name__}, expected "
                            f"{kind.__name__}; {fix}")
    if not isinstance(meta["optimizer"].get("param_groups"), list) or \
            not isinstance(meta["rng"].get("numpy"), list) or \
            not isinstance(meta["rng"].get("python"), list):
        raise UserError(f"{where}: fields 'optimizer.param_groups' / 'rng' are not what the "
                        f"trainer writes; {fix}")
    return meta


def check_run_dir(out: Path, flag: str = "--out") -> None:
    """OUT holds only what the trainer writes: each name of RUN_FILES of its kind (never a
    symbolic link), checkpoints/ only step directories, `latest` and temporaries, final/ only a
    checkpoint's files, samples/ only step grids. Without train_config.json (the run's record)
    none of our names but the lock may exist. Anything else is refused: we would overwrite or
    remove it."""
    if not out.is_dir():
        return
    has_record = (out / CONFIG_JSON).is_file() and not (out / CONFIG_JSON).is_symlink()
    for name, kind in RUN_FILES.items():
        p = out / name
        if not os.path.lexists(p) or name == LOCK_NAME:
            continue
        if p.is_symlink() or (kind == "dir") != p.is_dir() or (kind == "file" and not p.is_file()):
            what = "directory" if kind == "dir" else "file"
            raise UserError(f"{flag} {out}: {name} is not the {what} "
                            f"this tool writes (a symbolic link or another kind); move it away "
                            f"or choose another {flag}")
        if not has_record:
            raise UserError(f"{flag} {out}: holds {name} but no {CONFIG_JSON}, so it is not a "
                            f"training run of this tool and will not be replaced: move it away "
                            f"or choose another {flag}")
    rule = "a run directory holds only what the trainer writes"

    def step(name: str) -> bool:
        return STEP_RE.fullmatch(name) is not None or STEP_TEMP_RE.fullmatch(name) is not None
    ckpts = out / "checkpoints"
    refuse_foreign(ckpts, lambda n: step(n) or n == "latest", flag, rule, dirs=step)
    for p in ckpts.glob("step_*") if ckpts.is_dir() else ():
        refuse_foreign(p, STEP_FILES.__contains__, flag, rule, dirs=("model", "ema").__contains__)
        for sub in ("model", "ema"):
            refuse_foreign(p / sub, CHECKPOINT_FILES.__contains__, flag, rule)
    refuse_foreign(out / "final", CHECKPOINT_FILES.__contains__, flag, rule)
    refuse_foreign(out / "samples", lambda n: re.fullmatch(r"step_\d{7}\.png", n) is not None,
                   flag, rule)


def clear_checkpoints(out: Path) -> None:
    """Remove a run's checkpoints (--overwrite, or only incomplete ones left): the entries of
    checkpoints/ our layout names (check_run_dir refused anything else)."""
    ckpts = out / "checkpoints"
    for p in list(ckpts.iterdir()) if ckpts.is_dir() else ():
        if STEP_RE.fullmatch(p.name) or STEP_TEMP_RE.fullmatch(p.name) or is_temp_name(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        elif p.name == "latest":
            p.unlink()


def load_training_checkpoint(path: Path, model: nn.Module, ema: EMA,
                             opt: torch.optim.Optimizer) -> dict:
    """Restore model, EMA, optimizer and RNG states from a checkpoint; a damaged one is one
    UserError naming it."""
    meta = read_train_state(path)
    try:
        return _load_state(path, meta, model, ema, opt)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors / torch errors of a damaged state
        text = (str(err).strip().splitlines() or [""])[0][:160]
        raise UserError(f"--resume {path}: the checkpoint cannot be loaded ({type(err).__name__}:"
                        f" {text}); it is damaged or does not match the model: resume from "
                        f"another checkpoints/step_XXXXXXX, or start over with --overwrite"
                        ) from None


def _load_state(path: Path, meta: dict, model: nn.Module, ema: EMA,
                opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

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
