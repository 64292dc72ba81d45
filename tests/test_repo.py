"""The repository's contract: README's two commands are what CI runs; docs match the CLIs."""
import re
import subprocess
import sys
from pathlib import Path

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
