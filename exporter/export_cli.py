"""python -m exporter CHECKPOINT -o OUTDIR: lower a ternary DiT to ONNX (terdit::TernaryMatMul)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from terdit_common.cli import RESTART, add_act_quant_args, run_cli
from terdit_common.op import DTYPES

from .export import export
from .options import CFG_CHOICES, ExportError, ExportOptions

DEFAULTS = ExportOptions()
ACT_QUANT_HELP = (
    "activation quantization of every TernaryMatMul node: 'none' (weight-only), 'int8' (W1.58A8 "
    "with int8 activations, s = amax / 127 per token; CPU kernels, ONNX Runtime and PyTorch "
    "only, TensorRT refuses it) or 'fp8' (W1.58A8 with float8 e4m3 activations: the plugin "
    "quantizes them, the portable function emulates it with QuantizeLinear / DequantizeLinear); "
    "validated against PyTorch in the same mode (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m exporter",
        description="Lower a ternary DiT checkpoint to ONNX. Every ternary linear becomes one "
                    "terdit::TernaryMatMul node (2-bit k16 weights in int32), runnable as-is in "
                    "ONNX Runtime through a local function and mapped to the TensorRT plugin.",
        epilog="Output (a self-contained directory: every backend runs from it alone): "
               "OUTDIR/model.onnx (+ model.onnx.data for large models), the same packed "
               "weights as a checkpoint (OUTDIR/config.json + model.safetensors), "
               "OUTDIR/manifest.json (config, contract, sha256 of every file, options, "
               "validation, versions) and, with --vae, OUTDIR/vae_decoder.onnx. "
               "Exit codes: 0 done; 2 bad input (one `error:` line naming the file or flag; "
               "nothing written); 1 an internal error (a bug; nothing written).")
    p.add_argument("checkpoint", help="official TerDiT release directory (model_args.pth + "
                   "consolidated*.pth), a TerDiT Deploy directory (config.json + "
                   "model.safetensors), or a .pt/.pth file")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype,
                   help="compute dtype inside the graph; graph I/O stays float32 (default: %(default)s)")
    p.add_argument("--cfg", choices=CFG_CHOICES, default=DEFAULTS.cfg,
                   help="fold classifier-free guidance into the graph: inputs x/t/y for B images "
                        "plus a scalar cfg_scale; 'official' guides eps channels 0..2 as the TerDiT "
                        "release does, 'standard' all eps channels (default: %(default)s)")
    fuse = p.add_mutually_exclusive_group()
    fuse.add_argument("--fuse", dest="fuse", action="store_true", default=DEFAULTS.fuse,
                      help="fuse q/k/v and w1/w3, and stack all blocks' adaLN linears into one "
                           "TernaryMatMul (default)")
    fuse.add_argument("--no-fuse", dest="fuse", action="store_false",
                      help="one TernaryMatMul per ternary linear, as in the checkpoint")
    p.add_argument("--no-function", dest="function", action="store_false", default=True,
                   help="omit the portable local function (TensorRT older than 10.7 would inline "
                        "it instead of using the plugin); such files need the plugin to run")
    add_act_quant_args(p, DEFAULTS.act_quant, ACT_QUANT_HELP)
    p.add_argument("--no-validate", dest="validate", action="store_false", default=True,
                   help="skip the checker and the ONNX-vs-PyTorch comparison")
    p.add_argument("--validate-batches", type=int, nargs="+", default=None, metavar="B",
                   help=f"batch sizes of the validation runs (default: "
                        f"{' '.join(map(str, DEFAULTS.validate_batches))})")
    p.add_argument("--tolerance", type=float, default=None,
                   help="validation passes when max|onnx - torch_fp32| / max|torch_fp32| <= "
                        "TOLERANCE + 3 x PyTorch's own error at --dtype (default: 1e-4 fp32, "
                        "5e-3 fp16/bf16, 5e-2 with --act-quant int8 or fp8)")
    p.add_argument("--vae", metavar="DIR|NAME", default=None,
                   help="also export the decoder of a diffusers AutoencoderKL to "
                        "vae_decoder.onnx (latent / scaling_factor inside the graph): a local "
                        "directory, or a hub name such as stabilityai/sd-vae-ft-ema found in the "
                        "local Hugging Face cache (nothing is downloaded)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="official directories: use the EMA weights (default when present)")
    ema.add_argument("--no-ema", dest="ema", action="store_false",
                     help="official directories: use the non-EMA weights")
    tern = p.add_mutually_exclusive_group()
    tern.add_argument("--from-ternary", dest="ternary", action="store_true", default=None,
                      help="official directories: use the packed *_ternary file (default when present)")
    tern.add_argument("--from-fp", dest="ternary", action="store_false",
                      help="official directories: ternarize the fp consolidated file instead")
    p.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="store weights in model.onnx.data (auto: above 1 GiB)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the validation inputs (default: {DEFAULTS.seed})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        # the validation's settings: each given one acts, or is refused with --no-validate
        validation = {name: value for name, value in (
            ("validate_batches", args.validate_batches and tuple(args.validate_batches)),
            ("tolerance", args.tolerance), ("seed", args.seed)) if value is not None}
        if validation and not args.validate:
            flag = "--" + next(iter(validation)).replace("_", "-")
            raise ExportError(f"{flag} sets the validation, which --no-validate skips; drop "
                              f"{flag} or drop --no-validate")
        options = ExportOptions(
            dtype=args.dtype, cfg=args.cfg, fuse=args.fuse, function=args.function,
            validate=args.validate, vae=args.vae, overwrite=args.overwrite, ema=args.ema,
            ternary=args.ternary, act_quant=args.act_quant,
            external_data={"auto": None, "yes": True, "no": False}[args.external_data],
            **validation)
        export(args.checkpoint, args.output, options)
        return 0

    return run_cli(body, f"exporting {args.checkpoint}; nothing was written", RESTART,
                   "free memory, or export with --no-validate")
