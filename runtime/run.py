"""A whole sampling run into an output directory:

    OUT/samples.json          the model (path, sha256, backend, config), the settings, progress
    OUT/images/NNNNNN.png     image i by global index (the model's channels)
    OUT/grid.png              up to 256 images, captioned with the class names
    OUT/samples.npz           ADM format: arr_0 uint8 NHWC RGB, arr_1 labels
    OUT/latents.npy           with --save-latents, or for a latent model without a VAE

One writer per directory (an advisory lock, OUT/.terdit.lock); a run killed at any point is
resumed by the same command: temporary files it left are removed, finished images are kept,
and the model (by sha256), the backend and every setting must be the ones recorded when the run
started.

What we did not write we never touch or count (`_check_dir`): samples.json is written first, so
images/ and latents/ hold only files written after a record of ours existed; a directory without
our samples.json must hold none of them (a user's own images/000000.png is refused, never taken
as a resumed image), and `--overwrite` removes only the files our layout names. --out must not
be, contain or lie inside the model or the VAE.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from terdit_common.cli import is_out_of_memory
from terdit_common.errors import UserError
from terdit_common.files import (LOCK_NAME, atomic_write_bytes, atomic_write_json,
                                 check_disjoint, check_writable_dir, foreign_entries,
                                 is_temp_name, output_lock, refuse_foreign, remove_all,
                                 remove_stale_temps)
from terdit_common.inputs import read_json_file
from terdit_common.limits import MAX_IMAGES
from terdit_common.manifest import export_dir_of
from terdit_common.images import (grid_columns, png_bytes, read_png, write_grid, write_npy,
                                  write_npz)
from terdit_common.sampling import (SampleOptions, SamplingError, check_model_options,
                                    resolve_clip)

SAMPLES_FILE = "samples.json"
SAMPLES_FORMAT = "terdit-samples"
GRID_MAX = 256
OUTPUT_NAMES = ("images", "latents", SAMPLES_FILE, "grid.png", "samples.npz", "latents.npy")
# the files of images/ and latents/ (image_path, latent_path)
PER_IMAGE = {"images": re.compile(r"\d{6}\.png"), "latents": re.compile(r"\d{6}\.npy")}


def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:06d}.png"


def latent_path(out: Path, index: int) -> Path:
    return out / "latents" / f"{index:06d}.npy"


def run_to_dir(pipe, out: Path, labels: list[int], options: SampleOptions, *,
               initial_latents: Optional[np.ndarray] = None, save_latents: bool = False,
               overwrite: bool = False, rank: int = 0, world_size: int = 1,
               barrier: Optional[Callable[[], None]] = None, progress: bool = True,
               extra_settings: Optional[dict] = None,
               log: Callable[[str], None] = print) -> dict:
    """Sample `labels` (one image each) into `out`; returns the final samples.json record (on
    rank 0; other ranks return the initial one)."""
    n = len(labels)
    if not 1 <= n <= MAX_IMAGES:
        raise SamplingError(f"--num {n}: must be from 1 to {MAX_IMAGES} images")
    info = pipe.info
    check_model_options(info, options)
    if initial_latents is not None:
        want = (n, info.in_channels, info.input_size, info.input_size)
        if initial_latents.shape != want:
            raise SamplingError(f"--latents has shape {initial_latents.shape}, expected {want} "
                                f"(one latent per image)")
    latent_only = not pipe.pixel_space and pipe.vae is None
    save_latents = save_latents or latent_only
    settings = {**options.result_settings(),
                "cfg_mode": pipe.cfg_mode(options) if options.cfg_scale != 1.0 else None,
                "clip_denoised": resolve_clip(info, options),
                "labels": [int(v) for v in labels], "num_images": n,
                "initial_latents_sha256": None if initial_latents is None else
                hashlib.sha256(np.ascontiguousarray(initial_latents).tobytes()).hexdigest(),
                **(extra_settings or {})}
    record = {"format": SAMPLES_FORMAT, "version": 1,
              "model": {"path": info.source, "sha256": info.sha256,
                        "backend": pipe.backend.name, "config": info.config},
              "settings": settings,
              "vae": getattr(pipe.vae, "source", None),
              "outputs": {"images": None if latent_only else "images/NNNNNN.png",
                          "grid": None if latent_only else "grid.png",
                          "npz": None if latent_only else "samples.npz",
                          "latents": "latents.npy" if save_latents else None},
              "complete": False}
    with contextlib.ExitStack() as stack:
        if rank == 0:
            check_writable_dir(out, "--out")
            check_disjoint(out, "--out", _inputs(pipe))
            _check_dir(out, record, overwrite)       # refuse before creating anything
            stack.enter_context(output_lock(out / LOCK_NAME, f"--out {out}"))
            _prepare(out, record, overwrite)
            remove_stale_temps(out, out / "images", out / "latents")
        if barrier:
            barrier()
        if latent_only and rank == 0:
            log("note: latent-space model and no VAE (export with --vae or pass --vae DIR): "
                "writing latents only")
        mine = [i for i in range(rank, n, world_size)
                if not _done(pipe, out, i, latent_only, save_latents)]
        skipped = len(range(rank, n, world_size)) - len(mine)
        if skipped and rank == 0:
            log(f"resuming: {skipped} image(s) already written")
        t0 = time.time()
        _generate(pipe, out, mine, labels, options, initial_latents, latent_only, save_latents,
                  progress and rank == 0)
        elapsed = time.time() - t0
        if barrier:
            barrier()
        if rank != 0:
            return record
        record.update(_finalize(pipe, out, n, labels, latent_only, save_latents))
        record["complete"] = True
        record["timing"] = {"seconds": round(elapsed, 3), "images_generated_rank0": len(mine),
                            "images_resumed_rank0": skipped,
                            "images_per_second_rank0": round(len(mine) / elapsed, 3)
                            if elapsed and mine else None, "world_size": world_size}
        record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        atomic_write_json(out / SAMPLES_FILE, record)
        return record


def _inputs(pipe) -> dict:
    """What a run reads: the model (an export's directory for its model.onnx) and the VAE."""
    model = export_dir_of(pipe.info.source) or Path(pipe.info.source)
    vae = getattr(pipe.vae, "source", None)
    return {"--model": model, "--vae": vae if vae and Path(vae).exists() else None}


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
    return record


def _check_dir(out: Path, record: dict, overwrite: bool) -> None:
    """Refuse an output directory that holds another run's samples (unless `overwrite`) or
    anything this tool did not write where it would write (always)."""
    if not out.is_dir():
        return
    old = _read_record(out)
    if old is not None and not overwrite:
        diffs = _differences(old, record)
        if diffs:
            raise SamplingError(f"{out} holds samples of a different run ({'; '.join(diffs[:4])}"
                                f"); choose another --out, rerun with the recorded settings, or "
                                f"pass --overwrite")
    for name in PER_IMAGE:
        sub = out / name
        if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
            raise SamplingError(f"--out {out}: {name} is not a directory this tool made (a "
                                f"symbolic link or a file); move it away or choose another --out")
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
    ours = set(OUTPUT_NAMES) | {LOCK_NAME}
    foreign = [p.name for p in foreign_entries(out, ours.__contains__)]
    if foreign and not overwrite and old is None:
        raise SamplingError(f"--out {out} exists and is not a sample directory (it holds "
                            f"{', '.join(sorted(foreign)[:3])}); choose another --out or pass "
                            f"--overwrite")


def _prepare(out: Path, record: dict, overwrite: bool) -> None:
    """Under the lock: check again (another run may have finished in between), then clear an
    overwritten run (only the files our layout names) and write samples.json."""
    _check_dir(out, record, overwrite)
    if (out / SAMPLES_FILE).is_file() and not overwrite:
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
    atomic_write_json(path, record)
    (out / "images").mkdir(exist_ok=True)
    (out / "latents").mkdir(exist_ok=True)


def _done(pipe, out: Path, i: int, latent_only: bool, save_latents: bool) -> bool:
    if save_latents:
        try:
            lat = np.load(latent_path(out, i), allow_pickle=False)
        except (OSError, ValueError):
            return False
        info = pipe.info
        if lat.shape != (info.in_channels, info.input_size, info.input_size):
            return False
    return latent_only or read_png(image_path(out, i)) is not None


def _generate(pipe, out: Path, todo: list[int], labels, options: SampleOptions,
              initial: Optional[np.ndarray], latent_only: bool, save_latents: bool,
              progress: bool) -> None:
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="img", desc="sampling", dynamic_ncols=True)
    batch = options.batch_size
    pos = 0
    try:
        while pos < len(todo):
            idx = todo[pos:pos + batch]
            try:
                lat = pipe.sample(idx, [labels[i] for i in idx], options,
                                  None if initial is None else initial[idx])
                images = None if latent_only else pipe.decode(lat)
            except (SamplingError, UserError):
                raise
            except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
                if is_out_of_memory(err) and batch > 1:
                    batch = max(1, batch // 2)
                    msg = f"out of memory: batch size halved to {batch}"
                    (bar.write if bar else print)(msg)
                    continue
                raise
            for j, i in enumerate(idx):
                if save_latents:
                    write_npy(latent_path(out, i), lat[j])
                if images is not None:
                    atomic_write_bytes(image_path(out, i), png_bytes(images[j]))
            pos += len(idx)
            if bar:
                bar.update(len(idx))
    finally:
        if bar:
            bar.close()


def _finalize(pipe, out: Path, n: int, labels, latent_only: bool, save_latents: bool) -> dict:
    from terdit_common.files import sha256_file
    result: dict = {}
    if save_latents:
        lats = np.stack([np.load(latent_path(out, i), allow_pickle=False) for i in range(n)])
        write_npy(out / "latents.npy", lats)
    if latent_only:
        return result
    images = []
    for i in range(n):
        img = read_png(image_path(out, i))
        if img is None:
            raise SamplingError(f"image {i} is missing after sampling ({image_path(out, i)})")
        images.append(img)
    arr = np.stack(images)
    write_npz(out / "samples.npz", arr, np.asarray(labels, dtype=np.int64))
    shown = min(n, GRID_MAX)
    caps = [pipe.info.caption(int(v)) for v in labels[:shown]]
    write_grid(out / "grid.png", arr[:shown], caps, ncols=grid_columns(labels, shown))
    result["files"] = {name: sha256_file(out / name) for name in ("samples.npz", "grid.png")}
    return result
