"""Lower a ternary DiT checkpoint to a self-contained export directory (terdit_common.manifest):
model.onnx with terdit::TernaryMatMul nodes, the same packed weights as a checkpoint
(config.json + model.safetensors) so every backend runs from the directory alone, an optional
VAE decoder, and manifest.json with the sha256 of every file. The file is validated against
PyTorch before anything is written."""
from __future__ import annotations

import dataclasses
import datetime
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from terdit import load_checkpoint, save_checkpoint
from terdit.formats import TORCH_DTYPES
from terdit_common import op
from terdit_common.errors import UserError
from terdit_common.guidance import CFG_MODES, check_cfg_mode
from terdit_common.files import (atomic_directory, atomic_write_json, check_disjoint,
                                 check_replaceable_dir, check_writable_dir, os_error_message)
from terdit_common.locks import file_output
from terdit_common.manifest import (MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, VAE_FILE,
                                    files_record, is_export_dir, is_export_file, seal)
from terdit_common.sampling import ModelInfo

from .graph import act_quant_emulation, build_graph, finalize, lower, save_model
from .options import ExportError, ExportOptions
from .validate import reference_outputs, validate
from .vae_export import export_vae, vae_source

# Protobuf cannot serialise 2 GiB; above this the weights go to an external data file.
EXTERNAL_DATA_BYTES = 1 << 30
# Above this many weight bytes, validation's ORT session skips constant folding (the portable
# function's decode starts from a value computed from X, so folding cannot decode the weights at
# session creation; skipping it keeps files of older exporters cheap too).
LARGE_MODEL_BYTES = 64 << 20
# Above this, validation runs onnx.reference with a row-chunked TernaryMatMul instead of ORT:
# the portable function decodes a whole weight per node (int32 intermediates of 16 bytes per
# weight), which for the stacked adaLN of TerDiT-4.2B alone would need several GB.
HUGE_MODEL_BYTES = 512 << 20
# --w2a8 validation tolerance on max |onnx - torch| / max |torch|, the reference being PyTorch
# in the same mode (per-token e4m3). The quantization agrees bit for bit with the ONNX function
# (tests/test_w2a8_onnx.py) and most runs agree to ~1e-6, but an fp32 rounding-order difference
# upstream can move one value across an e4m3 rounding boundary (one e4m3 step, 2^-3 of its
# binade), which later layers spread: up to 2.4e-2 seen on TerDiT-tiny in 24 runs of 1-16 images.
W2A8_TOLERANCE = 5e-2
# --act-quant int8: the quantization and the node agree bit for bit with the definition
# (tests/test_int8.py), but as with fp8 an fp32 rounding-order difference upstream can move one
# value across an int8 rounding boundary (one step is 1/127 of the row's amax), which later layers
# spread; the bound is the fp8 one.
ACT_QUANT_TOLERANCE = {"int8": W2A8_TOLERANCE, "fp8": W2A8_TOLERANCE}


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


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def export(checkpoint: str | Path, outdir: str | Path, options: ExportOptions = ExportOptions(),
           log: Callable[[str], None] = print) -> dict:
    """Export `checkpoint` into directory `outdir`; returns the manifest.

    Before any work: `outdir` must not be, contain or lie inside an input, and an existing
    `outdir` is replaced (with `overwrite`) only when it is an export directory holding nothing
    but an export's files. Under the output's lock, temporaries a killed export left beside
    `outdir` are removed; a lock left by a dead exporter is taken over."""
    outdir = _check_output(Path(outdir), checkpoint, options)
    try:
        with file_output(outdir, "-o"):
            _check_output(outdir, checkpoint, options)           # again, under the lock
            return _export(checkpoint, outdir, options, log)
    except OSError as err:
        where = err.filename or outdir
        raise ExportError(os_error_message(err, where) + "; nothing was written") from None


def _check_output(outdir: Path, checkpoint, options: ExportOptions) -> Path:
    """The output rules, as ExportError (the export API's error type): a writable path that is
    none of the inputs, and an existing output replaced (with --overwrite) only when it is an
    export directory holding only an export's files (terdit_common.manifest.EXPORT_FILES)."""
    try:
        outdir = check_writable_dir(outdir, "-o")
        vae_dir = vae_source(options.vae) if options.vae else None
        check_disjoint(outdir, "-o", {"CHECKPOINT": checkpoint, "--vae": vae_dir})
        check_replaceable_dir(outdir, options.overwrite, is_export_file, "-o")
    except ExportError:
        raise
    except UserError as err:
        raise ExportError(str(err)) from None
    if outdir.is_dir() and any(outdir.iterdir()) and not is_export_dir(outdir):
        raise ExportError(f"-o {outdir}: is not an export directory (no {MANIFEST_FILE} or "
                          f"{MODEL_FILE}); --overwrite replaces only an export: choose another "
                          f"-o")
    return outdir


def _export(checkpoint: str | Path, outdir: Path, options: ExportOptions,
            log: Callable[[str], None]) -> dict:
    t0 = time.time()
    log(f"loading {checkpoint}")
    loaded = load_checkpoint(checkpoint, packed=True, ema=options.ema, ternary=options.ternary)
    model, cfg = loaded.model, loaded.model.cfg
    if not cfg.ternary:
        raise ExportError(f"{checkpoint} is a full-precision model; only ternary models export "
                          f"to TernaryMatMul (train with QAT, or --init-from it)")
    if options.cfg in CFG_MODES:
        try:
            check_cfg_mode(options.cfg, cfg.in_channels, "--cfg")
        except UserError as err:
            raise ExportError(str(err)) from None
    if options.vae and ModelInfo(cfg.to_dict(), str(checkpoint), "").pixel_space:
        raise ExportError(f"--vae {options.vae}: {checkpoint} is a pixel-space model "
                          f"({cfg.in_channels} channel(s)), whose samples no VAE decodes; drop "
                          f"--vae")
    if options.vae:
        vae_source(options.vae, cfg.in_channels)        # decodes this model's latents
    graph = build_graph(model, options)
    ref32 = ref_lowp = None
    if options.validate:
        with act_quant_emulation(options.act_quant):
            ref32 = reference_outputs(graph.float(), cfg, options)
    graph = graph.to(TORCH_DTYPES[options.dtype])
    if options.validate and options.dtype != "fp32":
        with act_quant_emulation(options.act_quant):
            ref_lowp = reference_outputs(graph, cfg, options)
    weight_bytes = _weight_bytes(graph)
    large = weight_bytes > LARGE_MODEL_BYTES
    huge = weight_bytes > HUGE_MODEL_BYTES
    external = options.external_data if options.external_data is not None \
        else weight_bytes > EXTERNAL_DATA_BYTES
    log(f"lowering to ONNX (dtype {options.dtype}, cfg {options.cfg}, "
        f"{'fused' if options.fuse else 'unfused'}, act_quant {options.act_quant}, "
        f"{weight_bytes / 2**20:.1f} MiB of weights)")
    model_ir = lower(graph, cfg, options.act_quant)
    n_nodes = sum(1 for n in model_ir.graph if n.op_type == op.OP_TYPE and n.domain == op.DOMAIN)
    finalize(model_ir, options.function, {
        "terdit.contract_version": str(op.CONTRACT_VERSION),
        "terdit.config": cfg.to_json(indent=None)}, options.act_quant)
    with atomic_directory(outdir, overwrite=options.overwrite, ours=is_export_file,
                          flag="-o") as tmp:
        save_model(model_ir, tmp / MODEL_FILE, external)
        del model_ir
        log(f"wrote {MODEL_FILE} ({n_nodes} TernaryMatMul nodes"
            f"{', external data' if external else ''})")
        validation = {"skipped": "--no-validate"}
        if options.validate:
            validation = _validate(tmp / MODEL_FILE, ref32, ref_lowp, options, large, log,
                                   huge)
            if not validation["passed"]:
                bad = next(c for c in validation["checks"] if not c["passed"])
                raise ExportError(f"validation failed at batch {bad['batch']}: ONNX vs PyTorch "
                                  f"relative error {bad['rel_err']:.3e} exceeds "
                                  f"{bad['bound']:.3e}; nothing was written (use --tolerance "
                                  f"to loosen, or --no-validate)")
        # the packed weights as a checkpoint: the PyTorch backend runs from the export alone
        packed_dir = tmp / ".weights"
        save_checkpoint(model, packed_dir, metadata=loaded.metadata)
        for f in packed_dir.iterdir():
            f.rename(tmp / f.name)
        packed_dir.rmdir()
        vae_info = (export_vae(options.vae, tmp / VAE_FILE, options, cfg.input_size,
                               cfg.in_channels, log)
                    if options.vae else None)
        manifest = _manifest(tmp, loaded, cfg, options, n_nodes, external, large, validation,
                             vae_info, time.time() - t0)
        manifest = seal(manifest)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    log(f"done in {time.time() - t0:.1f}s: {outdir}")
    return manifest


def _validate(path: Path, ref32, ref_lowp, options: ExportOptions, large: bool,
              log: Callable[[str], None], huge: bool) -> dict:
    """validate(); an int8 / fp8 file is compared with PyTorch in the same mode
    (ACT_QUANT_TOLERANCE)."""
    if options.act_quant == op.ACT_QUANT_DEFAULT:
        return validate(path, ref32, ref_lowp, options, large, log, huge)
    if options.tolerance is None:
        options = dataclasses.replace(options, tolerance=ACT_QUANT_TOLERANCE[options.act_quant])
    result = validate(path, ref32, ref_lowp, options, large, log, huge)
    how = ("running terdit::ternary_matmul_int8 (terdit.kernels.int8.set_act_quant_)"
           if options.act_quant == "int8" else
           "emulated (terdit.kernels.w2a8.quantize_rows_e4m3_ref on the input of every TernaryMatMul)")
    result["reference"] = (f"PyTorch fp32 (terdit, same graph) with act_quant={options.act_quant} "
                           f"{how}")
    return result


def _manifest(tmp: Path, loaded, cfg, options: ExportOptions, n_nodes: int, external: bool,
              large: bool, validation: dict, vae_info: Optional[dict], seconds: float) -> dict:
    inputs = ["x", "t", "y"] + (["cfg_scale"] if options.cfg != "none" else [])
    return {
        "format": MANIFEST_FORMAT,
        "contract": {"version": op.CONTRACT_VERSION, "domain": op.DOMAIN,
                     "op_type": op.OP_TYPE, "op_version": op.OP_VERSION,
                     "plugin_version": op.PLUGIN_VERSION,
                     "plugin_namespace": op.PLUGIN_NAMESPACE, "weight_layout": op.WEIGHT_LAYOUT,
                     "opset": op.GRAPH_OPSET},
        "config": cfg.to_dict(),
        "metadata": loaded.metadata,
        "source": {"path": str(Path(loaded.path).resolve()), "kind": loaded.source,
                   "files": [str(p) for p in loaded.files]},
        "options": {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(options).items()},
        "graph": {"inputs": inputs, "outputs": ["out"], "dtype": options.dtype,
                  "io_dtype": "float32", "cfg": options.cfg, "fused": options.fuse,
                  "function": options.function, "ternary_matmul_nodes": n_nodes,
                  "act_quant": options.act_quant,
                  "external_data": external, "large_model": large,
                  "null_class": cfg.null_class},
        "files": files_record(tmp),
        "vae": vae_info,
        "validation": validation,
        "tools": tool_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(seconds, 2),
    }
