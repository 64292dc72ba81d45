"""Checkpoint I/O: the official TerDiT release layout, our safetensors directory, torch files.

Every torch file is read with `torch.load(weights_only=True)`: no pickle ever runs code, and there
is no fallback. Every problem is reported as a `CheckpointError` naming the file, the key, what
was expected and what was found.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .config import OFFICIAL_NAMES, TerDiTConfig
from .io_utils import atomic_directory, atomic_write
from .model import TerDiT
from .ternary import (TernaryLinear, check_k16, codes_to_hqq, hqq_to_k16, k16_to_codes, pack_k16, ternarize)

FORMAT_NAME = "terdit"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OFFICIAL_ARGS_FILE = "model_args.pth"
_OFFICIAL_RE = re.compile(r"^consolidated(_ema)?(_ternary)?\.(\d{2})-of-(\d{2})\.pth$")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason and the way out."""


@dataclass
class LoadedCheckpoint:
    model: TerDiT
    source: str                      # "official" | "terdit" | "torch"
    path: Path
    files: list[Path] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


# ---- safe torch.load --------------------------------------------------------------------------

def safe_torch_load(path: Path, allow_namespace: bool = False, mmap: bool = True):
    """torch.load with weights_only=True, turning every failure into a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    use_mmap = mmap and zipfile.is_zipfile(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        # torch's legacy (pre-1.6) format is a bare pickle stream starting with PROTO (0x80).
        if head[:1] != b"\x80":
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle stream); "
                f"the file may be truncated or of another format")
    globals_ = [argparse.Namespace] if allow_namespace else []
    try:
        with torch.serialization.safe_globals(globals_):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err) or \
                isinstance(err, __import__("pickle").UnpicklingError):
            raise CheckpointError(
                f"{path}: refused to unpickle: the file needs objects that are not plain tensors "
                f"or containers ({text}). Loading it could run arbitrary code, so TerDiT Deploy "
                f"never does; re-save the weights as a plain state dict or safetensors") from None
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(err).__name__}: "
                              f"{text}); the file may be truncated or corrupted") from None


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


# ---- tensor checks ----------------------------------------------------------------------------

def _check_float(t: Tensor, where: str, key: str, shape: tuple) -> None:
    if not isinstance(t, Tensor):
        raise CheckpointError(f"{where}: key {key!r} holds a {type(t).__name__}, expected a tensor")
    if t.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{where}: key {key!r} has dtype {t.dtype}, expected float32, "
                              f"float16 or bfloat16")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{where}: key {key!r} has shape {tuple(t.shape)}, expected "
                              f"{tuple(shape)}")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        idx = tuple(int(i) for i in (~finite).nonzero()[0])
        raise CheckpointError(f"{where}: key {key!r} holds a non-finite value "
                              f"({t[idx].item()}) at index {idx}")


def _check_keys(where: str, expected: Iterable[str], found: Iterable[str], hint: str = "") -> None:
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {_preview(unexpected)}")
        raise CheckpointError(f"{where}: " + "; ".join(parts) + (f"; {hint}" if hint else ""))


def _preview(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


# ---- building models without allocating latent weights ----------------------------------------

def _empty_model(cfg: TerDiTConfig, packed: bool) -> TerDiT:
    with torch.device("meta"):
        model = TerDiT(cfg, packed=packed)
    return model


def _finish(model: TerDiT, state: dict[str, Tensor]) -> TerDiT:
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent tables were built on the meta device: compute them for real
    from .model import rope_tables, timestep_frequencies
    model.rope_cos, model.rope_sin = rope_tables(model.cfg.head_dim, model.cfg.num_tokens)
    model.t_embedder.freqs = timestep_frequencies(model.t_embedder.freq_dim)
    return model.eval()


def model_from_state_dict(cfg: TerDiTConfig, state: dict[str, Tensor], packed: bool = False
                          ) -> TerDiT:
    """A TerDiT holding exactly `state` (strict keys, tensors assigned, not copied), built without
    initialising weights first."""
    return _finish(_empty_model(cfg, packed), dict(state))


def _ternary_prefixes(model: nn.Module) -> dict[str, TernaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}


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
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def read_config_file(path: Path) -> tuple[TerDiTConfig, dict]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None
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
    return cfg, doc


def _load_terdit_dir(path: Path, packed: Optional[bool]) -> LoadedCheckpoint:
    from safetensors import SafetensorError, safe_open

    cfg, doc = read_config_file(path / CONFIG_FILE)
    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"{wfile}: file not found (a checkpoint directory holds "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    kind = doc["weights"]
    if (kind == "float") != (not cfg.ternary):
        raise CheckpointError(f"{path / CONFIG_FILE}: field 'weights' is {kind!r} but "
                              f"config.ternary is {cfg.ternary}")
    model = _empty_model(cfg, packed=kind == "packed")
    expected = model.state_dict()
    ks = _codes_in_features(model)
    try:
        with safe_open(str(wfile), framework="pt") as f:
            _check_keys(str(wfile), expected.keys(), f.keys())
            state = {}
            for key, ref in expected.items():
                t = f.get_tensor(key)
                _check_tensor_like(t, ref, str(wfile), key, ks)
                state[key] = t if t.dtype == torch.int32 else t.float()
    except SafetensorError as err:
        raise CheckpointError(f"{wfile}: not a valid safetensors file ({err}); it may be "
                              f"truncated") from None
    model = _finish(model, state)
    if kind == "latent":
        for m in model.ternary_layers():
            m.weight.requires_grad_(True)
    if packed and kind == "latent":
        model = to_packed(model)
    return LoadedCheckpoint(model, "terdit", path, [path / CONFIG_FILE, wfile],
                            doc.get("metadata", {}))


def _check_tensor_like(t: Tensor, ref: Tensor, where: str, key: str,
                       in_features: dict[str, int]) -> None:
    if not isinstance(t, Tensor):
        raise CheckpointError(f"{where}: key {key!r} holds a {type(t).__name__}, expected a tensor")
    if ref.dtype == torch.int32:
        if t.dtype != torch.int32 or tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: key {key!r} is {t.dtype} {tuple(t.shape)}, "
                                  f"expected int32 {tuple(ref.shape)} (k16 codes)")
        try:
            check_k16(t, in_features[key], what=f"{where}: key {key!r}")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    else:
        _check_float(t, where, key, tuple(ref.shape))


def _codes_in_features(model: nn.Module) -> dict[str, int]:
    """{state-dict key of k16 codes: in_features} (K is not recoverable from the word count)."""
    return {f"{name}.codes": m.in_features for name, m in _ternary_prefixes(model).items()
            if m.packed}


def to_packed(model: TerDiT) -> TerDiT:
    from .ternary import pack_model_
    return pack_model_(model).eval()


# ---- official release layout ----------------------------------------------------------------

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
        m = _OFFICIAL_RE.match(p.name)
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


def _official_key(our_key: str, ternary_prefixes: set[str]) -> str:
    prefix, _, leaf = our_key.rpartition(".")
    if prefix in ternary_prefixes:
        return f"{prefix}." + {"codes": "weight", "scale": "alphas"}.get(leaf, leaf)
    return our_key


def _load_official_dir(path: Path, ema: Optional[bool], ternary: Optional[bool],
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
        m = _OFFICIAL_RE.match(file.name)
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
    model = _empty_model(cfg, packed=True)
    prefixes = _ternary_prefixes(model)
    expected = model.state_dict()
    keymap = {_official_key(k, set(prefixes)): k for k in expected}
    _check_keys(str(wfile), keymap, state.keys(),
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
                _check_float(t, str(wfile), okey, (n, k))
                out[key] = pack_k16(ternarize(t))
        elif layer is not None and leaf == "scale":
            _check_float(t, str(wfile), okey, (1,))
            out[key] = t.float().expand(layer.out_features).clone()
        else:
            _check_float(t, str(wfile), okey, tuple(ref.shape))
            out[key] = t.float().clone()
        _release_pages(t)
        del t
        if layer is not None and leaf == "codes":
            _trim_heap()
    model = _finish(model, out)
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
    prefixes = _ternary_prefixes(packed)
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
    with atomic_directory(Path(path), overwrite=overwrite) as tmp:
        torch.save(ns, tmp / OFFICIAL_ARGS_FILE)
        torch.save(state, tmp / fname)
    return Path(path)


def _clone(model: TerDiT) -> TerDiT:
    import copy
    return copy.deepcopy(model)


# ---- torch file of ours ---------------------------------------------------------------------

def _load_torch_file(path: Path, packed: Optional[bool]) -> LoadedCheckpoint:
    if (path.parent / OFFICIAL_ARGS_FILE).is_file() and _OFFICIAL_RE.match(path.name):
        return _load_official_dir(path.parent, None, None, file=path)
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
    model = _empty_model(cfg, packed=cfg.ternary and has_codes)
    expected = model.state_dict()
    _check_keys(str(path), expected.keys(), sd.keys())
    ks = _codes_in_features(model)
    state = {}
    for key, ref in expected.items():
        _check_tensor_like(sd[key], ref, str(path), key, ks)
        state[key] = sd[key] if sd[key].dtype == torch.int32 else sd[key].float().clone()
    model = _finish(model, state)
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
        if (path / CONFIG_FILE).is_file():
            loaded = _load_terdit_dir(path, packed)
        elif (path / OFFICIAL_ARGS_FILE).is_file():
            loaded = _load_official_dir(path, ema, ternary)
        else:
            raise CheckpointError(
                f"{path}: not a checkpoint directory: expected {CONFIG_FILE} + {WEIGHTS_FILE} "
                f"(TerDiT Deploy) or {OFFICIAL_ARGS_FILE} + consolidated*.pth (official release)")
    elif path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).is_file():
        loaded = _load_terdit_dir(path.parent, packed)
    elif path.suffix in (".pt", ".pth"):
        loaded = _load_torch_file(path, packed)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type; pass a directory or a "
                              f".pt/.pth/.safetensors file")
    if dtype is not None:
        loaded.model = loaded.model.to(dtype)
    return loaded
