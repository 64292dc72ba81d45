"""`python -m exporter` flags through `main(argv)` (README "Export to ONNX", `--help`):
--ema / --no-ema and --from-ternary / --from-fp choose among an official directory's files,
--external-data yes|no|auto, and the automatic external data above 1 GiB (threshold lowered).

Lowering costs seconds per export, so one real export carries the end-to-end checks and the
other flag combinations stop right after the checkpoint is loaded."""
import copy
import importlib
import json

import numpy as np
import onnx
import pytest
import torch

from exporter.export_cli import main
from exporter.options import ExportError
from terdit import TerDiTConfig, load_checkpoint, save_official
from terdit.config import PRESETS
from terdit.ternary import pack_model_
from tests.helpers import random_model

export_mod = importlib.import_module("exporter.export")   # `exporter.export` is also a function

# The official loader only knows the release's model names; DiT_Llama_600M_patch2 is pointed at a
# tiny architecture for these tests, so a release directory is a few kB.
TINY = TerDiTConfig(input_size=8, patch_size=2, in_channels=4, dim=32, n_layers=1, n_heads=2,
                    multiple_of=32, num_classes=10)
FILES = {  # (ema, ternary) -> the consolidated file and the seed of the model it holds
    (True, True): ("consolidated_ema_ternary.00-of-01.pth", 1),
    (False, True): ("consolidated_ternary.00-of-01.pth", 2),
    (True, False): ("consolidated_ema.00-of-01.pth", 3),
    (False, False): ("consolidated.00-of-01.pth", 4),
}


@pytest.fixture(scope="module")
def tiny_preset():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "TerDiT-600M", TINY)
        yield


@pytest.fixture(scope="module")
def release(tiny_preset, tmp_path_factory):
    """An official release directory holding all four consolidated files, each of a different
    model: packed ternary (HQQ uint8) for *_ternary, fp latent weights for the others."""
    root = tmp_path_factory.mktemp("release")
    path = root / "release"
    path.mkdir()
    models = {key: random_model(TINY, seed=seed) for key, (_, seed) in FILES.items()}
    for ema in (True, False):
        save_official(models[(ema, True)], root / f"packed_{ema}", ema=ema)
        for f in (root / f"packed_{ema}").iterdir():          # model_args.pth is the same
            f.replace(path / f.name)
    for ema in (True, False):
        torch.save({k: v.detach().clone() for k, v in models[(ema, False)].state_dict().items()},
                   path / FILES[(ema, False)][0])
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [name for name, _ in FILES.values()] + ["model_args.pth"])
    return path, models


def _packed_state(model) -> dict:
    """What any loader must make of a model: its weights ternarized and packed."""
    return pack_model_(copy.deepcopy(model)).state_dict()


def _same_weights(state: dict, model) -> bool:
    want = _packed_state(model)
    return state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


@pytest.fixture
def loads(monkeypatch):
    """Stop every export right after it loaded its checkpoint; returns what was loaded."""
    seen = []
    real = export_mod.load_checkpoint

    def load(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        raise ExportError("stopped by the test after loading")

    monkeypatch.setattr(export_mod, "load_checkpoint", load)
    return seen


@pytest.mark.parametrize("flags, key", [
    ([], (True, True)),                               # defaults: EMA, packed ternary
    (["--ema", "--from-ternary"], (True, True)),
    (["--no-ema"], (False, True)),
    (["--from-fp"], (True, False)),
    (["--no-ema", "--from-fp"], (False, False)),
])
def test_ema_and_ternary_flags_choose_the_release_file(release, loads, tmp_path, capsys,
                                                       flags, key):
    path, models = release
    assert main([str(path), "-o", str(tmp_path / "o"), *flags]) == 2
    assert "stopped by the test" in capsys.readouterr().err
    (loaded,) = loads
    assert loaded.metadata["official_file"] == FILES[key][0]
    assert _same_weights(loaded.model.state_dict(), models[key])
    assert not (tmp_path / "o").exists()


def test_ema_flags_exclude_each_other(release, tmp_path, capsys):
    path, _ = release
    for pair in (["--ema", "--no-ema"], ["--from-ternary", "--from-fp"]):
        with pytest.raises(SystemExit) as exit_:
            main([str(path), "-o", str(tmp_path / "o"), *pair])
        assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.fixture(scope="module")
def exported(release, tmp_path_factory):
    """The one real export: the non-EMA fp file of the release, with the automatic external-data
    threshold lowered to 0 bytes (so this tiny model is "above" it). Not validated: the test below
    runs the file in ONNX Runtime itself."""
    path, _ = release
    out = tmp_path_factory.mktemp("exported") / "o"
    assert export_mod.EXTERNAL_DATA_BYTES == 1 << 30        # README: external data above 1 GiB
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_mod, "EXTERNAL_DATA_BYTES", 0)
        assert main([str(path), "-o", str(out), "--no-ema", "--from-fp", "--no-validate"]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_no_ema_from_fp_export_holds_that_files_model(release, exported):
    _, models = release
    out, manifest = exported
    assert manifest["source"]["kind"] == "official"
    assert manifest["metadata"]["official_file"] == "consolidated.00-of-01.pth"
    assert manifest["options"]["ema"] is False and manifest["options"]["ternary"] is False
    assert _same_weights(load_checkpoint(out).model.state_dict(), models[(False, False)])


def test_external_data_is_automatic_above_the_threshold(exported):
    out, manifest = exported
    assert manifest["options"]["external_data"] is None          # --external-data auto
    assert manifest["graph"]["external_data"] is True
    assert {"model.onnx", "model.onnx.data"} <= set(manifest["files"])
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [i for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    big = [i for i in m.graph.initializer
           if np.prod(i.dims) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize >= 1024]
    assert any(i.name.endswith("codes") for i in external)  # (the writer keeps tiny ones inline)
    assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)
    assert {e.value for i in external for e in i.external_data if e.key == "location"} == \
        {"model.onnx.data"}
    # the export runs from its directory: ONNX Runtime reads the weights from the data file
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = sess.run(None, {"x": x, "t": np.array([10.0], np.float32),
                          "y": np.array([1], np.int64)})[0]
    model = load_checkpoint(out).model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.tensor([10.0]), torch.tensor([1])).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.fixture
def options(monkeypatch):
    """The ExportOptions each CLI call hands to export() (nothing is exported)."""
    seen = []
    import exporter.export_cli as cli
    monkeypatch.setattr(cli, "export", lambda ckpt, out, opts, *a, **k: seen.append(opts))
    return seen


@pytest.mark.parametrize("flag, want", [([], None), (["--external-data", "auto"], None),
                                        (["--external-data", "yes"], True),
                                        (["--external-data", "no"], False)])
def test_external_data_flag_values(options, tmp_path, flag, want):
    assert main(["ck", "-o", str(tmp_path / "o"), *flag]) == 0
    assert options[-1].external_data is want
