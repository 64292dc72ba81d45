"""The Python API (runtime.TerDiTPipeline), self-contained export directories, 512 px models and
the documentation's promises (README example, --help text)."""
import argparse
import importlib.util
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import ExportOptions, export
from runtime import SampleOptions, TerDiTPipeline, open_backend
from runtime.runtime_cli import main as runtime_main
from terdit import load_checkpoint, save_checkpoint
from terdit_common.images import load_npz
from tests.helpers import pixel_checkpoint, random_model

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)
NAMES = ["tee", "trouser", "bag"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    pixel_checkpoint(root / "ck", seed=1, class_names=NAMES)
    export(root / "ck", root / "onnx", ExportOptions(validate=False), **QUIET)
    return root


def _readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no ```python example"
    return next(b for b in blocks if "TerDiTPipeline" in b)


def test_readme_python_example_matches_the_cli(exported, tmp_path, monkeypatch):
    """The README's Python example, run as written (paths pointed at a test export), gives the
    images `python -m runtime sample` writes for the same labels and settings."""
    code = _readme_python_example().replace("out/demo/onnx", str(exported / "onnx"))
    code = code.replace('"Trouser", "Bag", "Sandal"', '"trouser", "bag", "tee"')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)          # noqa: S102 - our own README
    images = scope["images"]
    steps = re.search(r"num_inference_steps=(\d+)", code).group(1)
    scale = re.search(r"guidance_scale=([\d.]+)", code).group(1)
    seed = re.search(r"seed=(\d+)", code).group(1)
    assert runtime_main(["sample", "--model", str(exported / "onnx"), "--classes", "1", "2", "0",
                         "--steps", steps, "--cfg-scale", scale, "--seed", seed, "--out",
                         str(tmp_path / "cli"), "--no-progress"]) == 0
    cli = load_npz(tmp_path / "cli" / "samples.npz")[0]
    assert len(images) == 3
    for i, im in enumerate(images):
        assert np.array_equal(np.asarray(im), cli[i, ..., 0])


def test_from_pretrained_on_a_checkpoint_and_output_types(exported):
    pipe = TerDiTPipeline.from_pretrained(exported / "ck", backend="torch")
    assert pipe.labels == {"tee": 0, "trouser": 1, "bag": 2}
    out = pipe(["bag", 0], num_inference_steps=3, guidance_scale=2.0, seed=3, output_type="np")
    assert out.images.shape == (2, 8, 8, 1) and out.images.dtype == np.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0 and out.labels == [2, 0]
    lat = pipe([2, 0], num_inference_steps=3, guidance_scale=2.0, seed=3, output_type="latent")
    low = TerDiTPipeline(open_backend(exported / "ck")).sample([0, 1], [2, 0], SampleOptions(
        steps=3, cfg_scale=2.0, seed=3))
    assert np.array_equal(lat.images, low)
    with pytest.raises(ValueError, match="not one of this model's classes"):
        pipe(["sock"])
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], output_type="tensor")


def test_pipeline_accepts_a_path():
    with pytest.raises(Exception, match="no such file"):
        TerDiTPipeline.from_pretrained("/nonexistent/export")


TRT_PLUGIN = Path(os.environ.get("TERDIT_TRT_PLUGIN") or ROOT / "build" / "libterdit_trt_plugin.so")


def _trt_missing() -> str | None:
    """Why the trt backend cannot run here, or None when TensorRT, CUDA and the plugin are all
    present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"TensorRT's Python package cannot be imported ({err}); pip install tensorrt-cu12"
    if not torch.cuda.is_available():
        return "no CUDA device for TensorRT"
    if not TRT_PLUGIN.is_file():
        return (f"no plugin library at {TRT_PLUGIN}: build it with CMake "
                f"(plugins/ternaryMatMulPlugin/README.md) or set TERDIT_TRT_PLUGIN")
    return None


TRT_MISSING = _trt_missing()
BACKEND_PARAMS = [
    pytest.param("ort", id="ort"),
    pytest.param("torch", id="torch"),
    pytest.param("trt", id="trt", marks=[pytest.mark.gpu, pytest.mark.skipif(
        TRT_MISSING is not None, reason=str(TRT_MISSING))]),
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_moved_export_runs_on_its_own(exported, tmp_path, backend):
    """An export directory copied elsewhere, with its source checkpoint gone, samples the same
    images on every backend (the torch backend reads the export's model.safetensors, trt the
    plan built into it)."""
    src = tmp_path / "a"
    shutil.copytree(exported / "onnx", src)
    kwargs = {}
    if backend == "trt":
        from runtime.tensorrt.engine_build import build_engine
        build_engine(src / "model.onnx", TRT_PLUGIN, src / "model.plan")
        kwargs["plugin"] = TRT_PLUGIN
    before = TerDiTPipeline(open_backend(src, backend, **kwargs)).sample([0, 1], [1, 2],
                                                                   SampleOptions(steps=3))
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(str(src), moved)
    ck_backup = tmp_path / "ck_backup"
    shutil.move(str(exported / "ck"), ck_backup)            # the source checkpoint is gone
    try:
        after = TerDiTPipeline(open_backend(moved, backend, **kwargs)).sample([0, 1], [1, 2],
                                                                        SampleOptions(steps=3))
    finally:
        shutil.move(str(ck_backup), exported / "ck")
    assert np.array_equal(before, after)
    assert load_checkpoint(moved).model.packed               # the export is a checkpoint too


def test_official_512px_model_loads_exports_and_samples(tmp_path):
    """The 512 px release: image_size 512 -> 64x64 latents, 1024 tokens (patch 2). The real
    weights are 600M+ parameters; this builds the same structure with small dims."""
    from terdit.official import OfficialArgs, official_config
    cfg = official_config(OfficialArgs("DiT_Llama_600M_patch2", 512, 1000, False, {}))
    assert (cfg.input_size, cfg.num_tokens, cfg.dim) == (64, 1024, 1536)
    small = cfg.replace(dim=64, n_layers=1, n_heads=4, multiple_of=64, num_classes=10)
    torch.manual_seed(0)
    save_checkpoint(random_model(small), tmp_path / "ck")
    manifest = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(validate_batches=(1,)),
                      **QUIET)
    assert manifest["validation"]["passed"] and manifest["config"]["input_size"] == 64
    lat = TerDiTPipeline(open_backend(tmp_path / "onnx")).sample([0], [7], SampleOptions(steps=2))
    assert lat.shape == (1, 4, 64, 64) and np.isfinite(lat).all()


def _parsers():
    from exporter.export_cli import build_parser as export_parser
    from runtime.runtime_cli import build_parser as runtime_parser
    from terdit.evaluate import build_parser as evaluate_parser
    from terdit.train import build_parser as train_parser
    for name, build in (("exporter", export_parser), ("runtime", runtime_parser),
                        ("terdit.evaluate", evaluate_parser), ("terdit.train", train_parser)):
        stack = [(name, build())]
        while stack:
            label, parser = stack.pop()
            yield label, parser
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack += [(f"{label} {sub}", p) for sub, p in action.choices.items()]


def test_every_flag_has_help_and_no_none_defaults():
    for label, parser in _parsers():
        text = parser.format_help()
        assert "(default: None)" not in text, label
        for action in parser._actions:
            if action.option_strings and action.help is None:
                raise AssertionError(f"{label}: {action.option_strings} has no help text")


def test_readme_lists_every_preset():
    from terdit import PRESETS
    readme = (ROOT / "README.md").read_text()
    for name in PRESETS:
        assert name in readme, name


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
def test_diffusers_scheduler_matches_the_builtin_ddim(exported):
    pipe = TerDiTPipeline(open_backend(exported / "onnx"))
    ours = pipe.sample([0, 1], [1, 2], SampleOptions(steps=10, cfg_scale=2.0, clip_denoised=False))
    theirs = pipe.sample([0, 1], [1, 2], SampleOptions(steps=10, cfg_scale=2.0,
                                                       sampler="diffusers:DDIMScheduler"))
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 1e-4
    unipc = pipe.sample([0, 1], [1, 2], SampleOptions(steps=10, cfg_scale=2.0,
                                                      sampler="diffusers:UniPCMultistepScheduler"))
    assert unipc.shape == ours.shape and np.isfinite(unipc).all()
    with pytest.raises(ValueError, match="diffusers scheduler"):
        SampleOptions(sampler="diffusers:NoSuchScheduler")
