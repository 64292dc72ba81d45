"""Shared test helpers."""
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Optional

import torch

from terdit import TerDiT, TerDiTConfig


def random_model(cfg: TerDiTConfig, std: float = 0.05, seed: Optional[int] = None) -> TerDiT:
    """A latent TerDiT whose every parameter is perturbed: the zero-initialised adaLN and final
    layers would otherwise make outputs trivially equal and hide bugs."""
    if seed is not None:
        torch.manual_seed(seed)
    model = TerDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def pixel_checkpoint(path, seed: int = 0, num_classes: int = 3, n_layers: int = 2,
                     class_names=None, fp: bool = False):
    """A tiny 1-channel 8x8 pixel-space model saved as a checkpoint directory (returns it)."""
    from terdit import save_checkpoint
    cfg = TerDiTConfig(input_size=8, patch_size=2, in_channels=1, dim=32, n_layers=n_layers,
                       n_heads=2, multiple_of=32, num_classes=num_classes, ternary=not fp)
    metadata = {"class_names": list(class_names)} if class_names else None
    return save_checkpoint(random_model(cfg, seed=seed), path, metadata=metadata)


def latent_checkpoint(path, seed: int = 0):
    """A tiny 4-channel 8x8 latent model (3 classes) saved as a checkpoint directory."""
    from terdit import save_checkpoint
    cfg = TerDiTConfig(input_size=8, patch_size=2, in_channels=4, dim=32, n_layers=1, n_heads=2,
                       multiple_of=32, num_classes=3)
    return save_checkpoint(random_model(cfg, seed=seed), path)


def tiny_vae(path, block_out_channels=(8, 16)):
    """A small randomly initialised diffusers AutoencoderKL (4 latent channels, 2x2 upsampling
    per block) saved to `path`; needs diffusers."""
    import diffusers
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=block_out_channels,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  layers_per_block=1, norm_num_groups=8)
    vae.save_pretrained(path)
    return vae


def cli_main(tool: str):
    """main(argv) of one of our command lines: exporter, runtime, train or evaluate."""
    if tool == "exporter":
        from exporter.export_cli import main
    elif tool == "runtime":
        from runtime.runtime_cli import main
    elif tool == "train":
        from terdit.train import main
    else:
        from terdit.evaluate import main
    return main


def run_cli_case(argv, work, base, capsys):
    """(exit code, stderr) of `argv` ([tool, *args] with {T} = work and {B} = base) run in
    process; argparse's own usage errors count as their exit code."""
    capsys.readouterr()
    args = [a.replace("{T}", str(work)).replace("{B}", str(base)) for a in argv[1:]]
    try:
        code = cli_main(argv[0])(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


def assert_one_error_line(name, code, err, pattern) -> str:
    """Exit code 2, no traceback, and stderr ending with exactly one `error:` line that matches
    `pattern`; returns that line."""
    assert code == 2, (name, code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], (name, err)
    assert re.search(pattern, errors[0]), (name, errors[0])
    return errors[0]


def all_of(*setups):
    """One case setup (tmp, base) -> None running `setups` in order."""
    def setup(tmp, base):
        for fn in setups:
            fn(tmp, base)
    return setup


def case_dir(tmp_path: Path, base: Path, setup=None) -> Path:
    """A case's own directory ({T} in its argv), filled by `setup(work, base)`."""
    work = tmp_path / "w"
    work.mkdir()
    if setup:
        setup(work, base)
    return work


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_state(root: Path) -> dict:
    """Every path under `root` (links not followed) with its kind and content: a regular file
    by sha256, a symbolic link by its target (and the target's sha256 when it is a file), a FIFO
    by its kind (it is never opened). Equal before and after a case: nothing of the user's
    changed."""
    state = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            target = Path(os.readlink(p))
            state[rel] = ("link", str(target), _digest(target) if target.is_file() else None)
        elif stat.S_ISFIFO(mode):
            state[rel] = ("fifo",)
        elif stat.S_ISREG(mode):
            state[rel] = ("file", _digest(p))
        else:
            state[rel] = ("dir",)
    return state
