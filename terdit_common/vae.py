"""The SD-VAE latent convention, offline resolution of hub-style VAE names and the checks of a
diffusers AutoencoderKL directory made before diffusers reads it."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .errors import UserError
from .inputs import read_json_file
from .limits import VAE_INT_BOUNDS, VAE_MAX_BLOCK_CHANNELS, VAE_MAX_BLOCKS, is_int

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
    try:
        commit = ref.read_text().strip() if ref.is_file() else ""
    except (OSError, UnicodeDecodeError):
        commit = ""                                   # unreadable: look at the snapshots
    if re.fullmatch(r"[0-9A-Za-z]+", commit) and (snapshots / commit).is_dir():
        return snapshots / commit
    found = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"--vae {spec}: {len(found)} snapshots in {snapshots} and no refs/main; "
                        f"pass the snapshot directory itself")
    raise UserError(f"--vae {spec}: not a local path and not in the Hugging Face cache ({repo} "
                    f"does not exist); downloads are not possible here, so copy the model into "
                    f"the cache (or set HF_HUB_CACHE) or pass a local diffusers directory")


def read_vae_config(directory: Path, flag: str = "--vae",
                    latent_channels: Optional[int] = None) -> dict:
    """The config.json of a diffusers AutoencoderKL directory, checked before diffusers builds
    the model from it (a typo such as block_out_channels [100000] would allocate hundreds of
    GB): a JSON object whose sizes are within limits.VAE_* and whose latent_channels is
    `latent_channels` (the model's) when given. UserError naming the flag and the file."""
    fix = "pass a diffusers AutoencoderKL directory"
    where = f"{flag} {directory}: config.json"
    config = read_json_file(Path(directory) / "config.json", flag, fix)
    if not isinstance(config, dict):
        raise UserError(f"{where}: holds a JSON {type(config).__name__}, expected an object; "
                        f"{fix}")
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise UserError(f"{where}: _class_name is {str(name)[:60]!r}, not AutoencoderKL; pass "
                        f"the VAE's directory (e.g. the 'vae' folder of a pipeline)")
    for field, (lo, hi) in VAE_INT_BOUNDS.items():
        v = config.get(field)
        if v is not None and (not is_int(v) or not lo <= v <= hi):
            raise UserError(f"{where}: {field}={str(v)[:40]}: must be an integer from {lo} to "
                            f"{hi}")
    blocks = config.get("block_out_channels")
    if blocks is not None and (
            not isinstance(blocks, list) or not 1 <= len(blocks) <= VAE_MAX_BLOCKS
            or not all(is_int(c) and 1 <= c <= VAE_MAX_BLOCK_CHANNELS for c in blocks)):
        raise UserError(f"{where}: block_out_channels={str(blocks)[:60]}: must be a list of 1 to "
                        f"{VAE_MAX_BLOCKS} integers from 1 to {VAE_MAX_BLOCK_CHANNELS}")
    have = config.get("latent_channels", 4)
    if latent_channels is not None and have != latent_channels:
        raise UserError(f"{where}: latent_channels={have}, but the model's latents have "
                        f"{latent_channels} channels; pass the VAE the model was trained with")
    return config
