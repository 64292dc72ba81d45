"""Lower a ternary DiT checkpoint to ONNX with terdit::TernaryMatMul nodes, then validate it."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import io
import json
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from terdit import TerDiT, load_checkpoint
from terdit.fused import FusedTerDiT
from terdit.io_utils import atomic_directory, sha256_file
from terdit.model import guide

from . import contract

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CFG_CHOICES = ("none", "official", "standard")
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
VAE_FILE = "vae_decoder.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "terdit-onnx"
# Validation tolerance on max |onnx - torch_fp32| / max |torch_fp32|, added to LOWP_FACTOR times
# PyTorch's own error at the graph dtype.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 5e-3}
LOWP_FACTOR = 3
# The VAE decoder is compared with PyTorch at the same dtype (its errors are not ternary-specific).
VAE_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
# Protobuf cannot serialise 2 GiB; above this the weights go to an external data file.
EXTERNAL_DATA_BYTES = 1 << 30
# Above this many weight bytes, ORT sessions skip constant folding (it would decode the ternary
# weights to fp32 at session creation, ~5x the weight size in RAM).
LARGE_MODEL_BYTES = 64 << 20
# Above this, validation runs onnx.reference with a row-chunked TernaryMatMul instead of ORT:
# the portable function decodes a whole weight per node (int32 intermediates of 16 bytes per
# weight), which for the stacked adaLN of TerDiT-4.2B alone would need several GB.
HUGE_MODEL_BYTES = 512 << 20


class ExportError(RuntimeError):
    """An export that cannot proceed or did not validate; the message says why and what to do."""


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    cfg: str = "none"
    fuse: bool = True
    function: bool = True
    validate: bool = True
    validate_batches: tuple[int, ...] = (1, 2)
    tolerance: Optional[float] = None
    vae: Optional[str] = None
    overwrite: bool = False
    ema: Optional[bool] = None
    ternary: Optional[bool] = None
    external_data: Optional[bool] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.cfg not in CFG_CHOICES:
            raise ValueError(f"cfg={self.cfg!r} is not one of {CFG_CHOICES}")
        if not self.validate_batches or any(b < 1 for b in self.validate_batches):
            raise ValueError(f"validate_batches={self.validate_batches} must be positive sizes")


# ---- the graph ----------------------------------------------------------------------------------

class DiffusionGraph(nn.Module):
    """What the ONNX file computes: model(x, t, y) -> out, float32 I/O whatever the compute dtype.

    With CFG folded in, x/t/y hold B images; the graph runs [x; x] with labels [y; null] and
    returns the guided eps (plus the conditional half's other channels) for the B images, exactly
    the first half of the official forward_with_cfg.
    """

    def __init__(self, model: nn.Module, cfg_mode: Optional[str], null_class: int,
                 in_channels: int) -> None:
        super().__init__()
        self.model = model
        self.cfg_mode = cfg_mode
        self.null_class = null_class
        self.in_channels = in_channels

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: Optional[Tensor] = None
                ) -> Tensor:
        if self.cfg_mode is None:
            return self.model(x, t, y).float()
        n = x.shape[0]
        out = self.model(torch.cat([x, x]), torch.cat([t, t]),
                         torch.cat([y, torch.full_like(y, self.null_class)]))
        return guide(out, cfg_scale, self.cfg_mode, self.in_channels)[:n].float()


def _translation_table() -> dict:
    import onnxscript
    from onnxscript import ir
    from onnxscript import opset20 as op

    contract.register_schema()
    terdit_ops = onnxscript.values.Opset(contract.DOMAIN, contract.OP_VERSION)

    def ternary_matmul(x, w, scale, bias=None):
        k, n = int(x.shape[-1]), int(w.shape[0])
        if bias is None:
            # Every node carries a bias (zeros here), so the portable function, whose optional
            # input onnx.reference cannot leave out, evaluates everywhere.
            bias = op.Constant(value=ir.tensor(np.zeros(n, np.float32)))
        return terdit_ops.TernaryMatMul(x, w, scale, bias, **contract.node_attributes(k, n))

    def ternary_matmul_swiglu(x, w, scale):
        n = int(w.shape[0])
        a = ternary_matmul(x, w, scale)
        h1 = op.Slice(a, [0], [n // 2], [-1])
        h3 = op.Slice(a, [n // 2], [n], [-1])
        return op.Mul(op.Mul(h1, op.Sigmoid(h1)), h3)

    return {torch.ops.terdit.ternary_matmul.default: ternary_matmul,
            torch.ops.terdit.ternary_matmul_swiglu.default: ternary_matmul_swiglu}


def build_graph(model: TerDiT, options: ExportOptions) -> DiffusionGraph:
    cfg = model.cfg
    if not model.packed:
        raise ExportError("the model must be packed (ternary); load it with packed=True")
    bad = [(name, m.in_features, m.out_features) for name, m in model.named_modules()
           if hasattr(m, "codes") and (m.in_features % 16 or m.out_features % 16)]
    if bad:
        name, k, n = bad[0]
        raise ExportError(f"layer {name!r} has in_features={k}, out_features={n}: TernaryMatMul "
                          f"kernels need both to be multiples of 16; choose dims that are (pad "
                          f"the layer) or run this model with the PyTorch backend instead")
    net: nn.Module = FusedTerDiT(model) if options.fuse else model
    mode = None if options.cfg == "none" else options.cfg
    return DiffusionGraph(net, mode, cfg.null_class, cfg.in_channels).eval()


def example_inputs(cfg, batch: int, cfg_mode: Optional[str], seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g),
              "t": torch.randint(0, 1000, (batch,), generator=g).float(),
              "y": torch.randint(0, cfg.num_classes, (batch,), generator=g)}
    if cfg_mode is not None:
        inputs["cfg_scale"] = torch.tensor(4.0)
    return inputs


def lower(graph: DiffusionGraph, cfg) -> Any:
    """torch.onnx.export (dynamo) -> onnx_ir Model."""
    contract.register_schema()
    inputs = example_inputs(cfg, 2, graph.cfg_mode)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {"x": {0: batch}, "t": {0: batch}, "y": {0: batch}}
    names = ["x", "t", "y"]
    if graph.cfg_mode is not None:
        dynamic["cfg_scale"] = None
        names.append("cfg_scale")
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            graph, tuple(inputs.values()), dynamo=True, opset_version=contract.GRAPH_OPSET,
            input_names=names, output_names=["out"], dynamic_shapes=dynamic,
            custom_translation_table=_translation_table(), optimize=True, verify=False,
            verbose=False)
    return program.model


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and library warnings; keep them unless export fails."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    except Exception:
        sys.stderr.write(buf.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def finalize(model_ir, with_function: bool, metadata: dict) -> None:
    """Name the batch dim, import the terdit domain, append the portable function."""
    from onnxscript import ir

    model_ir.opset_imports[contract.DOMAIN] = contract.OP_VERSION
    for value in list(model_ir.graph.inputs) + list(model_ir.graph.outputs):
        if value.name == "cfg_scale":
            continue
        if value.shape is None or len(value.shape) == 0 or isinstance(value.shape[0], int):
            raise ExportError(f"internal error: the batch dimension of graph value {value.name!r} "
                              f"was specialised to {value.shape}; please report this")
        dims = list(value.shape)
        dims[0] = ir.SymbolicDim("batch")
        value.shape = ir.Shape(dims)
    if with_function:
        fn = ir.serde.deserialize_function(contract.ternary_matmul_function())
        model_ir.functions[fn.identifier()] = fn
    for key, val in metadata.items():
        model_ir.metadata_props[key] = val


def save_model(model_ir, path: Path, external: bool) -> None:
    from onnxscript import ir
    if external:
        ir.save(model_ir, path, external_data=DATA_FILE)
    else:
        ir.save(model_ir, path)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ---- validation -------------------------------------------------------------------------------

def ort_session(path: Path, large: bool):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    disabled = ["ConstantFolding"] if large else []
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


class FrugalReference:
    """onnx.reference with the Python TernaryMatMul OpRun, run node by node and freeing every
    intermediate after its last use (ReferenceEvaluator.run keeps them all, which for a 4.2B
    model at 256 tokens means tens of GB)."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator
        self.ev = ReferenceEvaluator(onnx.load(str(path)), new_ops=contract.reference_ops())

    def run(self, output_names, feeds: dict) -> list:
        ev = self.ev
        names = list(output_names or ev.output_names)
        results = {"": None, **ev.rt_inits_, **feeds}
        last_use: dict[str, int] = {}
        for idx, node in enumerate(ev.rt_nodes_):
            for name in node.input:
                last_use[name] = idx
        keep = set(names) | set(ev.rt_inits_)
        for idx, node in enumerate(ev.rt_nodes_):
            inputs = [results[name] for name in node.input]
            outs = (node.run(*inputs, context=results) if node.need_context()
                    else node.run(*inputs))
            for name, value in zip(node.output, outs):
                results[name] = value
            for name in set(node.input):
                if last_use.get(name) == idx and name not in keep and name:
                    del results[name]
        return [results[name] for name in names]


def _reference_evaluator(path: Path) -> FrugalReference:
    return FrugalReference(path)


def reference_outputs(graph: DiffusionGraph, cfg, options: ExportOptions) -> list[dict]:
    """Validation inputs and PyTorch outputs of `graph` in its current dtype."""
    cases = []
    for batch in options.validate_batches:
        inputs = example_inputs(cfg, batch, graph.cfg_mode, seed=options.seed + batch)
        with torch.no_grad():
            cases.append({"batch": batch, "inputs": inputs, "out": graph(**inputs).float().numpy()})
    return cases


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def validate(path: Path, ref32: list[dict], ref_lowp: Optional[list[dict]],
             options: ExportOptions, large: bool, log: Callable[[str], None],
             huge: bool = False) -> dict:
    """Checker + run the file and compare with PyTorch. Passes when the ONNX output's error
    against the fp32 PyTorch model is at most tolerance + LOWP_FACTOR x PyTorch's own error at
    the graph dtype (`ref_lowp`): the file may not be much less accurate than the framework it
    came from (a different but equally valid rounding order can cost a factor ~2)."""
    import onnx
    contract.register_schema()
    t0 = time.time()
    onnx.checker.check_model(str(path), full_check=True)
    result: dict[str, Any] = {"checker": "onnx.checker full_check: passed"}
    use_ort = options.dtype in ("fp32", "fp16") and options.function and not huge
    if use_ort:
        result["runtime"] = "onnxruntime CPUExecutionProvider" + (
            " (ConstantFolding disabled)" if large else "")
    else:
        why = ("ORT's CPU provider has no bf16 kernels" if options.dtype == "bf16" else
               "without the local function ONNX Runtime cannot run the file"
               if not options.function else
               "the portable decode of this many weights needs more RAM than a row-chunked OpRun")
        result["runtime"] = f"onnx.reference.ReferenceEvaluator + Python TernaryMatMul OpRun ({why})"
    runner = ort_session(path, large) if use_ort else _reference_evaluator(path)
    tol = options.tolerance if options.tolerance is not None else TOLERANCE[options.dtype]
    checks = []
    for i, case in enumerate(ref32):
        feeds = {k: v.numpy() for k, v in case["inputs"].items()}
        out = runner.run(None, feeds)[0].astype(np.float32)
        if out.shape != case["out"].shape:
            raise ExportError(f"validation: ONNX output shape {out.shape} != PyTorch "
                              f"{case['out'].shape}")
        err = _rel(out, case["out"])
        torch_err = _rel(ref_lowp[i]["out"], case["out"]) if ref_lowp else 0.0
        bound = tol + LOWP_FACTOR * torch_err
        ok = bool(np.isfinite(out).all()) and err <= bound
        checks.append({"batch": case["batch"], "max_abs_err": float(np.abs(out - case["out"]).max()),
                       "rel_err": err, "torch_rel_err": torch_err, "bound": bound, "passed": ok})
        log(f"  validate batch {case['batch']}: rel err vs fp32 PyTorch {err:.3e} (PyTorch "
            f"{options.dtype}: {torch_err:.3e}; bound {bound:.3e}) {'ok' if ok else 'FAILED'}")
    result.update(reference="PyTorch fp32 (terdit, same graph)", tolerance=tol, checks=checks,
                  passed=all(c["passed"] for c in checks), seconds=round(time.time() - t0, 2),
                  rule=f"rel_err <= tolerance + {LOWP_FACTOR} * torch_rel_err (PyTorch's own "
                       f"error at this dtype)")
    return result


# ---- VAE decoder ------------------------------------------------------------------------------

class VaeDecoderGraph(nn.Module):
    def __init__(self, vae, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent / self.scaling_factor).sample


def export_vae(vae_dir: str, out_path: Path, options: ExportOptions, latent_size: int,
               log: Callable[[str], None]) -> dict:
    """vae_decoder.onnx: latent (B, C, S, S) -> image (B, 3, 8S, 8S), batch dynamic, S fixed to
    the DiT's latent size."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise ExportError("--vae needs diffusers: pip install 'diffusers>=0.30'") from None
    vdir = Path(vae_dir)
    if not (vdir / "config.json").is_file():
        raise ExportError(f"--vae {vae_dir}: not a diffusers AutoencoderKL directory (no "
                          f"config.json); save one with AutoencoderKL.save_pretrained(DIR)")
    vae = AutoencoderKL.from_pretrained(str(vdir), local_files_only=True).eval()
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
    graph = VaeDecoderGraph(vae, scaling).to(DTYPES[options.dtype]).eval()
    ch = int(vae.config.latent_channels)
    size = latent_size
    latent = torch.randn(2, ch, size, size, dtype=DTYPES[options.dtype])
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(graph, (latent,), dynamo=True, opset_version=contract.GRAPH_OPSET,
                                    input_names=["latent"], output_names=["image"],
                                    dynamic_shapes={"latent": {0: batch}}, optimize=True,
                                    verify=False, verbose=False)
    save_model(program.model, out_path, external=False)
    info = {"file": out_path.name, "scaling_factor": scaling, "latent_channels": ch,
            "source": str(vdir.resolve()), "dtype": options.dtype}
    if options.validate and options.dtype != "bf16":
        sess = ort_session(out_path, large=False)
        lat = torch.randn(3, ch, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = graph(lat.to(DTYPES[options.dtype])).float().numpy()
        out = sess.run(None, {"latent": lat.to(DTYPES[options.dtype]).numpy()})[0].astype(np.float32)
        rel = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
        tol = VAE_TOLERANCE[options.dtype]
        info["validation"] = {"runtime": "onnxruntime CPU", "rel_err": rel, "tolerance": tol,
                              "passed": rel <= tol}
        log(f"  validate VAE decoder: rel err {rel:.3e}")
        if rel > tol:
            raise ExportError(f"VAE decoder validation failed: rel err {rel:.3e} > {tol:g}")
    return info


# ---- the whole export -------------------------------------------------------------------------

def tool_versions() -> dict:
    import onnx
    import onnxscript
    import terdit
    versions = {"terdit": terdit.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxscript": onnxscript.__version__, "python": platform.python_version()}
    try:
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def export(checkpoint: str | Path, outdir: str | Path, options: ExportOptions = ExportOptions(),
           log: Callable[[str], None] = print) -> dict:
    """Export `checkpoint` into directory `outdir`; returns the manifest."""
    outdir = Path(outdir)
    if outdir.exists() and not options.overwrite:
        raise ExportError(f"{outdir} already exists; pass --overwrite to replace it")
    t0 = time.time()
    log(f"loading {checkpoint}")
    loaded = load_checkpoint(checkpoint, packed=True, ema=options.ema, ternary=options.ternary)
    model, cfg = loaded.model, loaded.model.cfg
    if options.cfg == "official" and cfg.in_channels < 3:
        raise ExportError(f"--cfg official guides eps channels 0..2 but this model has "
                          f"{cfg.in_channels} input channel(s); use --cfg standard")
    graph = build_graph(model, options)
    ref32 = ref_lowp = None
    if options.validate:
        ref32 = reference_outputs(graph.float(), cfg, options)
    graph = graph.to(DTYPES[options.dtype])
    if options.validate and options.dtype != "fp32":
        ref_lowp = reference_outputs(graph, cfg, options)
    weight_bytes = _weight_bytes(graph)
    large = weight_bytes > LARGE_MODEL_BYTES
    huge = weight_bytes > HUGE_MODEL_BYTES
    external = options.external_data if options.external_data is not None \
        else weight_bytes > EXTERNAL_DATA_BYTES
    log(f"lowering to ONNX (dtype {options.dtype}, cfg {options.cfg}, "
        f"{'fused' if options.fuse else 'unfused'}, {weight_bytes / 2**20:.1f} MiB of weights)")
    model_ir = lower(graph, cfg)
    n_nodes = sum(1 for n in model_ir.graph if n.op_type == contract.OP_TYPE
                  and n.domain == contract.DOMAIN)
    finalize(model_ir, options.function, {
        "terdit.contract_version": str(contract.CONTRACT_VERSION),
        "terdit.config": cfg.to_json(indent=None)})
    try:
        with atomic_directory(outdir, overwrite=options.overwrite) as tmp:
            save_model(model_ir, tmp / MODEL_FILE, external)
            del model_ir
            log(f"wrote {MODEL_FILE} ({n_nodes} TernaryMatMul nodes"
                f"{', external data' if external else ''})")
            validation = {"skipped": "--no-validate"}
            if options.validate:
                validation = validate(tmp / MODEL_FILE, ref32, ref_lowp, options, large, log,
                                      huge)
                if not validation["passed"]:
                    bad = next(c for c in validation["checks"] if not c["passed"])
                    raise ExportError(f"validation failed at batch {bad['batch']}: ONNX vs PyTorch "
                                      f"relative error {bad['rel_err']:.3e} exceeds "
                                      f"{bad['bound']:.3e}; nothing was written (use --tolerance "
                                      f"to loosen, or --no-validate)")
            vae_info = (export_vae(options.vae, tmp / VAE_FILE, options, cfg.input_size, log)
                        if options.vae else None)
            manifest = _manifest(tmp, loaded, cfg, options, n_nodes, external, large, validation,
                                 vae_info, time.time() - t0)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportError(f"no space left while writing {outdir}; nothing was written. Free "
                              f"disk space or choose another output directory") from None
        raise
    log(f"done in {time.time() - t0:.1f}s: {outdir}")
    return manifest


def _manifest(tmp: Path, loaded, cfg, options: ExportOptions, n_nodes: int, external: bool,
              large: bool, validation: dict, vae_info: Optional[dict], seconds: float) -> dict:
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    inputs = ["x", "t", "y"] + (["cfg_scale"] if options.cfg != "none" else [])
    return {
        "format": MANIFEST_FORMAT,
        "contract": {"version": contract.CONTRACT_VERSION, "domain": contract.DOMAIN,
                     "op_type": contract.OP_TYPE, "op_version": contract.OP_VERSION,
                     "plugin_version": contract.PLUGIN_VERSION,
                     "plugin_namespace": contract.PLUGIN_NAMESPACE, "weight_layout": "k16",
                     "opset": contract.GRAPH_OPSET},
        "config": cfg.to_dict(),
        "source": {"path": str(Path(loaded.path).resolve()), "kind": loaded.source,
                   "files": [str(p) for p in loaded.files], "metadata": loaded.metadata},
        "options": {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(options).items()},
        "graph": {"inputs": inputs, "outputs": ["out"], "dtype": options.dtype,
                  "io_dtype": "float32", "cfg": options.cfg, "fused": options.fuse,
                  "function": options.function, "ternary_matmul_nodes": n_nodes,
                  "external_data": external, "large_model": large,
                  "null_class": cfg.null_class},
        "files": files,
        "vae": vae_info,
        "validation": validation,
        "tools": tool_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(seconds, 2),
    }
