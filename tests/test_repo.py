"""The repository's contract: README's two commands are what CI runs; docs match the CLIs."""
import contextlib
import importlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


# pytest options that change what is printed, never which tests run
OUTPUT_OPTIONS = re.compile(r"-q|-qq|-v|-vv|-r[a-zA-Z]+|--durations=\d+|--color=\w+|-p no:cacheprovider")


def _only_output_options(rest: str) -> bool:
    return rest == "" or (rest.startswith(" ") and all(
        OUTPUT_OPTIONS.fullmatch(token) for token in re.split(r" (?=-)", rest.strip())))


def test_ci_runs_the_readme_commands():
    setup, tests = _quick_start_commands()
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert setup in ci, f"CI never runs README's `{setup}`"
    runs_tests = [i for i, line in enumerate(ci)
                  if line.startswith(tests) and _only_output_options(line[len(tests):])]
    assert runs_tests, (f"CI never runs README's `{tests}` as it is (options that change only "
                        f"the output are allowed, not a selection such as -m, -k or a path)")
    assert runs_tests[-1] > ci.index(setup), "CI runs the tests before the setup"
    assert (ROOT / setup.split()[-1]).is_file()


def test_setup_script_pins_torch_and_runs_the_main_job():
    script = (ROOT / "scripts" / "setup_and_demo.sh").read_text()
    assert '"torch==2.13.0"' in script  # never an unpinned torch (multi-GB CUDA build)
    assert "python -m exporter terdit/demo" in script and "python -m runtime sample" in script
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+,<[\d.]+"', pyproject)


# Our command-line interfaces: module -> its subcommands (None: no subcommands).
CLIS = {"exporter": None, "runtime": ("sample", "build-engine"), "terdit.train": None,
        "terdit.evaluate": ("metrics", "grid", "train-classifier", "plot-losses")}


def _readme_cli_flags() -> dict[tuple[str, ...], set[str]]:
    """(module, subcommand...) -> the options README's commands pass to it: every ```bash line
    (indented lines continue the one above) and every inline `...` command that runs
    `-m MODULE` of ours (after `python` or `torchrun ...`), including its trailing comment."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [line for b in blocks for line in re.sub(r"\\?\n(?=[ \t])", " ", b).splitlines()]
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)
    commands += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    pattern = re.compile(r"(?:^|\s)-m\s+(" + "|".join(map(re.escape, CLIS)) + r")(?![\w.])(.*)")
    found: dict[tuple[str, ...], set[str]] = {}
    for command in commands:
        m = pattern.search(command)
        if not m:
            continue
        module, rest = m.groups()
        first = (rest.split() or [""])[0]
        cli = (module, first) if first in (CLIS[module] or ()) else (module,)
        found.setdefault(cli, set()).update(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", rest))
    return found


def _help(module: str, sub: tuple[str, ...]) -> str:
    main = importlib.import_module({"exporter": "exporter.export_cli", "runtime": "runtime.runtime_cli"}.get(module, module))
    parser = main.build_parser()
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        parser.parse_args([*sub, "--help"])
    return text.getvalue()


def test_readme_flags_exist_in_the_clis():
    found = _readme_cli_flags()
    # what README's examples pass today; a parser that misses its commands finds far fewer
    assert len(found.get(("exporter",), ())) >= 8, found
    assert len(found.get(("runtime", "sample"), ())) >= 12, found
    assert len(found.get(("runtime", "build-engine"), ())) >= 3, found
    assert ("terdit.train",) in found and ("terdit.evaluate",) in found, found
    for (module, *sub), flags in sorted(found.items()):
        help_text = _help(module, tuple(sub))
        for flag in sorted(flags):
            assert re.search(re.escape(flag) + r"(?![\w-])", help_text), (
                f"README passes {flag} to `python -m {' '.join([module, *sub])}`; its --help "
                f"has no such option")


def test_readme_picture_is_the_quick_start_grid():
    """README's first picture is terdit/demo/samples.png: the grid the quick start writes. After
    `bash scripts/setup_and_demo.sh` (CI runs it before the tests) the two agree pixel for pixel up
    to rounding differences between CPUs; before it, the test says so and skips."""
    readme = (ROOT / "README.md").read_text()
    assert readme.index("![demo grid](terdit/demo/samples.png)") < readme.index("## Checkpoints")
    produced = ROOT / "out" / "demo" / "samples" / "grid.png"
    if not produced.is_file():
        pytest.skip(f"{produced} not found: run `bash scripts/setup_and_demo.sh` first")
    ours = np.asarray(Image.open(produced).convert("L"), dtype=np.int16)
    committed = np.asarray(Image.open(ROOT / "terdit" / "demo" / "samples.png").convert("L"),
                           dtype=np.int16)
    assert ours.shape == committed.shape, "the quick start grid changed layout: update the picture"
    diff = np.abs(ours - committed)
    assert diff.mean() < 1.0 and (diff > 32).mean() < 0.002, (
        f"the quick start's grid differs from terdit/demo/samples.png (mean |diff| "
        f"{diff.mean():.2f} levels): copy {produced} over it if the model or sampler changed")
