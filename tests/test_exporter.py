import errno
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from terdit_common import op

from exporter import ExportError, ExportOptions, export
from exporter import contract
from exporter.export_cli import main as cli_main
from exporter.graph import example_inputs
from terdit import TerDiTConfig, load_checkpoint, save_checkpoint
from tests.helpers import random_model
from tests.official_layout import random_official_state, write_official_dir

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def one_layer_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ck") / "one"
    cfg = TerDiTConfig.from_name("TerDiT-tiny", n_layers=1, qk_norm=True)
    save_checkpoint(random_model(cfg), path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(random_model(TerDiTConfig.from_name("TerDiT-tiny", qk_norm=True)), path)
    return path


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _guided(model, x, t, y, mode: str, scale: float = 4.0):
    """model(x, t, y), or with classifier-free guidance (uncond = label num_classes): eps
    channels 0..2 (official) or all eps channels (standard) become uncond + scale (cond -
    uncond); every other channel is the conditional one."""
    if mode == "none":
        return model(x, t, y).float()
    n, c = x.shape[:2]
    out = model(torch.cat([x, x]), torch.cat([t, t]),
                torch.cat([y, torch.full_like(y, model.cfg.num_classes)])).float()
    cond, uncond = out[:n], out[n:]
    g = 3 if mode == "official" else c
    return torch.cat([uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)


def _nodes(path: Path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op.OP_TYPE]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("cfg", ["none", "official", "standard"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_export_grid_validates(one_layer_ckpt, tmp_path, dtype, cfg, fuse):
    out = tmp_path / "out"
    manifest = export(one_layer_ckpt, out, ExportOptions(dtype=dtype, cfg=cfg, fuse=fuse), **QUIET)
    val = manifest["validation"]
    assert val["passed"] and len(val["checks"]) == 2
    assert ("onnxruntime" in val["runtime"]) == (dtype != "bf16")
    # the file, run here, against the fp32 model with guidance written out: no further from it
    # than PyTorch itself at the file's dtype
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 4, 9])
    feeds = {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}
    if cfg != "none":
        feeds["cfg_scale"] = np.array(4.0, dtype=np.float32)
    path = str(out / "model.onnx")
    if dtype == "bf16":                    # ORT's CPU provider has no bf16 kernels
        from onnx.reference import ReferenceEvaluator
        got = ReferenceEvaluator(onnx.load(path)).run(None, feeds)[0]
    else:
        import onnxruntime as ort
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    model = load_checkpoint(one_layer_ckpt).model.eval()
    with torch.no_grad():
        ref = _guided(model, x, t, y, cfg)
        low = _guided(model.to(DTYPES[dtype]), x.to(DTYPES[dtype]), t, y, cfg)
    torch_err = _rel(low.numpy(), ref.numpy())
    assert _rel(got, ref.numpy()) <= 1e-5 + torch_err, (_rel(got, ref.numpy()), torch_err)
    layers = 1
    nodes = _nodes(out / "model.onnx")
    assert len(nodes) == manifest["graph"]["ternary_matmul_nodes"] == (4 * layers + 1 if fuse else 8 * layers)
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert set(attrs) == set(op.REQUIRED_ATTRIBUTES)
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b""
        assert n.domain == "terdit" and len(n.input) == 4
    m = onnx.load(str(out / "model.onnx"))
    names = [i.name for i in m.graph.input]
    assert names == (["x", "t", "y"] + ([] if cfg == "none" else ["cfg_scale"]))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [f.name for f in m.functions] == ["TernaryMatMul"]
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert set(files) == {"model.onnx", "config.json", "model.safetensors"}


def test_node_shapes_and_weights_match_the_model(tiny_ckpt, tmp_path):
    export(tiny_ckpt, tmp_path / "o", ExportOptions(fuse=False, validate=False), **QUIET)
    m = onnx.load(str(tmp_path / "o" / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    model = load_checkpoint(tiny_ckpt, packed=True).model
    wq = model.layers[1].attention.wq
    node = next(n for n in m.graph.node if n.op_type == op.OP_TYPE and "layers.1.attention.wq" in n.input[1])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["K"], attrs["N"]) == (64, 64)
    w = inits[node.input[1]]
    assert w.dtype == np.int32 and np.array_equal(w, wq.codes.numpy())
    assert np.array_equal(inits[node.input[2]], wq.scale.numpy())
    # the export's own checkpoint holds the same packed bytes as the ONNX initializers
    own = load_checkpoint(tmp_path / "o").model.layers[1].attention.wq
    assert own.codes.numpy().tobytes() == w.tobytes()
    assert own.scale.numpy().tobytes() == inits[node.input[2]].tobytes()


def test_reference_evaluator_oprun_agrees_with_ort(tiny_ckpt, tmp_path):
    from onnx.reference import ReferenceEvaluator
    import onnxruntime as ort
    export(tiny_ckpt, tmp_path / "o", ExportOptions(cfg="official", validate=False), **QUIET)
    path = str(tmp_path / "o" / "model.onnx")
    cfg = load_checkpoint(tiny_ckpt).model.cfg
    feeds = {k: v.numpy() for k, v in example_inputs(cfg, 3, "official", seed=9).items()}
    ort_out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    oprun = ReferenceEvaluator(onnx.load(path), new_ops=contract.reference_ops()).run(None, feeds)[0]
    function = ReferenceEvaluator(onnx.load(path)).run(None, feeds)[0]
    scale = np.abs(ort_out).max()
    assert np.abs(oprun - ort_out).max() / scale < 1e-5
    assert np.abs(function - ort_out).max() / scale < 1e-5


def test_no_function_file(tiny_ckpt, tmp_path):
    manifest = export(tiny_ckpt, tmp_path / "o", ExportOptions(function=False), **QUIET)
    m = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert len(m.functions) == 0
    contract.register_schema()
    onnx.checker.check_model(m, full_check=True)
    assert "ReferenceEvaluator" in manifest["validation"]["runtime"] and manifest["validation"]["passed"]


def test_official_directory_exports_directly(tmp_path, monkeypatch):
    """An official release directory exports with no conversion step, on the large-model path
    (threshold lowered, as below), and the file computes the official forward_with_cfg. The
    600M architecture shrunk to 2 layers of dim 64 (the preset and the oracle's table): the
    official code only builds its named sizes."""
    from tests import official_layout
    name = "DiT_Llama_600M_patch2"
    official_layout.shrink_600m(monkeypatch)
    monkeypatch.setattr(importlib.import_module("exporter.export"), "LARGE_MODEL_BYTES", 0)
    state = random_official_state(name, 32, seed=2)
    write_official_dir(tmp_path / "official", name, 32, state)
    manifest = export(tmp_path / "official", tmp_path / "o",
                      ExportOptions(cfg="official", validate_batches=(2,)), **QUIET)
    assert manifest["source"]["kind"] == "official"
    assert manifest["graph"]["large_model"] and manifest["validation"]["passed"]
    assert "ConstantFolding disabled" in manifest["validation"]["runtime"]
    assert manifest["graph"]["ternary_matmul_nodes"] == 4 * 2 + 1
    assert manifest["config"]["dim"] == 64 and manifest["config"]["input_size"] == 4
    path = str(tmp_path / "o" / "model.onnx")
    assert sum(n.op_type == op.OP_TYPE for n in onnx.load(path).graph.node) == 9
    import onnxruntime as ort
    g = torch.Generator().manual_seed(7)
    x, t, y = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10.0, 900.0]), torch.tensor([3, 9])
    null = torch.full_like(y, 1000)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy(),
               "cfg_scale": np.array(4.0, dtype=np.float32)})[0]
    with torch.no_grad():
        ref = official_layout.official_forward_with_cfg(
            state, name, 32, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0)[:2]
    assert _rel(got, ref.numpy()) < 1e-4


def test_large_model_validation_skips_constant_folding(tiny_ckpt, tmp_path, monkeypatch):
    ex = importlib.import_module("exporter.export")
    monkeypatch.setattr(ex, "LARGE_MODEL_BYTES", 0)
    manifest = export(tiny_ckpt, tmp_path / "o", ExportOptions(validate_batches=(2,)), **QUIET)
    assert manifest["graph"]["large_model"] and manifest["validation"]["passed"]
    assert "ConstantFolding disabled" in manifest["validation"]["runtime"]


def test_external_data(tiny_ckpt, tmp_path):
    manifest = export(tiny_ckpt, tmp_path / "o", ExportOptions(external_data=True), **QUIET)
    assert manifest["validation"]["passed"]
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "config.json",
                                      "model.safetensors"}
    m = onnx.load(str(tmp_path / "o" / "model.onnx"), load_external_data=False)
    codes = [i for i in m.graph.initializer if i.name.endswith("codes")]
    assert codes and all(i.data_location == onnx.TensorProto.EXTERNAL for i in codes)


def test_vae_decoder_export(tiny_ckpt, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  layers_per_block=1, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae")
    manifest = export(tiny_ckpt, tmp_path / "o", ExportOptions(vae=str(tmp_path / "vae")), **QUIET)
    assert manifest["vae"]["validation"]["passed"]
    assert manifest["vae"]["scaling_factor"] == pytest.approx(0.18215)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "o" / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    lat = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(lat) / 0.18215).sample.numpy()
    assert np.abs(sess.run(None, {"latent": lat})[0] - ref).max() < 1e-3
    assert "vae_decoder.onnx" in manifest["files"]


# ---- bad inputs: clear errors, nothing written ----------------------------------------------

def test_refuses_existing_output(tiny_ckpt, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(tiny_ckpt, tmp_path / "o", ExportOptions(validate=False), **QUIET)
    export(tiny_ckpt, tmp_path / "o", ExportOptions(validate=False, overwrite=True), **QUIET)
    assert (tmp_path / "o" / "model.onnx").is_file()


def test_unaligned_features_are_refused(tmp_path):
    cfg = TerDiTConfig(input_size=8, dim=72, n_layers=1, n_heads=4, multiple_of=32, num_classes=10)
    save_checkpoint(random_model(cfg), tmp_path / "ck")
    with pytest.raises(ExportError, match="in_features=72.*multiples of 16"):
        export(tmp_path / "ck", tmp_path / "o", **QUIET)
    assert not (tmp_path / "o").exists()


def test_official_cfg_needs_three_channels(tmp_path):
    cfg = TerDiTConfig(input_size=8, in_channels=1, dim=64, n_layers=1, n_heads=4, multiple_of=32,
                       num_classes=10)
    save_checkpoint(random_model(cfg), tmp_path / "ck")
    with pytest.raises(ExportError, match="--cfg standard"):
        export(tmp_path / "ck", tmp_path / "o", ExportOptions(cfg="official"), **QUIET)


def test_disk_full_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    ex = importlib.import_module("exporter.export")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex, "save_model", full)
    with pytest.raises(ExportError, match="no space left"):
        export(tiny_ckpt, tmp_path / "o", **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_failed_validation_writes_nothing(tiny_ckpt, tmp_path):
    with pytest.raises(ExportError, match="validation failed at batch 1"):
        export(tiny_ckpt, tmp_path / "o", ExportOptions(tolerance=1e-12), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main([str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no such file or directory" in err and "\n" not in err
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    assert cli_main([str(tmp_path / "junk.pt"), "-o", str(tmp_path / "o")]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        cli_main([str(tmp_path / "junk.pt"), "-o", str(tmp_path / "o"), "--dtype", "fp64"])


def test_cli_end_to_end(tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "exporter", str(tiny_ckpt), "-o", str(out),
                           "--cfg", "standard", "--dtype", "fp16"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "validate batch 2" in proc.stdout and (out / "manifest.json").is_file()
    help_text = subprocess.run([sys.executable, "-m", "exporter", "--help"], capture_output=True,
                               text=True, cwd=ROOT, timeout=60).stdout
    for flag in ("--dtype", "--cfg", "--fuse", "--no-fuse", "--no-function", "--vae",
                 "--no-validate", "--overwrite", "--tolerance", "--w2a8", "--act-quant"):
        assert flag in help_text


def test_polygraphy_runs_the_file(tiny_ckpt, tmp_path):
    if shutil.which("polygraphy") is None and not (Path(sys.executable).parent / "polygraphy").exists():
        pytest.skip("polygraphy is not installed (pip install polygraphy)")
    export(tiny_ckpt, tmp_path / "o", ExportOptions(validate=False), **QUIET)
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    proc = subprocess.run([exe, "run", str(tmp_path / "o" / "model.onnx"), "--onnxrt"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("act_quant", ["none", "int8", "fp8"])
def test_nodes_follow_the_written_contract(one_layer_ckpt, tmp_path, act_quant):
    """The exporter and the plugin creator are both checked against the same YAML contract."""
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "plugins" / "ternaryMatMulPlugin" /
                          "TernaryMatMul_PluginConfig.yaml").read_text())
    spec = doc["versions"][op.PLUGIN_VERSION]
    assert doc["name"] == op.OP_TYPE and doc["onnx_domain"] == op.DOMAIN
    assert spec["plugin_namespace"] == op.PLUGIN_NAMESPACE
    assert list(spec["attributes"]) == list(op.ATTRIBUTES)
    assert list(spec["attributes_required"]) == list(op.REQUIRED_ATTRIBUTES)
    assert set(op.OPTIONAL_ATTRIBUTES) == set(spec["attributes"]) - set(
        spec["attributes_required"])
    options = spec["attribute_options"]["act_quant"]
    assert tuple(options["values"]) == op.ACT_QUANT
    assert options["default"] == op.ACT_QUANT_DEFAULT
    contract.register_schema()
    schema = onnx.defs.get_schema(op.OP_TYPE, op.OP_VERSION, op.DOMAIN)
    assert {a: schema.attributes[a].required for a in op.ATTRIBUTES} == {
        a: a in op.REQUIRED_ATTRIBUTES for a in op.ATTRIBUTES}
    export(one_layer_ckpt, tmp_path / "o",
           ExportOptions(dtype="fp16", validate=False, act_quant=act_quant), **QUIET)
    m = onnx.load(str(tmp_path / "o" / "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
             onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT32: "int32"}
    kind = {int: onnx.AttributeProto.INT, str: onnx.AttributeProto.STRING}
    for node in _nodes(tmp_path / "o" / "model.onnx"):
        assert len(node.input) <= len(spec["inputs"]) and list(node.output) and len(node.output) == 1
        attrs = {a.name: a for a in node.attribute}
        assert set(spec["attributes_required"]) <= set(attrs) <= set(spec["attributes"])
        for name, typ in spec["attribute_types"].items():
            if name in attrs:
                assert attrs[name].type == kind[{"int": int, "string": str}[typ]]
        mode = onnx.helper.get_attribute_value(attrs["act_quant"]).decode() \
            if "act_quant" in attrs else options["default"]
        assert mode == act_quant and mode in options["values"]
        for name, value in spec["attribute_values"].items():
            assert onnx.helper.get_attribute_value(attrs[name]).decode() == value
        k, n = attrs["K"].i, attrs["N"].i
        for rule, v in (("K", k), ("N", n)):
            opts = spec["attribute_options"][rule]
            assert v >= opts["min"] and v % opts["multiple_of"] == 0
        w = inits[node.input[1]]
        assert types[w.data_type] in spec["input_types"]["W"] and list(w.dims) == [n, (k + 15) // 16]
        assert types[inits[node.input[2]].data_type] in spec["input_types"]["scale"]
