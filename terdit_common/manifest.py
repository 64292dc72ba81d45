"""The export directory written by `python -m exporter` and read by every runtime backend.

    model.onnx (+ model.onnx.data)   the graph with terdit::TernaryMatMul nodes
    config.json + model.safetensors  the same packed weights as a TerDiT Deploy checkpoint, so
                                     the PyTorch backend runs from the export alone
    vae_decoder.onnx                 optional
    manifest.json                    config, contract, options, validation, and the sha256 of
                                     every file above

`open_export` checks the manifest's fields and the sha256 of every file it lists (streamed, once
per open), so a changed byte anywhere is refused before any sampling starts.

A directory is an export when it holds a file only an export holds (`is_export_dir`, the one
place that decides "export or checkpoint"): an export whose manifest was deleted (or replaced
by a directory) is refused, never read as a plain checkpoint with unverified weights. Only the
files the manifest lists are used (an unlisted vae_decoder.onnx is refused).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .files import is_temp_name, sha256_file
from .inputs import input_file, read_json_file
from .guidance import CFG_MODES
from .limits import MAX_WEIGHTS_BYTES, check_model_config, is_int, short
from .sampling import ModelInfo

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "terdit-onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
VAE_FILE = "vae_decoder.onnx"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "model.plan"                  # `python -m runtime build-engine`'s default output
PLAN_RECORD_FILE = PLAN_FILE + ".json"    # its build record
CHECKSUM_FIELD = "manifest_sha256"
# Every name an export directory may hold (the exporter's files, and the TensorRT plan
# build-engine writes beside them): `--overwrite` replaces only a directory of these.
EXPORT_FILES = (MANIFEST_FILE, MODEL_FILE, DATA_FILE, VAE_FILE, CONFIG_FILE, WEIGHTS_FILE,
                PLAN_FILE, PLAN_RECORD_FILE)
REEXPORT = "re-export the model with `python -m exporter`"


def manifest_checksum(manifest: dict, field: str = CHECKSUM_FIELD) -> str:
    """sha256 of a record's canonical JSON without its own checksum `field`: a changed value
    anywhere in manifest.json (or a run's samples.json) is detected like a changed byte in the
    files it lists."""
    body = {k: v for k, v in manifest.items() if k != field}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def seal(manifest: dict, field: str = CHECKSUM_FIELD) -> dict:
    return {**manifest, field: manifest_checksum(manifest, field)}


# what only an export directory holds (a checkpoint directory holds config.json and
# model.safetensors too)
EXPORT_ONLY_FILES = (MANIFEST_FILE, MODEL_FILE, DATA_FILE, VAE_FILE, PLAN_FILE, PLAN_RECORD_FILE)


def is_export_dir(path: str | os.PathLike) -> bool:
    """A directory holding any file only an export holds (manifest.json, model.onnx, its data,
    the VAE decoder, a plan or its record; of any kind, even a broken link or a directory) is an
    export: it is read only through its manifest (`read_manifest`), never as a checkpoint."""
    path = Path(path)
    return path.is_dir() and any(os.path.lexists(path / name) for name in EXPORT_ONLY_FILES)


def is_export_file(name: str) -> bool:
    return name in EXPORT_FILES


def export_dir_of(path: str | os.PathLike) -> Optional[Path]:
    """The export directory that model path `path` names: the directory itself, or the one
    holding the given file when it is one of an export's own (model.onnx, a .plan); None for a
    checkpoint or a lone ONNX file of another name."""
    path = Path(path)
    if is_export_dir(path):
        return path
    if not path.is_dir() and (path.suffix == ".plan" or path.name in EXPORT_ONLY_FILES) \
            and is_export_dir(path.parent):
        return path.parent
    return None


def files_record(directory: Path) -> dict[str, dict[str, Any]]:
    """{name: {sha256, bytes}} of every regular file in `directory` except the manifest."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}


def read_manifest(export_dir: str | os.PathLike) -> dict:
    """The manifest as a dict, with its required fields checked (UserError naming the field)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_FILE
    if not os.path.lexists(path):
        held = [name for name in EXPORT_ONLY_FILES if os.path.lexists(export_dir / name)]
        if held:
            raise UserError(f"{export_dir}: holds {held[0]} but no {MANIFEST_FILE}: an export "
                            f"directory is read only with its manifest (the sha256 of every "
                            f"file), never as a plain checkpoint; {REEXPORT}")
        raise UserError(f"{export_dir}: no {MANIFEST_FILE}; pass a directory written by "
                        f"`python -m exporter`, or a checkpoint with --backend torch")
    manifest = read_json_file(path, fix=f"an export's manifest is the file the exporter "
                                        f"wrote: {REEXPORT}")

    def need(cond: bool, field: str, found: Any, want: str) -> None:
        if not cond:
            raise UserError(f"{path}: field {field!r} is {short(found)}, expected {want}; "
                            f"re-export the model")

    need(isinstance(manifest, dict), "<top level>", type(manifest).__name__, "a JSON object")
    if manifest.get(CHECKSUM_FIELD) != manifest_checksum(manifest):
        raise UserError(f"{path}: its content does not match its checksum ({CHECKSUM_FIELD}); "
                        f"the manifest was edited or corrupted (or written by an older "
                        f"version): re-export the model")
    need(manifest.get("format") == MANIFEST_FORMAT, "format", manifest.get("format"),
         repr(MANIFEST_FORMAT))
    need(isinstance(manifest.get("config"), dict), "config", manifest.get("config"),
         "an object of model config fields")
    files = manifest.get("files")
    need(isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()),
        "files", files, "an object {name: {sha256, bytes}}")
    for name, entry in files.items():
        size = entry.get("bytes")
        need(size is None or (is_int(size) and 0 <= size <= MAX_WEIGHTS_BYTES),
             f"files.{name}.bytes", size, f"a size from 0 to {MAX_WEIGHTS_BYTES} bytes "
                                          f"(limits.MAX_WEIGHTS_BYTES)")
    need(MODEL_FILE in files, "files", sorted(files), f"an entry for {MODEL_FILE}")
    for name in files:
        need(name == Path(name).name and not name.startswith("."), "files", name,
             "plain file names inside the export directory")
    need(isinstance(manifest.get("graph", {}), dict), "graph", manifest.get("graph"),
         "an object")
    return manifest


def verify_files(export_dir: str | os.PathLike, manifest: dict,
                 names: Optional[list[str]] = None) -> dict[str, str]:
    """sha256 of every file the manifest lists (or of `names`), compared with the manifest; a
    missing or changed file is a UserError naming it. Returns {name: sha256}."""
    export_dir = Path(export_dir)
    hashes = {}
    for name, entry in manifest["files"].items():
        if names is not None and name not in names:
            continue
        path = export_dir / name
        if not os.path.lexists(path):
            raise UserError(f"{path}: listed in {MANIFEST_FILE} but missing; re-export the model "
                            f"or restore the file")
        size = input_file(path, "", f"it is listed in {MANIFEST_FILE}: {REEXPORT}",
                          MAX_WEIGHTS_BYTES, "MAX_WEIGHTS_BYTES").stat().st_size
        if entry.get("bytes") is not None and size != entry["bytes"]:
            raise UserError(f"{path}: content differs from {MANIFEST_FILE} ({size} bytes, "
                            f"recorded {entry['bytes']}); the file was truncated or changed: "
                            f"{REEXPORT}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise UserError(f"{path}: content differs from {MANIFEST_FILE} (sha256 {digest[:16]}"
                            f"..., recorded {str(entry['sha256'])[:16]}...); the file was "
                            f"changed or corrupted: re-export the model")
        hashes[name] = digest
    return hashes


def refuse_unlisted(export_dir: Path, manifest: dict) -> None:
    """An export directory holds only the regular files its manifest lists, TensorRT plans and
    their build records (build-engine's outputs, checked by their records), and locks and
    temporaries of ours: ONNX Runtime resolves a model's external data by name, so an unlisted
    file there could be read as unverified weights."""
    for entry in sorted(export_dir.iterdir()):
        name = entry.name
        if name in manifest["files"] or name == MANIFEST_FILE or is_temp_name(name) or \
                name.endswith((".plan", ".plan.json")) or \
                (name.startswith(".") and name.endswith(".lock")):
            continue                         # the listed files' kinds: verify_files
        raise UserError(f"{export_dir}: holds {name}, which its {MANIFEST_FILE} does not list; "
                        f"an export is read only with the files it lists (ONNX Runtime could "
                        f"take an unlisted one for weight data): move it away or {REEXPORT}")


def open_export(export_dir: str | os.PathLike) -> tuple[dict, ModelInfo]:
    """The checked manifest of an export directory (every listed file hashed and compared) and
    the ModelInfo it describes (sha256 = model.onnx's): what every backend opens an export
    with."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    refuse_unlisted(export_dir, manifest)
    hashes = verify_files(export_dir, manifest)
    graph = manifest.get("graph", {})
    folded = graph.get("cfg") if graph.get("cfg") in CFG_MODES else None
    metadata = manifest.get("metadata")
    if metadata is None:                                   # exports before self-contained dirs
        metadata = manifest.get("source", {}).get("metadata", {})
    if not isinstance(metadata, dict):
        raise UserError(f"{export_dir / MANIFEST_FILE}: field 'metadata' is "
                        f"{type(metadata).__name__}, expected an object; re-export the model")
    info = ModelInfo(manifest["config"], str(export_dir / MODEL_FILE), hashes[MODEL_FILE],
                     folded, metadata)
    _check_config(export_dir, info)
    return manifest, info


def _check_config(where: Path, info: ModelInfo) -> None:
    try:
        check_model_config(info.config)
    except ValueError as err:
        raise UserError(f"{where / MANIFEST_FILE}: field 'config': {err}; re-export the "
                           f"model") from None
