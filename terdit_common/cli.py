"""Command-line pieces shared by `python -m runtime sample`, `python -m terdit.evaluate` and the
trainer's previews: one set of sampling flags, names and defaults (SampleOptions)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import UserError
from .sampling import SampleOptions
from .schedulers import SAMPLERS

DEFAULTS = SampleOptions()


def add_sampling_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--sampler", default=DEFAULTS.sampler, metavar="{" + ",".join(SAMPLERS) + "}",
                   help="ddpm: IDDPM ancestral with learned variance (the official default, with "
                        "250 steps); ddim; dpm-solver: DPM-Solver++(2M); or diffusers:CLASS, a "
                        "diffusers scheduler such as diffusers:UniPCMultistepScheduler (needs "
                        "diffusers and torch) (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps,
                   help="sampling steps, respaced as the official code does (default: "
                        "%(default)s)")
    p.add_argument("--eta", type=float, default=DEFAULTS.eta,
                   help="DDIM eta; 0 is deterministic (default: %(default)s)")
    p.add_argument("--cfg-scale", "--cfg", dest="cfg_scale", type=float,
                   default=DEFAULTS.cfg_scale, metavar="SCALE",
                   help="classifier-free guidance scale; 1 disables it (default: %(default)s)")
    p.add_argument("--cfg-mode", choices=("official", "standard"), default=argparse.SUPPRESS,
                   help="official: guide eps channels 0..2 (the TerDiT release; default for "
                        "4-channel latents); standard: all eps channels (default otherwise)")
    p.add_argument("--clip-denoised", dest="clip_denoised", action="store_true",
                   default=argparse.SUPPRESS,
                   help="clamp each predicted x_0 to [-1, 1] (default: on for pixel-space "
                        "models, off for latent models as in the official sampler)")
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false",
                   default=argparse.SUPPRESS, help="never clamp the predicted x_0")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="image i's noise depends on (seed, i) only (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help="images per forward (default: %(default)s)")


def sample_options(args: argparse.Namespace, **overrides) -> SampleOptions:
    """SampleOptions from parsed `add_sampling_args` flags (ValueError names the flag)."""
    fields = {name: getattr(args, name) for name in
              ("sampler", "steps", "eta", "cfg_scale", "seed", "batch_size")}
    fields["cfg_mode"] = getattr(args, "cfg_mode", None)
    fields["clip_denoised"] = getattr(args, "clip_denoised", None)
    fields.update(overrides)
    return SampleOptions(**fields)


def run_cli(handler: Callable[[], int]) -> int:
    """Run a CLI body: bad input (ValueError, UserError) and OS errors become one line on stderr
    and exit code 2."""
    from .files import os_error_message
    try:
        return handler()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: input nested too deeply to parse", file=sys.stderr)
        return 2


__all__ = ["DEFAULTS", "add_sampling_args", "sample_options", "run_cli", "UserError"]
