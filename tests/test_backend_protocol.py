"""Every backend follows the one cfg_scale rule of runtime/backends/protocol.py (docs/design.md
section 6): a graph with guidance folded in needs a finite cfg_scale, every other model refuses
one. ort and torch here; trt through the TensorRT stand-ins in tests/test_trt_backend.py."""
import numpy as np
import pytest

from exporter import ExportOptions, export
from runtime import BackendError, TerDiTPipeline, open_backend
from runtime.backends.protocol import check_cfg_scale
from terdit_common.sampling import ModelInfo, SampleOptions
from tests.helpers import pixel_checkpoint

QUIET = dict(log=lambda *_: None)
CONFIG = {"in_channels": 1, "input_size": 8, "num_classes": 3}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    pixel_checkpoint(root / "ck", n_layers=1)
    export(root / "ck", root / "plain", ExportOptions(validate=False), **QUIET)
    export(root / "ck", root / "folded", ExportOptions(cfg="standard", validate=False), **QUIET)
    return root


def _inputs(n=2):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, 1, 8, 8), dtype=np.float32), np.full(n, 500.0, np.float32),
            np.arange(n, dtype=np.int64) % 3)


def test_the_rule_itself():
    folded = ModelInfo(CONFIG, "f", "", folded_cfg="official")
    plain = ModelInfo(CONFIG, "p", "")
    assert check_cfg_scale(folded, 4.0).shape == () and float(check_cfg_scale(folded, 4)) == 4.0
    assert check_cfg_scale(plain, None) is None
    for bad in (None, float("nan"), float("inf"), "4", True):
        with pytest.raises(BackendError, match="needs cfg_scale, a finite number"):
            check_cfg_scale(folded, bad)
    with pytest.raises(BackendError, match="has no guidance in its graph: forward takes no "
                                           "cfg_scale"):
        check_cfg_scale(plain, 1.0)


def test_ort_follows_the_cfg_scale_rule(exports):
    x, t, y = _inputs()
    plain = open_backend(exports / "plain", "ort", kernels="function")
    assert plain.forward(x, t, y).shape == (2, 2, 8, 8)
    with pytest.raises(BackendError, match="forward takes no cfg_scale"):
        plain.forward(x, t, y, 3.0)
    folded = open_backend(exports / "folded", "ort", kernels="function")
    assert folded.info.folded_cfg == "standard"
    guided = folded.forward(x, t, y, 3.0)
    assert guided.shape == (2, 2, 8, 8)
    assert not np.allclose(guided, folded.forward(x, t, y, 1.0))   # the scale acts
    with pytest.raises(BackendError, match="needs cfg_scale"):     # never a silent 1.0
        folded.forward(x, t, y)


def test_torch_follows_the_cfg_scale_rule(exports):
    """The torch backend runs the weights, never the folded graph: the sampler guides it, so it
    refuses a cfg_scale whatever it was opened from; both give the guided images of the ort
    backend on the folded export."""
    x, t, y = _inputs()
    for source in ("plain", "folded", "ck"):
        backend = open_backend(exports / source, "torch", device="cpu")
        assert backend.info.folded_cfg is None
        assert backend.forward(x, t, y).shape == (2, 2, 8, 8)
        with pytest.raises(BackendError, match="forward takes no cfg_scale"):
            backend.forward(x, t, y, 3.0)
    options = SampleOptions(steps=3, cfg_scale=3.0)
    torch_images = TerDiTPipeline(open_backend(exports / "folded", "torch")).sample(
        [0, 1], [1, 2], options)
    ort_images = TerDiTPipeline(open_backend(exports / "folded", "ort")).sample(
        [0, 1], [1, 2], options)
    assert np.abs(torch_images - ort_images).max() < 1e-3
