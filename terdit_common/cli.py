"""Command-line pieces shared by `python -m runtime sample`, `python -m terdit.evaluate` and the
trainer's previews: one set of sampling flags, names and defaults (SampleOptions), and `run_cli`,
the one way every CLI ends: bad input is one `error:` line and exit code 2, Ctrl-C or SIGTERM one
`interrupted:` line and exit code 130."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

from .entry import EXIT_INTERRUPTED
from .errors import UserError
from .guidance import CFG_MODES
from .limits import MAX_WORLD_SIZE
from .op import ACT_QUANT
from .sampling import SampleOptions, check_eta_given
from .schedulers import SAMPLERS

DEFAULTS = SampleOptions()


SAMPLING_FIELDS = ("sampler", "steps", "eta", "cfg_scale", "seed", "batch_size")


def add_sampling_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The sampling flags. None (or absent) means "not given": `sample_options` fills in the
    defaults, and `given_sampling_flags` tells which ones a user passed."""
    p.add_argument("--sampler", default=None, metavar="{" + ",".join(SAMPLERS) + "}",
                   help=f"ddpm: IDDPM ancestral with learned variance (the official default, "
                        f"with 250 steps); ddim; dpm-solver: DPM-Solver++(2M); or diffusers:CLASS, "
                        f"a diffusers scheduler such as diffusers:UniPCMultistepScheduler (needs "
                        f"diffusers and torch) (default: {DEFAULTS.sampler})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps, respaced as the official code does (default: "
                        f"{DEFAULTS.steps})")
    p.add_argument("--eta", type=float, default=None,
                   help=f"DDIM eta; 0 is deterministic (default: {DEFAULTS.eta})")
    p.add_argument("--cfg-scale", "--cfg", dest="cfg_scale", type=float, default=None,
                   metavar="SCALE",
                   help=f"classifier-free guidance scale; 1 disables it (default: "
                        f"{DEFAULTS.cfg_scale})")
    p.add_argument("--cfg-mode", choices=CFG_MODES, default=None,
                   help="official: guide eps channels 0..2 (the TerDiT release; default for "
                        "4-channel latents); standard: all eps channels (default otherwise)")
    p.add_argument("--clip-denoised", dest="clip_denoised", action="store_true", default=None,
                   help="clamp each predicted x_0 to [-1, 1] (default: on for pixel-space "
                        "models, off for latent models as in the official sampler)")
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false",
                   default=None, help="never clamp the predicted x_0")
    p.add_argument("--seed", type=int, default=None,
                   help=f"image i's noise depends on (seed, i) only (default: {DEFAULTS.seed})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per forward (default: {DEFAULTS.batch_size})")


def add_act_quant_args(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                       default: Optional[str], help_text: str) -> None:
    """--act-quant MODE (terdit_common.op.ACT_QUANT) and --w2a8, its spelling of fp8; one of
    them at most."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--act-quant", dest="act_quant", choices=ACT_QUANT, default=default,
                       help=help_text)
    group.add_argument("--w2a8", dest="act_quant", action="store_const", const="fp8",
                       help="the same as --act-quant fp8: W1.58A8, every ternary product on "
                            "activations quantized per token to float8 e4m3, the weights kept "
                            "2-bit")


def given_sampling_flags(args: argparse.Namespace) -> list[str]:
    """The sampling flags a user passed (`add_sampling_args`), by their option names."""
    names = SAMPLING_FIELDS + ("cfg_mode", "clip_denoised")
    return ["--" + name.replace("_", "-") for name in names
            if getattr(args, name, None) is not None]


def sample_options(args: argparse.Namespace, **overrides) -> SampleOptions:
    """SampleOptions from parsed `add_sampling_args` flags, the defaults filling in what was not
    given (UserError names the flag)."""
    fields = {name: getattr(args, name, None) for name in
              SAMPLING_FIELDS + ("cfg_mode", "clip_denoised")}
    fields.update(overrides)
    for name in SAMPLING_FIELDS:
        if fields[name] is None:
            fields[name] = getattr(DEFAULTS, name)
    if getattr(args, "eta", None) is not None:
        check_eta_given(args.eta, fields["sampler"])
    return SampleOptions(**fields)


RESUMABLE = "run the same command to resume"
RESTART = "nothing was written; run the same command again"
EXIT_USAGE = 2
EXIT_BUG = 1
_OOM_TEXT = ("out of memory", "outofmemory", "can't allocate memory", "failed to allocate",
             "cuda_error_out_of_memory")


# torchrun's rank variables and the size each must stay below
RANK_OF = {"RANK": "WORLD_SIZE", "LOCAL_RANK": "LOCAL_WORLD_SIZE"}


def env_int(name: str, default: int) -> int:
    """An integer environment variable (torchrun's WORLD_SIZE, RANK, LOCAL_RANK ...), or
    `default` when unset. A value that is not an integer from 0 to limits.MAX_WORLD_SIZE, or a
    rank not below its size, is a UserError naming the variable (before a process group would
    wait for ranks that never come)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_WORLD_SIZE:
        raise UserError(f"environment variable {name}={value[:40]!r}: must be an integer from 0 "
                        f"to {MAX_WORLD_SIZE} (limits.MAX_WORLD_SIZE; torchrun sets it); unset it "
                        f"or launch with torchrun")
    size = RANK_OF.get(name)
    if size is not None and os.environ.get(size) is not None and number >= env_int(size, 1):
        raise UserError(f"environment variable {name}={number}: must be below {size}="
                        f"{env_int(size, 1)} (torchrun sets both); unset them or launch with "
                        f"torchrun")
    return number


def check_torchrun_env() -> int:
    """Every torchrun variable that is set, checked (env_int) before a process group would wait
    for ranks that never come: a world size of at least 1, ranks below it, and with more than
    one process the rendezvous torchrun sets (MASTER_ADDR, MASTER_PORT). Returns WORLD_SIZE."""
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env_int(name, 0)
    world = env_int("WORLD_SIZE", 1)
    if world < 1:
        raise UserError("environment variable WORLD_SIZE=0: a run has at least one process; "
                        "unset it or launch with torchrun")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if world > 1 and missing:
        raise UserError(f"environment variable WORLD_SIZE={world} is set but {missing[0]} is not "
                        f"(torchrun sets both); launch with torchrun, or unset WORLD_SIZE and "
                        f"RANK to run in one process")
    return world


def is_out_of_memory(err: BaseException) -> bool:
    """MemoryError, or a framework's out-of-memory error (torch's CUDA / CPU allocators)."""
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, MemoryError) or any(s in text for s in _OOM_TEXT)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a batch scheduler, torchrun stopping its workers) raises KeyboardInterrupt
    in the main thread, so it ends a run the way Ctrl-C does: `finally` blocks remove temporary
    files and release locks. The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield                                 # handlers belong to the main thread; an ignored
        return                                # SIGTERM stays ignored

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class _SurvivingStdout:
    """sys.stdout that, once it cannot be written (its reader is gone, a full /dev/full), sends
    what follows to /dev/null (also at the file-descriptor level, so the interpreter's last flush
    is quiet)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _gone(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(null, self._stream.fileno())
        os.close(null)
        self._stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:                       # a closed pipe, a full /dev/full: nobody reads it
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._gone()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def stdout_survives_its_reader() -> Iterator[None]:
    """For the block, a closed standard output (the reader of a pipe exited) silences what is
    printed instead of ending the run with BrokenPipeError: every output file is still
    written."""
    previous = sys.stdout
    sys.stdout = _SurvivingStdout(previous)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        sys.stdout = previous


def run_cli(handler: Callable[[], int], what: str = "", after_stop: str = RESUMABLE,
            oom_fix: str = "use smaller inputs or free memory") -> int:
    """Run a CLI body (`what` names its job in messages, e.g. "exporting M"): bad input
    (ValueError, UserError) and OS errors are one `error:` line and exit code 2; running out of
    memory one line naming `oom_fix`, exit code 2; Ctrl-C and SIGTERM one `interrupted:` line
    (`after_stop` says what to do) and exit code 130; anything else is a bug: one line and exit
    code 1 (TERDIT_TRACEBACK=1 shows the traceback). Never a traceback otherwise. A reader that
    closes standard output (`... | head`) does not stop the run (`stdout_survives_its_reader`)."""
    from .files import os_error_message
    with sigterm_as_interrupt(), stdout_survives_its_reader():
        try:
            return handler()
        except KeyboardInterrupt:
            print(f"interrupted: {after_stop}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except ValueError as err:
            return _error(str(err))
        except OSError as err:
            where = err.filename or err.filename2 or "a file the operating system did not name"
            return _error(os_error_message(err, where))
        except RecursionError:
            return _error("input nested too deeply to parse")
        except Exception as err:  # noqa: BLE001 - the one place a bug is reported, in one line
            if os.environ.get("TERDIT_TRACEBACK"):
                raise
            text = (str(err).strip().splitlines() or [""])[0][:200]
            doing = f" while {what}" if what else ""
            if is_out_of_memory(err):
                return _error(f"out of memory{doing} ({text}); {oom_fix}")
            print(f"error: internal error{doing} ({type(err).__name__}: {text}); this is a bug: "
                  f"please report it with the command line (TERDIT_TRACEBACK=1 shows the "
                  f"traceback)", file=sys.stderr)
            return EXIT_BUG


def _error(text: str) -> int:
    print("error: " + " ".join(text.split()), file=sys.stderr)
    return EXIT_USAGE


__all__ = ["DEFAULTS", "EXIT_INTERRUPTED", "RESTART", "RESUMABLE", "UserError",
           "add_act_quant_args", "add_sampling_args", "check_torchrun_env", "env_int",
           "given_sampling_flags", "is_out_of_memory", "run_cli", "sample_options",
           "sigterm_as_interrupt", "stdout_survives_its_reader"]
