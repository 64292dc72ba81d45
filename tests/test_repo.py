"""The repository's contract: README's two commands are what CI runs; docs match the CLIs."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_commands():
    setup, tests = _quick_start_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup in ci and tests.split()[0] in ci and "pytest" in ci
    assert (ROOT / setup.split()[-1]).is_file()


def test_setup_script_pins_torch_and_runs_the_main_job():
    script = (ROOT / "scripts" / "setup_and_demo.sh").read_text()
    assert '"torch==2.13.0"' in script  # never an unpinned torch (multi-GB CUDA build)
    assert "python -m exporter terdit/demo" in script and "python -m runtime sample" in script
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+,<[\d.]+"', pyproject)


def test_readme_flags_exist_in_the_clis():
    readme = (ROOT / "README.md").read_text()
    for module, sub in (("exporter", []), ("runtime", ["sample"])):
        help_text = subprocess.run([sys.executable, "-m", module, *sub, "--help"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=120).stdout
        section = readme.split(f"python -m {module}")[1][:600]
        for flag in set(re.findall(r"(--[a-z][a-z0-9-]+)", section)):
            assert flag in help_text, f"README mentions {flag} for {module}, --help does not"


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
