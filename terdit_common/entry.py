"""The start of every command line (`python -m exporter`, `runtime`, `terdit.train`,
`terdit.evaluate`): each `__main__` calls `run_main(module)`. While the modules load (torch,
ONNX Runtime: seconds), Ctrl-C and SIGTERM are held until the import is done (`signals_held`,
also used where a heavy module is imported later), because a KeyboardInterrupt raised inside a
C extension's import leaves it half-imported and fails in unrelated ways; then the run stops
with one `interrupted:` line and exit code 130 (a second signal stops at once). SIGTERM ends a
run the way Ctrl-C does, and the work ends through terdit_common.cli.run_cli. Standard library only: it runs before anything heavy is
imported (the packages load their public names on first use, terdit_common.lazy)."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import Iterator, NoReturn

EXIT_INTERRUPTED = 130                        # 128 + SIGINT, as a shell reports Ctrl-C
STOPPED = "interrupted: stopped before any work; run the same command again"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends (an import of a heavy module), then raise
    KeyboardInterrupt: an interrupt inside a C extension's import leaves it half-imported and
    surfaces later as an unrelated ImportError. A second signal stops the process at once. Only
    in the main thread (elsewhere the block just runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, frame) -> None:
        if held:
            print(STOPPED, file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        held.append(signum)

    # a signal the process ignores (SIGINT of a background job) stays ignored
    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if held:
        raise KeyboardInterrupt


def run_main(module: str) -> NoReturn:
    """Exit with `module`'s main() (its command line); SIGTERM raises KeyboardInterrupt as
    Ctrl-C does (unless the process ignores it). A closed standard output or error (`1>&-`)
    becomes /dev/null."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        with signals_held():
            main = importlib.import_module(module).main
        code = main()
    except KeyboardInterrupt:                 # before run_cli took over (loading, flags)
        print(STOPPED, file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
