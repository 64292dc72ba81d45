"""The official TerDiT release layout: `model_args.pth` (a pickled argparse.Namespace, read with
weights_only=True and only Namespace allowed) + `consolidated{_ema}{_ternary}.NN-of-MM.pth`
(packed HQQ uint8 or fp latent weights). Import into our packed model, and export back for the
official sample.py.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from terdit_common.files import atomic_directory

from .config import OFFICIAL_NAMES, TerDiTConfig
from .formats import codes_to_hqq, hqq_to_k16, k16_to_codes, pack_k16, ternarize
from .loading import (CheckpointError, LoadedCheckpoint, check_float, check_keys, empty_model,
                      finish_model, safe_torch_load, ternary_prefixes, to_packed)
from .model import TerDiT

OFFICIAL_ARGS_FILE = "model_args.pth"
OFFICIAL_RE = re.compile(r"^consolidated(_ema)?(_ternary)?\.(\d{2})-of-(\d{2})\.pth$")


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc). Converting hundreds of layers leaves their
    temporaries fragmenting the heap, which would otherwise show as ~1x the checkpoint in RSS."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _release_pages(t: Tensor) -> None:
    """Drop the resident pages of a tensor that lives in a read-only file mapping (torch.load's
    mmap), so a large import does not keep the whole file in RAM. Best effort, Linux only."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start = t.data_ptr() // page * page
        end = t.data_ptr() + t.untyped_storage().nbytes()
        length = (end - start + page - 1) // page * page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


@dataclass
class OfficialArgs:
    model: str
    image_size: int
    num_classes: int
    qk_norm: bool
    extra: dict


def read_official_args(path: Path) -> OfficialArgs:
    obj = safe_torch_load(path, allow_namespace=True, mmap=False)
    if isinstance(obj, argparse.Namespace):
        data = vars(obj)
    elif isinstance(obj, dict):
        data = obj
    else:
        raise CheckpointError(f"{path}: expected an argparse.Namespace (or dict) of training "
                              f"arguments, found {type(obj).__name__}")
    for name, typ in (("model", str), ("image_size", int), ("num_classes", int)):
        if name not in data:
            raise CheckpointError(f"{path}: field {name!r} is missing from the model arguments")
        if not isinstance(data[name], typ) or isinstance(data[name], bool):
            raise CheckpointError(f"{path}: field {name!r} is {data[name]!r}, expected "
                                  f"{typ.__name__}")
    if data["model"] not in OFFICIAL_NAMES:
        raise CheckpointError(f"{path}: field 'model' is {data['model']!r}, not a known TerDiT "
                              f"model; known: {', '.join(sorted(OFFICIAL_NAMES))}")
    if data["image_size"] <= 0 or data["image_size"] % 8:
        raise CheckpointError(f"{path}: field 'image_size' is {data['image_size']}, expected a "
                              f"positive multiple of 8 (the SD-VAE downsamples by 8)")
    extra = {k: v for k, v in data.items() if k not in ("model", "image_size", "num_classes",
                                                         "qk_norm")
             and isinstance(v, (str, int, float, bool, type(None)))}
    return OfficialArgs(data["model"], data["image_size"], data["num_classes"],
                        bool(data.get("qk_norm", False)), extra)


def official_config(args: OfficialArgs) -> TerDiTConfig:
    return TerDiTConfig.from_name(args.model, input_size=args.image_size // 8,
                                  num_classes=args.num_classes, qk_norm=args.qk_norm)


def list_official_files(path: Path) -> dict[tuple[bool, bool], list[Path]]:
    """{(ema, ternary): [shard files]} of an official release directory."""
    groups: dict[tuple[bool, bool], list[tuple[int, int, Path]]] = {}
    for p in sorted(path.iterdir()):
        m = OFFICIAL_RE.match(p.name)
        if m:
            groups.setdefault((bool(m.group(1)), bool(m.group(2))), []).append(
                (int(m.group(3)), int(m.group(4)), p))
    out = {}
    for key, items in groups.items():
        totals = {n for _, n, _ in items}
        if len(totals) != 1:
            raise CheckpointError(f"{path}: shards {[p.name for *_, p in items]} disagree on the "
                                  f"shard count")
        out[key] = [p for _, _, p in sorted(items)]
    return out


def _official_key(our_key: str, prefixes: set[str]) -> str:
    prefix, _, leaf = our_key.rpartition(".")
    if prefix in prefixes:
        return f"{prefix}." + {"codes": "weight", "scale": "alphas"}.get(leaf, leaf)
    return our_key


def load_official_dir(path: Path, ema: Optional[bool], ternary: Optional[bool],
                       file: Optional[Path] = None) -> LoadedCheckpoint:
    args_file = path / OFFICIAL_ARGS_FILE
    if not args_file.is_file():
        raise CheckpointError(f"{path}: {OFFICIAL_ARGS_FILE} not found; an official TerDiT "
                              f"release directory holds {OFFICIAL_ARGS_FILE} and "
                              f"consolidated*.pth files")
    args = read_official_args(args_file)
    cfg = official_config(args)
    if file is None:
        groups = list_official_files(path)
        if not groups:
            raise CheckpointError(f"{path}: no consolidated{{_ema}}{{_ternary}}.NN-of-MM.pth "
                                  f"file found")
        want = [(e, t) for e in ((ema,) if ema is not None else (True, False))
                for t in ((ternary,) if ternary is not None else (True, False))]
        chosen = next((k for k in want if k in groups), None)
        if chosen is None:
            raise CheckpointError(
                f"{path}: no consolidated file with ema={ema}, ternary={ternary}; present: "
                f"{sorted(p.name for ps in groups.values() for p in ps)}")
        files = groups[chosen]
    else:
        m = OFFICIAL_RE.match(file.name)
        if not m:
            raise CheckpointError(f"{file}: not named consolidated{{_ema}}{{_ternary}}.NN-of-MM.pth")
        files = [file]
        if int(m.group(4)) != 1:
            files = list_official_files(path)[(bool(m.group(1)), bool(m.group(2)))]
    if len(files) > 1:
        raise CheckpointError(
            f"{path}: {files[0].name} is one of {len(files)} model-parallel shards; merging "
            f"model-parallel shards is not supported (per-shard alphas of row-parallel layers have "
            f"no per-output-channel equivalent). Re-consolidate to one shard with the official "
            f"code (model_parallel_size=1) first")
    wfile = files[0]
    state = safe_torch_load(wfile)
    if not isinstance(state, dict):
        raise CheckpointError(f"{wfile}: expected a state dict, found {type(state).__name__}")
    model = empty_model(cfg, packed=True)
    prefixes = ternary_prefixes(model)
    expected = model.state_dict()
    keymap = {_official_key(k, set(prefixes)): k for k in expected}
    check_keys(str(wfile), keymap, state.keys(),
                hint=f"model_args says {args.model} with qk_norm={args.qk_norm}")

    kinds = {(state[f"{p}.weight"].dtype == torch.uint8) for p in prefixes
             if isinstance(state.get(f"{p}.weight"), Tensor)}
    if len(kinds) > 1:
        raise CheckpointError(f"{wfile}: some ternary layers are packed uint8 and others are "
                              f"floating point; a consolidated file holds one kind")
    packed_file = kinds == {True}
    out: dict[str, Tensor] = {}
    for okey, key in keymap.items():
        t = state.pop(okey)
        ref = expected[key]
        prefix, _, leaf = key.rpartition(".")
        layer = prefixes.get(prefix)
        if layer is not None and leaf == "codes":
            n, k = layer.out_features, layer.in_features
            if packed_file:
                if not isinstance(t, Tensor) or t.dtype != torch.uint8 or tuple(t.shape) != (n // 4, k):
                    raise CheckpointError(
                        f"{wfile}: key {okey!r} is {_describe(t)}, expected uint8 ({n // 4}, {k}) "
                        f"(2-bit HQQ codes of a {n}x{k} ternary weight)")
                try:
                    out[key] = hqq_to_k16(t, what=f"{wfile}: key {okey!r}")
                except ValueError as err:
                    raise CheckpointError(str(err)) from None
            else:
                check_float(t, str(wfile), okey, (n, k))
                out[key] = pack_k16(ternarize(t))
        elif layer is not None and leaf == "scale":
            check_float(t, str(wfile), okey, (1,))
            out[key] = t.float().expand(layer.out_features).clone()
        else:
            check_float(t, str(wfile), okey, tuple(ref.shape))
            out[key] = t.float().clone()
        _release_pages(t)
        del t
        if layer is not None and leaf == "codes":
            _trim_heap()
    model = finish_model(model, out)
    meta = {"official_model": args.model, "image_size": args.image_size,
            "official_file": wfile.name, "official_args": args.extra}
    return LoadedCheckpoint(model, "official", path, [args_file, wfile], meta)


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return type(t).__name__


def save_official(model: TerDiT, path: str | Path, ema: bool = True, vae: str = "ema",
                  overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` in the official release layout (model_args.pth +
    consolidated{_ema}_ternary.00-of-01.pth) so the official sample.py can load it."""
    cfg = model.cfg
    name = cfg.official_name
    if name is None:
        raise ValueError("the official code only builds DiT_Llama_600M/3B/7B_patch2; this "
                         "config matches none of them")
    if not cfg.ternary:
        raise ValueError("a full-precision model has no official ternary layout")
    if cfg.in_channels != 4 or not cfg.learn_sigma:
        raise ValueError("the official models take 4 latent channels with learn_sigma=True")
    packed = model if model.packed else to_packed(_clone(model))
    state: dict[str, Tensor] = {}
    prefixes = ternary_prefixes(packed)
    for key, t in packed.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        layer = prefixes.get(prefix)
        okey = _official_key(key, set(prefixes))
        if layer is not None and leaf == "codes":
            state[okey] = codes_to_hqq(k16_to_codes(t.cpu(), layer.in_features)).contiguous()
        elif layer is not None and leaf == "scale":
            s = t.float().cpu()
            if not bool((s == s[0]).all()):
                raise ValueError(f"layer {prefix!r} has per-channel scales; the official layout "
                                 f"keeps one alpha per layer")
            state[okey] = s[:1].to(dtype).clone()
        else:
            state[okey] = t.detach().cpu().to(dtype).clone()
    ns = argparse.Namespace(model=name, image_size=cfg.input_size * 8,
                            num_classes=cfg.num_classes, qk_norm=cfg.qk_norm, vae=vae,
                            model_parallel_size=1)
    fname = f"consolidated{'_ema' if ema else ''}_ternary.00-of-01.pth"
    with atomic_directory(Path(path), overwrite=overwrite, ours=is_official_file) as tmp:
        torch.save(ns, tmp / OFFICIAL_ARGS_FILE)
        torch.save(state, tmp / fname)
    return Path(path)


def is_official_file(name: str) -> bool:
    """A name of the official release layout (what save_official writes or replaces)."""
    return name == OFFICIAL_ARGS_FILE or OFFICIAL_RE.match(name) is not None


def _clone(model: TerDiT) -> TerDiT:
    import copy
    return copy.deepcopy(model)


