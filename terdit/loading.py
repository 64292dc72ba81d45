"""Safe reading of checkpoint tensors and models built from checked state dicts, shared by the
checkpoint formats (terdit.checkpoint: ours and torch files; terdit.official: the release).

Every torch file is read with `torch.load(weights_only=True)`: no pickle ever runs code, and there
is no fallback. Every problem is a `CheckpointError` naming the file, the key, what was expected
and what was found.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from terdit_common.errors import UserError
from terdit_common.inputs import input_file
from terdit_common.limits import MAX_WEIGHTS_BYTES

from .config import TerDiTConfig
from .formats import FLOAT_DTYPES, check_k16
from .model import TerDiT
from .ternary import TERNARY_LAYERS

# The largest checkpoint file read (the official 7B release in fp32 with its EMA is ~56 GB); a
# larger file is refused before it is opened.


class CheckpointError(UserError):
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
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: file not found")
    input_file(path, fix="pass a checkpoint file", max_bytes=MAX_WEIGHTS_BYTES,
               limit_name="MAX_WEIGHTS_BYTES", error=CheckpointError)
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
        with torch.serialization.safe_globals(globals_), warnings.catch_warnings():
            warnings.simplefilter("ignore")           # torch's own advice is not ours to give
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err) or \
                isinstance(err, __import__("pickle").UnpicklingError):
            # name what the pickle asks for; never repeat torch's hint to load it unsafely
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" (it refers to {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refused to unpickle: the file needs objects that are not plain tensors "
                f"or containers{what}. Loading it could run arbitrary code, so TerDiT Deploy "
                f"never does; re-save the weights as a plain state dict or safetensors") from None
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(err).__name__}: "
                              f"{text}); the file may be truncated or corrupted") from None


# ---- tensor checks ----------------------------------------------------------------------------

def check_float(t: Tensor, where: str, key: str, shape: tuple) -> None:
    if not isinstance(t, Tensor):
        raise CheckpointError(f"{where}: key {key!r} holds a {type(t).__name__}, expected a tensor")
    if t.dtype not in FLOAT_DTYPES:
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


def check_keys(where: str, expected: Iterable[str], found: Iterable[str], hint: str = "") -> None:
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {preview_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {preview_keys(unexpected)}")
        raise CheckpointError(f"{where}: " + "; ".join(parts) + (f"; {hint}" if hint else ""))


def preview_keys(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"


# ---- building models without allocating latent weights ----------------------------------------

def empty_model(cfg: TerDiTConfig, packed: bool) -> TerDiT:
    with torch.device("meta"):
        model = TerDiT(cfg, packed=packed)
    return model


def finish_model(model: TerDiT, state: dict[str, Tensor]) -> TerDiT:
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
    return finish_model(empty_model(cfg, packed), dict(state))


def ternary_prefixes(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TERNARY_LAYERS)}


def check_tensor_like(t: Tensor, ref: Tensor, where: str, key: str,
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
        check_float(t, where, key, tuple(ref.shape))


def codes_in_features(model: nn.Module) -> dict[str, int]:
    """{state-dict key of k16 codes: in_features} (K is not recoverable from the word count)."""
    return {f"{name}.codes": m.in_features for name, m in ternary_prefixes(model).items()
            if m.packed}


def to_packed(model: TerDiT) -> TerDiT:
    from .ternary import pack_model_
    return pack_model_(model).eval()
