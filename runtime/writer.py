"""A whole sampling run into an output directory, written from what the pipeline's
`sample_batch(indices)` returns (runtime.pipeline.TerDiTPipeline.run decides everything else):

    OUT/samples.json          the model (path, sha256, backend, config), the settings, progress
    OUT/images/NNNNNN.png     image i by global index (the model's channels)
    OUT/grid.png              up to 256 images, captioned with the class names
    OUT/samples.npz           ADM format: arr_0 uint8 NHWC RGB, arr_1 labels
    OUT/latents.npy           with --save-latents, or for a latent model without a VAE
    OUT/written/rank_R.jsonl  the sha256 of each image (and latent) rank R writes, logged before
                              the file is renamed into place

One writer per directory (an advisory lock, OUT/.terdit.lock); a run killed at any point is
resumed by the same command: temporary files it left are removed, finished images are kept,
and the model (by sha256), the backend and every setting must be the ones recorded when the run
started.

What we did not write we never touch or count (`_check_dir`, `_resumed`): a directory without
our samples.json must hold none of our names, and an image or latent counts as resumed only when
its sha256 is one the written/ log recorded for that index; a file there that the log does not
know (a user's own images/000000.png, or one changed since) is refused, never taken as a resumed
image nor replaced. `--overwrite` removes only the files our layout names. --out must not be,
contain or lie inside an input (the model, the VAE, --latents).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from terdit_common.cli import is_out_of_memory
from terdit_common.errors import UserError
from terdit_common.files import (LOCK_NAME, append_text, atomic_write_bytes, atomic_write_json,
                                 check_disjoint, check_writable_dir, file_kind, foreign_entries,
                                 is_temp_name, refuse_foreign, remove_all, remove_stale_temps,
                                 sha256_file)
from terdit_common.images import (grid_columns, npy_bytes, png_bytes, read_png, write_grid,
                                  write_npy, write_npz)
from terdit_common.inputs import read_bytes, read_json_file
from terdit_common.limits import MAX_TEXT_BYTES, short
from terdit_common.locks import output_lock
from terdit_common.manifest import manifest_checksum, seal
from terdit_common.sampling import SamplingError

SAMPLES_FILE = "samples.json"
SAMPLES_FORMAT = "terdit-samples"
SAMPLES_VERSION = 2                 # 2: the written/ log; runs of version 1 are not resumed
RECORD_CHECKSUM = "record_sha256"   # samples.json is sealed like an export's manifest
GRID_MAX = 256
OUTPUT_NAMES = ("images", "latents", "written", SAMPLES_FILE, "grid.png", "samples.npz",
                "latents.npy")
# the files of our directories (image_path, latent_path, the written log)
PER_IMAGE = {"images": re.compile(r"\d{6}\.png"), "latents": re.compile(r"\d{6}\.npy"),
             "written": re.compile(r"rank_\d+\.jsonl")}


def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:06d}.png"


def latent_path(out: Path, index: int) -> Path:
    return out / "latents" / f"{index:06d}.npy"


def written_log(out: Path, rank: int) -> Path:
    return out / "written" / f"rank_{rank}.jsonl"


@dataclass(frozen=True)
class Job:
    """What a run writes, decided by the pipeline: the record (samples.json as the run starts),
    one label per image and the grid's captions, the latent shape a resumed latent must have,
    what is written (images and / or latents), the first batch size, and the inputs the output
    must not touch ({flag: path})."""

    out: Path
    record: dict
    labels: list[int]
    captions: list[str]
    latent_shape: tuple[int, int, int]
    latent_only: bool
    save_latents: bool
    batch_size: int
    inputs: dict


# sample_batch(indices) -> (latents (B, C, H, W), uint8 images (B, H, W, C) or None)
SampleBatch = Callable[[list[int]], tuple[np.ndarray, Optional[np.ndarray]]]


def write_run(job: Job, sample_batch: SampleBatch, *, overwrite: bool = False, rank: int = 0,
              world_size: int = 1, barrier: Optional[Callable[[], None]] = None,
              progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Write what `sample_batch` returns for every image of `job` into job.out, resuming a run
    with the same record; returns the final samples.json record (on rank 0; other ranks return
    the initial one)."""
    out, record, n = job.out, job.record, len(job.labels)
    with contextlib.ExitStack() as stack:
        if rank == 0:
            check_writable_dir(out, "--out")
            check_disjoint(out, "--out", job.inputs)
            _check_dir(out, record, overwrite)       # refuse before creating anything
            stack.enter_context(output_lock(out / LOCK_NAME, f"--out {out}"))
            _prepare(out, record, overwrite)
            remove_stale_temps(out, out / "images", out / "latents")
        if barrier:
            barrier()
        if job.latent_only and rank == 0:
            log("note: latent-space model and no VAE (export with --vae or pass --vae DIR): "
                "writing latents only")
        resumed = _resumed(job, range(rank, n, world_size))
        mine = [i for i in range(rank, n, world_size) if i not in resumed]
        skipped = len(resumed)
        if skipped and rank == 0:
            log(f"resuming: {skipped} image(s) already written")
        t0 = time.time()
        _generate(job, sample_batch, mine, progress, written_log(out, rank))
        elapsed = time.time() - t0
        if barrier:
            barrier()
        if rank != 0:
            return record
        record.update(_finalize(job))
        record["complete"] = True
        record["timing"] = {"seconds": round(elapsed, 3), "images_generated_rank0": len(mine),
                            "images_resumed_rank0": skipped,
                            "images_per_second_rank0": round(len(mine) / elapsed, 3)
                            if elapsed and mine else None, "world_size": world_size}
        record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        atomic_write_json(out / SAMPLES_FILE, seal(record, RECORD_CHECKSUM))
        return record


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    old_model = old.get("model") if isinstance(old.get("model"), dict) else {}
    if old_model.get("sha256") != new["model"]["sha256"]:
        diffs.append(f"model sha256 {str(old_model.get('sha256'))[:12]}... -> "
                     f"{new['model']['sha256'][:12]}... ({new['model']['path']})")
    if old_model.get("backend") != new["model"]["backend"]:
        diffs.append(f"--backend {old_model.get('backend')} -> {new['model']['backend']}")
    old_s = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    new_s = new["settings"]
    for key in sorted(set(old_s) | set(new_s)):
        if old_s.get(key) != new_s.get(key):
            a, b = old_s.get(key), new_s.get(key)
            if key == "labels":
                a, b = f"{len(a or [])} labels", f"{len(b or [])} labels (or other classes)"
            diffs.append(f"{key} {a} -> {b}")
    return diffs


def _read_record(out: Path) -> Optional[dict]:
    """OUT/samples.json when it is a record of ours, None when absent; anything else there is
    not ours (a UserError: we neither resume from it nor replace it)."""
    path = out / SAMPLES_FILE
    if not os.path.lexists(path):
        return None
    fix = (f"so the directory is not a run of this tool and nothing in it is ours to resume or "
           f"replace: move {path} away or choose another --out")
    if path.is_symlink():
        raise SamplingError(f"--out {out}: {path.name} is a symbolic link, {fix}")
    record = read_json_file(path, "--out", fix, error=SamplingError)
    if not (isinstance(record, dict) and record.get("format") == SAMPLES_FORMAT):
        raise SamplingError(f"--out {out}: {path.name} is not a TerDiT Deploy sample record (no "
                            f"format {SAMPLES_FORMAT!r}), {fix}")
    if record.get("version") == SAMPLES_VERSION and \
            record.get(RECORD_CHECKSUM) != manifest_checksum(record, RECORD_CHECKSUM):
        raise SamplingError(f"--out {out}: {path.name} does not match its checksum "
                            f"({RECORD_CHECKSUM}): it was edited, so what it records about the "
                            f"images cannot be trusted; pass --overwrite to start again or choose "
                            f"another --out")
    return record


def _check_version(out: Path, old: dict, overwrite: bool) -> None:
    version = old.get("version")
    if version != SAMPLES_VERSION and not overwrite:
        raise SamplingError(f"--out {out}: its {SAMPLES_FILE} is version {short(version)} of the "
                            f"run format (this tool writes {SAMPLES_VERSION}, which records what "
                            f"it wrote) and cannot be resumed; pass --overwrite or choose another "
                            f"--out")


def _check_dir(out: Path, record: dict, overwrite: bool) -> None:
    """Refuse an output directory that holds another run's samples (unless `overwrite`) or
    anything this tool did not write where it would write (always)."""
    if not out.is_dir():
        return
    old = _read_record(out)
    if old is not None:
        _check_version(out, old, overwrite)
    if old is not None and not overwrite:
        diffs = _differences(old, record)
        if diffs:
            raise SamplingError(f"{out} holds samples of a different run ({'; '.join(diffs[:4])}"
                                f"); choose another --out, rerun with the recorded settings, or "
                                f"pass --overwrite")
    ours = set(OUTPUT_NAMES) | {LOCK_NAME}
    for p in foreign_entries(out, ours.__contains__, PER_IMAGE.__contains__):
        if p.name in ours:                # one of our names of another kind: never ours
            want = "a directory" if p.name in PER_IMAGE else "a file"
            raise SamplingError(f"--out {out}: {p.name} is {file_kind(p.lstat().st_mode)} where "
                                f"this tool writes {want}, so it is not ours to use or replace; "
                                f"move it away or choose another --out")
    if old is None:
        # without a record of ours, nothing named like our outputs is ours
        taken = [n for n in OUTPUT_NAMES if os.path.lexists(out / n) and n not in PER_IMAGE]
        if taken:
            raise SamplingError(f"--out {out}: holds {taken[0]} but no {SAMPLES_FILE} of this "
                                f"tool, so it was not written by a sampling run and will not be "
                                f"replaced: move it away or choose another --out")
    for name, pattern in PER_IMAGE.items():
        refuse_foreign(out / name, lambda n, p=pattern: old is not None and p.fullmatch(n),
                       "--out", f"only files a run recorded in {out / SAMPLES_FILE} wrote count "
                                f"as resumed or are replaced")
    foreign = [p.name for p in foreign_entries(out, ours.__contains__, PER_IMAGE.__contains__)]
    if foreign and not overwrite and old is None:
        raise SamplingError(f"--out {out} exists and is not a sample directory (it holds "
                            f"{', '.join(sorted(foreign)[:3])}); choose another --out or pass "
                            f"--overwrite")


def _prepare(out: Path, record: dict, overwrite: bool) -> None:
    """Under the lock: check again (another run may have finished in between), then clear an
    overwritten run (only the files our layout names) and write samples.json."""
    _check_dir(out, record, overwrite)
    if (out / SAMPLES_FILE).is_file() and not overwrite:
        for name in PER_IMAGE:                    # a resumed run's directories, as they were
            (out / name).mkdir(exist_ok=True)     # (or again, if someone removed them)
        return
    path = out / SAMPLES_FILE
    if overwrite:
        for name, pattern in PER_IMAGE.items():
            if (out / name).is_dir():
                remove_all(f for f in (out / name).iterdir()
                           if pattern.fullmatch(f.name) or is_temp_name(f.name))
        remove_all(out / name for name in (SAMPLES_FILE, "grid.png", "samples.npz",
                                           "latents.npy"))
    # samples.json first: a run killed before it was written left nothing of its own
    atomic_write_json(path, seal(record, RECORD_CHECKSUM))
    for name in PER_IMAGE:
        (out / name).mkdir(exist_ok=True)


def _resumed(job: Job, indices) -> set[int]:
    """The images of `indices` a run of this record already wrote: every file of the image is
    there with a sha256 the written/ log recorded for it. A file there that the log does not
    know is not ours: a SamplingError naming it (we neither count nor replace it)."""
    logged: dict[int, set[tuple[str, str]]] = {}
    log_dir = job.out / "written"
    for path in sorted(log_dir.glob("rank_*.jsonl")) if log_dir.is_dir() else ():
        text = read_bytes(path, "--out", "it is this run's log of written files: pass "
                          "--overwrite to start again", MAX_TEXT_BYTES, "MAX_TEXT_BYTES")
        for line in text.decode(errors="replace").splitlines():
            entry = _log_entry(line)            # a line cut by a kill is skipped
            if entry is not None:
                logged.setdefault(entry[0], set()).add(entry[1:])
    done = set()
    for i in indices:
        files = {"png": None if job.latent_only else image_path(job.out, i),
                 "npy": latent_path(job.out, i) if job.save_latents else None}
        present = {kind: p for kind, p in files.items() if p is not None and os.path.lexists(p)}
        pairs = logged.get(i, set())
        known = {("png", png) for png, _ in pairs} | {("npy", npy) for _, npy in pairs}
        for kind, p in present.items():
            if p.is_symlink() or not p.is_file() or (kind, sha256_file(p)) not in known:
                raise SamplingError(f"--out {job.out}: {p.relative_to(job.out)} is not a file this "
                                    f"run wrote (its content is not in {log_dir.name}/); it is "
                                    f"neither counted nor replaced: move it away to sample it "
                                    f"again, or choose another --out")
        if all(p is None or kind in present for kind, p in files.items()):
            done.add(i)
    return done


def _log_entry(line: str) -> Optional[tuple[int, str, str]]:
    """(index, png sha256, npy sha256) of one written/ log line, None for a damaged line."""
    try:
        entry = json.loads(line)
        return int(entry["i"]), str(entry.get("png")), str(entry.get("npy"))
    except (ValueError, KeyError, TypeError):
        return None


def _generate(job: Job, sample_batch: SampleBatch, todo: list[int], progress: bool,
              log_file: Path) -> None:
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="img", desc="sampling", dynamic_ncols=True)
    batch = job.batch_size
    pos = 0
    try:
        while pos < len(todo):
            idx = todo[pos:pos + batch]
            try:
                lat, images = sample_batch(idx)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
                if is_out_of_memory(err) and batch > 1:
                    batch = max(1, batch // 2)
                    msg = f"out of memory: batch size halved to {batch}"
                    (bar.write if bar else print)(msg)
                    continue
                raise
            files = [(image_path(job.out, i), png_bytes(images[j]) if images is not None
                      else None, latent_path(job.out, i), npy_bytes(lat[j])
                      if job.save_latents else None) for j, i in enumerate(idx)]
            # the log first: a file renamed into place is then always one the log knows
            append_text(log_file, "".join(json.dumps({
                "i": i, "png": _sha(png), "npy": _sha(npy)}) + "\n"
                for i, (_, png, _, npy) in zip(idx, files)))
            for png_path, png, npy_path, npy in files:
                if npy is not None:
                    atomic_write_bytes(npy_path, npy)
                if png is not None:
                    atomic_write_bytes(png_path, png)
            pos += len(idx)
            if bar:
                bar.update(len(idx))
    finally:
        if bar:
            bar.close()


def _sha(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _finalize(job: Job) -> dict:
    out, n = job.out, len(job.labels)
    result: dict = {}
    if job.save_latents:
        lats = np.stack([np.load(latent_path(out, i), allow_pickle=False) for i in range(n)])
        write_npy(out / "latents.npy", lats)
    if job.latent_only:
        return result
    images = []
    for i in range(n):
        img = read_png(image_path(out, i))
        if img is None:
            raise SamplingError(f"image {i} is missing after sampling ({image_path(out, i)})")
        images.append(img)
    arr = np.stack(images)
    write_npz(out / "samples.npz", arr, np.asarray(job.labels, dtype=np.int64))
    shown = min(n, GRID_MAX)
    write_grid(out / "grid.png", arr[:shown], job.captions[:shown],
               ncols=grid_columns(job.labels, shown))
    result["files"] = {name: sha256_file(out / name) for name in ("samples.npz", "grid.png")}
    return result
