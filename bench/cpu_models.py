"""The models bench/cpu.py times on the CPU: one-node ONNX GEMMs (TernaryMatMul, MatMul,
MatMulNBits), whole-model ONNX files derived from an export by graph surgery (dense fp32, 2-bit
MatMulNBits), ONNX Runtime dynamic int8, OpenVINO compilations (bf16 hint, NNCF int8), and the
bf16 torch peer. Optional packages (terdit CPU kernels, OpenVINO, NNCF) are imported where used;
a missing one raises Skip with the reason, which the benchmark records in the row."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from exporter.contract import register_schema, ternary_matmul_function
from terdit.ternary import PackedTernaryLinear
from terdit.formats import unpack_k16
from terdit_common.op import DOMAIN, GRAPH_OPSET, OP_TYPE, node_attributes

NBITS_BLOCK = 32            # MatMulNBits block size (K of every shape here is a multiple)
EXTERNAL_ABOVE = 1 << 30    # write initializers to a .data file above this many bytes


class Skip(Exception):
    """A row that cannot run here; the message is recorded as its skip reason."""


# ---- one GEMM: Y = X @ (scale * T)^T + bias -----------------------------------------------------

def random_gemm(k: int, n: int, seed: int = 0):
    """Ternary T [N, K] with ~1/3 zeros packed k16, scale ~ 1/sqrt(K) per channel, zero bias."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    from terdit.formats import pack_k16
    w = pack_k16(t)
    scale = (1.0 + 0.1 * torch.rand(n, generator=g)) / k ** 0.5
    return w, scale.float(), torch.zeros(n)


def effective_weight(w: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 [N, K] = scale * T (what every peer multiplies by)."""
    return unpack_k16(w, k, torch.float32) * scale[:, None]


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > EXTERNAL_ABOVE if _fits_proto(model) else True
    if large:
        data = path.with_name(path.name + ".data")
        if data.exists():
            data.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _fits_proto(model: onnx.ModelProto) -> bool:
    raw = sum(t.ByteSize() for t in model.graph.initializer if t.HasField("raw_data"))
    return raw < (1 << 31) - (1 << 26)


def ternary_gemm_model(k: int, n: int, w, scale, bias, act_quant: str = "none") -> onnx.ModelProto:
    """A single terdit::TernaryMatMul node with its portable local function (raises Skip when
    the contract does not know act_quant yet)."""
    register_schema()
    try:
        attrs = node_attributes(k, n, act_quant)
        fn = ternary_matmul_function(act_quant)
    except ValueError as err:
        raise Skip(f"the op contract refuses act_quant={act_quant!r} ({err})") from None
    node = helper.make_node(OP_TYPE, ["X", "W", "scale", "bias"], ["Y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], "ternary_gemm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[numpy_helper.from_array(w.numpy(), "W"),
                     numpy_helper.from_array(scale.numpy(), "scale"),
                     numpy_helper.from_array(bias.numpy().astype(np.float32), "bias")])
    return helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", GRAPH_OPSET), helper.make_opsetid(DOMAIN, 1)])


def dense_gemm_model(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """MatMul with the fp32 effective weight [N, K] (stored transposed) + Add bias."""
    n, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Wt"], ["XW"]),
         helper.make_node("Add", ["XW", "b"], ["Y"])],
        "dense_gemm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(weight.T), "Wt"),
                     numpy_helper.from_array(bias.astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", GRAPH_OPSET)])


def nbits_tensors(w: np.ndarray, scale: np.ndarray, k: int, block: int = NBITS_BLOCK):
    """MatMulNBits (bits=2) inputs that hold the ternary weights exactly: code = t + 1 in
    {0, 1, 2}, zero point 1, every block's scale = the channel's scale. The k16 byte order (four
    2-bit codes per byte, low bits first, along K) is MatMulNBits' packing, so B is a view."""
    if k % block:
        raise Skip(f"K={k} is not a multiple of the MatMulNBits block size {block}")
    n = w.shape[0]
    blocks = k // block
    b = np.ascontiguousarray(w).view(np.uint8).reshape(n, blocks, block // 4)
    scales = np.repeat(scale.astype(np.float32), blocks)                      # [N * blocks]
    zp_bytes = (blocks + 3) // 4
    zp = np.full((n, zp_bytes), 0x55, np.uint8).reshape(-1)                   # zero point 1
    return b, scales, zp


def nbits_node(x: str, y: str, prefix: str, k: int, n: int, block: int = NBITS_BLOCK):
    return helper.make_node("MatMulNBits", [x, f"{prefix}B", f"{prefix}scales", f"{prefix}zp"],
                            [y], domain="com.microsoft", K=k, N=n, bits=2, block_size=block,
                            accuracy_level=4)


def nbits_gemm_model(w, scale, bias, k: int, n: int) -> onnx.ModelProto:
    b, scales, zp = nbits_tensors(w.numpy(), scale.numpy(), k)
    graph = helper.make_graph(
        [nbits_node("X", "XW", "", k, n), helper.make_node("Add", ["XW", "bias"], ["Y"])],
        "nbits_gemm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales"),
                     numpy_helper.from_array(zp, "zp"),
                     numpy_helper.from_array(bias.numpy().astype(np.float32), "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", GRAPH_OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)])


# ---- sessions -----------------------------------------------------------------------------------

def ort_options(threads: int, library: bool = False):
    """(SessionOptions, description); library=True registers the terdit CPU kernel library."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    desc = "onnxruntime " + ort.__version__
    if library:
        try:
            from terdit_common import cpukernels
        except ImportError as err:
            raise Skip(f"terdit_common.cpukernels is not available ({err})") from None
        try:
            desc = cpukernels.register_ort(so)
        except Exception as err:  # noqa: BLE001 - CpuKernelError, or a half-built library's error
            raise Skip(f"{type(err).__name__}: {err}") from None
    return so, desc


def ort_session(model, threads: int, library: bool = False):
    """(InferenceSession, description) for a ModelProto or a path."""
    import onnxruntime as ort
    so, desc = ort_options(threads, library)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]), desc
    except Exception as err:  # noqa: BLE001 - ORT raises its own types
        raise Skip(f"onnxruntime cannot run it: {' '.join(str(err).split())[:300]}") from None


def quantize_dynamic_file(src: Path, dst: Path) -> Path:
    """onnxruntime.quantization.quantize_dynamic: per-channel QInt8 weights, dynamic uint8
    activations (what ORT's MatMulInteger / DynamicQuantizeMatMul run)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = (src.with_name(src.name + ".data")).exists()
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     use_external_data_format=large)
    return dst


def ov_compile(path_or_model, threads: int, precision: str | None):
    """(compiled model, info) for OpenVINO's CPU plugin; precision "bf16" sets the inference
    precision hint. info records what the plugin reports (hint, runtime precisions, BF16
    support)."""
    try:
        import openvino as ov
    except ImportError:
        raise Skip("openvino is not installed: pip install -e '.[bench]'") from None
    core = ov.Core()
    caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    model = path_or_model
    if isinstance(model, (str, Path)):
        model = core.read_model(str(model))
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: ", "").strip("'>")
    runtime = {}
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        layer = _rt_str(rt, "layerType") or op.get_type_name()
        if layer in ("FullyConnected", "MatMul", "Convolution"):
            prec = _rt_str(rt, "runtimePrecision") or "?"
            runtime[f"{layer}:{prec}"] = runtime.get(f"{layer}:{prec}", 0) + 1
    info = {"openvino": ov.__version__, "cpu_capabilities": caps, "precision_hint": hint,
            "runtime_precisions": runtime}
    if precision == "bf16" and "BF16" not in caps:
        info["note"] = (f"this CPU has no bf16 support (capabilities {caps}); OpenVINO falls back "
                        f"to execution precision {hint}")
    return compiled, info


def _rt_str(rt, key: str) -> str | None:
    if key not in rt:
        return None
    value = rt[key]
    try:
        return value.astype(str)
    except Exception:  # noqa: BLE001 - older OVAny
        return str(getattr(value, "value", value))


def nncf_int8(path: Path, calibration: list[dict], dst: Path) -> Path:
    """NNCF post-training int8 (default preset) of an ONNX file read by OpenVINO, saved as IR."""
    try:
        import nncf
        import openvino as ov
    except ImportError as err:
        raise Skip(f"{err.name} is not installed: pip install -e '.[bench]'") from None
    model = ov.Core().read_model(str(path))
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return dst


# ---- whole models: graph surgery on an export ---------------------------------------------------

def _initializers(model: onnx.ModelProto) -> dict:
    return {t.name: t for t in model.graph.initializer}


def replace_ternary_nodes(src: Path, dst: Path, kind: str) -> Path:
    """A copy of an exported model.onnx whose every terdit::TernaryMatMul node is replaced:
    kind "dense": MatMul by the decoded fp32 weight x scale (stored [K, N]) + Add bias;
    kind "nbits": com.microsoft MatMulNBits bits=2 (exact codes, zero point 1) + Add bias.
    The packed initializers are dropped and the local function removed."""
    model = onnx.load(str(src), load_external_data=True)
    inits = _initializers(model)
    nodes, dropped, new_inits = [], set(), []
    for node in model.graph.node:
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = int(attrs["K"]), int(attrs["N"])
        x, wname, sname = node.input[0], node.input[1], node.input[2]
        bname = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if wname not in inits or sname not in inits:
            raise ValueError(f"{src}: TernaryMatMul {node.name!r} reads W/scale from a computed "
                             f"tensor; only initializers can be decoded")
        w = numpy_helper.to_array(inits[wname])
        scale = numpy_helper.to_array(inits[sname]).astype(np.float32)
        dropped.update({wname, sname})
        prefix = (node.name or node.output[0]).replace("/", "_") + "_"
        mid = prefix + "mm"
        if kind == "dense":
            wt = (unpack_k16(torch.from_numpy(np.array(w, np.int32)), k, torch.float32).numpy()
                  * scale[:, None]).T
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(wt), prefix + "Wt"))
            del wt
            nodes.append(helper.make_node("MatMul", [x, prefix + "Wt"],
                                          [mid if bname else node.output[0]],
                                          name=prefix + "MatMul"))
        else:
            b, scales, zp = nbits_tensors(np.array(w, np.int32), scale, k)
            new_inits += [numpy_helper.from_array(b, prefix + "B"),
                          numpy_helper.from_array(scales, prefix + "scales"),
                          numpy_helper.from_array(zp, prefix + "zp")]
            nb = nbits_node(x, mid if bname else node.output[0], prefix, k, n)
            nb.name = prefix + "MatMulNBits"
            nodes.append(nb)
        if bname:
            nodes.append(helper.make_node("Add", [mid, bname], [node.output[0]],
                                          name=prefix + "Add"))
    kept = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    del model.functions[:]
    opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    if kind == "nbits":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return save_model(model, dst)


# ---- torch ---------------------------------------------------------------------------------------

def load_torch_kernels() -> str:
    """Load terdit.kernels.cpu_ops (registers the CPU ternary_matmul ops); a description, or
    Skip."""
    try:
        import terdit.kernels.cpu_ops as ck
    except ImportError as err:
        raise Skip(f"terdit.kernels.cpu_ops is not available ({err})") from None
    try:
        out = ck.load()
    except Exception as err:  # noqa: BLE001 - a missing compiler, a failed build
        raise Skip(f"terdit.kernels.cpu_ops.load() failed: {type(err).__name__}: {err}") from None
    return str(out) if out is not None else "terdit.kernels.cpu_ops"


def dense_torch_model(packed_model, dtype=torch.bfloat16):
    """The packed TerDiT with every PackedTernaryLinear replaced by nn.Linear holding its
    effective weight (scale * T), cast to `dtype`: the dense peer with the same function."""
    model = copy.deepcopy(packed_model)

    def swap(mod):
        for name, child in list(mod.named_children()):
            if isinstance(child, PackedTernaryLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, child.bias is not None,
                                      device="meta")
                lin.weight = torch.nn.Parameter(child.effective_weight(), requires_grad=False)
                if child.bias is not None:
                    lin.bias = torch.nn.Parameter(child.bias.detach().float().clone(),
                                                  requires_grad=False)
                setattr(mod, name, lin)
            else:
                swap(child)
    swap(model)
    return model.to(dtype).eval()


def random_packed_cpu(cfg, seed: int = 0):
    """bench/e2e_models.random_packed on the CPU."""
    import e2e_models
    return e2e_models.random_packed(cfg, seed, on="cpu")


def vm_hwm_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
