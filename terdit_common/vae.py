"""The SD-VAE latent convention and offline resolution of hub-style VAE names."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .errors import UserError

# SD-VAE latents are scaled by this factor (official TerDiT / DiT sampling divides by it).
VAE_SCALE = 0.18215
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


def resolve_vae(spec: str, cache: Optional[Path] = None) -> Path:
    """A --vae value as a local path: an existing file / directory as given, or a hub name such
    as `stabilityai/sd-vae-ft-ema` resolved in the local cache only (no download is possible
    here): models--ORG--NAME/snapshots/<refs/main or the only snapshot>."""
    path = Path(spec)
    if path.exists() or not _HUB_NAME.match(spec):
        return path
    cache = cache or hf_hub_cache()
    repo = cache / ("models--" + spec.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"--vae {spec}: {len(found)} snapshots in {snapshots} and no refs/main; "
                        f"pass the snapshot directory itself")
    raise UserError(f"--vae {spec}: not a local path and not in the Hugging Face cache ({repo} "
                    f"does not exist); downloads are not possible here, so copy the model into "
                    f"the cache (or set HF_HUB_CACHE) or pass a local diffusers directory")
