"""Checkpoint I/O: our safetensors directory and torch files, and `load_checkpoint`, which also
reads the official TerDiT release layout (terdit.official).

Every torch file is read with `torch.load(weights_only=True)`: no pickle ever runs code, and there
is no fallback. Every problem is reported as a `CheckpointError` naming the file, the key, what
was expected and what was found.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from terdit_common.files import atomic_directory, atomic_write
from terdit_common.inputs import input_file, read_json_file
from terdit_common.limits import MAX_WEIGHTS_BYTES
from terdit_common.manifest import (CONFIG_FILE, MANIFEST_FILE, REEXPORT, WEIGHTS_FILE,
                                    is_export_dir, read_manifest, verify_files)

from .config import TerDiTConfig
from .loading import (CheckpointError, LoadedCheckpoint, check_keys, check_tensor_like,
                      codes_in_features, empty_model, finish_model, model_from_state_dict,
                      safe_torch_load, to_packed)
from .model import TerDiT
from .official import OFFICIAL_ARGS_FILE, OFFICIAL_RE, load_official_dir, save_official

FORMAT_NAME = "terdit"
FORMAT_VERSION = 1
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE)   # all a checkpoint directory holds

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "save_checkpoint",
           "save_official", "save_torch", "model_from_state_dict", "read_config_file"]


# ---- our format: safetensors directory -------------------------------------------------------

def save_checkpoint(model: TerDiT, path: str | Path, overwrite: bool = False,
                    metadata: Optional[dict] = None) -> Path:
    """Write `config.json` + `model.safetensors` into directory `path` (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    kind = "float" if not model.cfg.ternary else ("packed" if model.packed else "latent")
    if model.cfg.ternary and not model.packed and any(m.packed for m in model.ternary_layers()):
        raise ValueError("model mixes packed and latent ternary layers; pack it fully first")
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "weights": kind,
           "config": model.cfg.to_dict(), "metadata": metadata or {}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(path, overwrite=overwrite, ours=CHECKPOINT_FILES.__contains__,
                          flag="checkpoint directory") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def read_config_file(path: Path) -> tuple[TerDiTConfig, dict]:
    doc = read_json_file(path, fix=f"the checkpoint's {CONFIG_FILE} is damaged: restore it or "
                                   f"save the checkpoint again", error=CheckpointError)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: field 'format' is {doc.get('format') if isinstance(doc, dict) else doc!r}, "
                              f"expected {FORMAT_NAME!r} (a TerDiT Deploy checkpoint directory)")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: field 'format_version' is {doc.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION}; upgrade terdit-deploy")
    if doc.get("weights") not in ("packed", "latent", "float"):
        raise CheckpointError(f"{path}: field 'weights' is {doc.get('weights')!r}, expected "
                              f"'packed', 'latent' or 'float'")
    try:
        cfg = TerDiTConfig.from_dict(doc.get("config"), source=f"{path}: field 'config'")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    check_metadata(doc.get("metadata", {}), f"{path}: field 'metadata'")
    return cfg, doc


def check_metadata(metadata, where: str) -> None:
    """Checkpoint metadata is a JSON object; its optional `class_names` a list of strings."""
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where} is {type(metadata).__name__}, expected an object")
    names = metadata.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str)
                                                                 for n in names)):
        raise CheckpointError(f"{where}: 'class_names' must be a list of strings")


def _check_against_weights(cfg: TerDiTConfig, wfile: Path, keys, shapes: dict) -> None:
    """The config's depth and width agree with the weights file (before any model is built:
    a config typo must not make a huge model first)."""
    layers = {int(k.split(".")[1]) for k in keys if k.startswith("layers.") and
              k.split(".")[1].isdigit()}
    found = max(layers) + 1 if layers else 0
    if found != cfg.n_layers:
        raise CheckpointError(f"{wfile}: holds {found} transformer layer(s) but the config says "
                              f"n_layers={cfg.n_layers}; fix {CONFIG_FILE}")
    emb = shapes.get("x_embedder.weight")
    want = [cfg.dim, cfg.patch_size ** 2 * cfg.in_channels]
    if emb is not None and list(emb) != want:
        raise CheckpointError(f"{wfile}: x_embedder.weight has shape {list(emb)} but the config "
                              f"(dim, patch_size, in_channels) needs {want}; fix {CONFIG_FILE}")


def _load_terdit_dir(path: Path, packed: Optional[bool]) -> LoadedCheckpoint:
    from safetensors import SafetensorError, safe_open

    cfg, doc = read_config_file(path / CONFIG_FILE)
    wfile = path / WEIGHTS_FILE
    input_file(wfile, fix=f"a checkpoint directory holds {CONFIG_FILE} and {WEIGHTS_FILE}",
               max_bytes=MAX_WEIGHTS_BYTES, limit_name="MAX_WEIGHTS_BYTES", error=CheckpointError)
    kind = doc["weights"]
    if (kind == "float") != (not cfg.ternary):
        raise CheckpointError(f"{path / CONFIG_FILE}: field 'weights' is {kind!r} but "
                              f"config.ternary is {cfg.ternary}")
    try:
        with safe_open(str(wfile), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in ("x_embedder.weight",) if k in keys}
    except SafetensorError as err:
        raise CheckpointError(f"{wfile}: not a valid safetensors file ({err}); it may be "
                              f"truncated") from None
    _check_against_weights(cfg, wfile, keys, shapes)
    model = empty_model(cfg, packed=kind == "packed")
    expected = model.state_dict()
    ks = codes_in_features(model)
    try:
        with safe_open(str(wfile), framework="pt") as f:
            check_keys(str(wfile), expected.keys(), f.keys())
            state = {}
            for key, ref in expected.items():
                t = f.get_tensor(key)
                check_tensor_like(t, ref, str(wfile), key, ks)
                state[key] = t if t.dtype == torch.int32 else t.float()
    except SafetensorError as err:
        raise CheckpointError(f"{wfile}: not a valid safetensors file ({err}); it may be "
                              f"truncated") from None
    model = finish_model(model, state)
    if kind == "latent":
        for m in model.ternary_layers():
            m.weight.requires_grad_(True)
    if packed and kind == "latent":
        model = to_packed(model)
    return LoadedCheckpoint(model, "terdit", path, [path / CONFIG_FILE, wfile],
                            doc.get("metadata", {}))


# ---- torch file of ours ---------------------------------------------------------------------

def _load_torch_file(path: Path, packed: Optional[bool]) -> LoadedCheckpoint:
    if (path.parent / OFFICIAL_ARGS_FILE).is_file() and OFFICIAL_RE.match(path.name):
        return load_official_dir(path.parent, None, None, file=path)
    obj = safe_torch_load(path)
    if not (isinstance(obj, dict) and "config" in obj and "model" in obj):
        raise CheckpointError(
            f"{path}: a bare torch file needs either {{'config': {{...}}, 'model': state_dict}} "
            f"(as `terdit.checkpoint.save_torch` writes) or an official {OFFICIAL_ARGS_FILE} "
            f"beside a consolidated*.pth file")
    try:
        cfg = TerDiTConfig.from_dict(obj["config"], source=f"{path}: field 'config'")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    sd = obj["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: field 'model' must be a state dict")
    has_codes = any(k.endswith(".codes") for k in sd)
    model = empty_model(cfg, packed=cfg.ternary and has_codes)
    expected = model.state_dict()
    check_keys(str(path), expected.keys(), sd.keys())
    ks = codes_in_features(model)
    state = {}
    for key, ref in expected.items():
        check_tensor_like(sd[key], ref, str(path), key, ks)
        state[key] = sd[key] if sd[key].dtype == torch.int32 else sd[key].float().clone()
    model = finish_model(model, state)
    if packed and cfg.ternary and not model.packed:
        model = to_packed(model)
    return LoadedCheckpoint(model, "torch", path, [path], {})


def save_torch(model: TerDiT, path: str | Path) -> Path:
    """A single-file torch checkpoint {'config': dict, 'model': state_dict} (weights_only-safe)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda p: torch.save({"config": model.cfg.to_dict(), "model": sd}, p))


# ---- entry point ----------------------------------------------------------------------------

def load_checkpoint(path: str | Path, *, packed: Optional[bool] = None, ema: Optional[bool] = None,
                    ternary: Optional[bool] = None, dtype: Optional[torch.dtype] = None
                    ) -> LoadedCheckpoint:
    """Load any supported checkpoint.

    path: an official release directory (model_args.pth + consolidated*.pth), a TerDiT Deploy
    directory (config.json + model.safetensors), one official consolidated*.pth file, or a torch
    file written by `save_torch`. `packed=True` converts latent ternary weights to k16 codes;
    `ema` / `ternary` choose among an official directory's files (default: EMA, ternary).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_export_dir(path):
            kind = "export"
        elif os.path.lexists(path / CONFIG_FILE):
            kind = "terdit"
        elif (path / OFFICIAL_ARGS_FILE).is_file():
            kind = "official"
        else:
            raise CheckpointError(
                f"{path}: not a checkpoint directory: expected {CONFIG_FILE} + {WEIGHTS_FILE} "
                f"(TerDiT Deploy) or {OFFICIAL_ARGS_FILE} + consolidated*.pth (official release)")
        if kind == "official":
            loaded = load_official_dir(path, ema, ternary)
        else:
            _refuse_official_choices(path, ema, ternary)
            if kind == "export":
                _verify_export(path)
            loaded = _load_terdit_dir(path, packed)
        if dtype is not None:
            loaded.model = loaded.model.to(dtype)
        return loaded
    input_file(path, fix="pass a checkpoint file or directory", max_bytes=MAX_WEIGHTS_BYTES,
               limit_name="MAX_WEIGHTS_BYTES", error=CheckpointError)
    _refuse_official_choices(path, ema, ternary)
    if path.suffix == ".safetensors" and path.name != WEIGHTS_FILE:
        raise CheckpointError(f"{path}: a checkpoint's weights are {WEIGHTS_FILE} beside its "
                              f"{CONFIG_FILE}; pass the checkpoint directory {path.parent}")
    if path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).is_file():
        if is_export_dir(path.parent):
            _verify_export(path.parent)
        loaded = _load_terdit_dir(path.parent, packed)
    elif path.suffix in (".pt", ".pth"):
        loaded = _load_torch_file(path, packed)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type; pass a directory or a "
                              f".pt/.pth/.safetensors file")
    if dtype is not None:
        loaded.model = loaded.model.to(dtype)
    return loaded


def _verify_export(path: Path) -> None:
    """An export directory is read as a checkpoint only through its manifest: the config and
    weights must be listed there and match their sha256 (terdit_common.manifest)."""
    manifest = read_manifest(path)
    unlisted = [n for n in CHECKPOINT_FILES if n not in manifest["files"]]
    if unlisted:
        raise CheckpointError(f"{path / MANIFEST_FILE}: does not list {unlisted[0]}, so the "
                              f"export's weights cannot be verified; {REEXPORT}")
    verify_files(path, manifest, list(CHECKPOINT_FILES))


def _refuse_official_choices(path: Path, ema: Optional[bool], ternary: Optional[bool]) -> None:
    """ema / ternary choose among the files of an official release directory; anywhere else
    they would be ignored, so they are refused."""
    for name, value, flags in (("ema", ema, "--ema / --no-ema"),
                               ("ternary", ternary, "--from-ternary / --from-fp")):
        if value is not None:
            raise CheckpointError(f"{flags} ({name}={value}) choose among the files of an "
                                  f"official release directory ({OFFICIAL_ARGS_FILE} + "
                                  f"consolidated*.pth); {path} is not one, so the flag would "
                                  f"be ignored: drop it")
