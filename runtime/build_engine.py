"""`python -m runtime build-engine`: build a TensorRT plan from an export directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from terdit_common.errors import UserError
from terdit_common.manifest import MODEL_FILE, is_export_dir

from .backends import open_export
from .trt_build import (DEFAULT_MAX_BATCH, DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_PRECISION,
                        DEFAULT_WORKSPACE_GIB, build_engine)
from .trt_record import sidecar_path


def add_build_engine_subparser(subparsers) -> argparse.ArgumentParser:
    """Adds `build-engine` to an argparse subparsers object; parsed args go to build_engine_main."""
    parser = subparsers.add_parser(
        "build-engine",
        help="build a TensorRT engine from an exported ONNX model",
        description="Build a TensorRT engine (.plan) with the TernaryMatMul plugin, and its build "
        "record <output>.json, on the GPU that will run it.",
    )
    parser.add_argument("onnx", type=Path, metavar="EXPORT_DIR|MODEL.onnx",
                        help="export directory written by `python -m exporter` (or its model.onnx)")
    parser.add_argument(
        "--plugin", type=Path, required=True, help="path to libterdit_trt_plugin.so"
    )
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="engine file to write (default: EXPORT_DIR/model.plan, where "
                             "`sample --backend trt` looks for it)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", dest="precision", action="store_const", const="fp16", help="build in float16"
    )
    precision.add_argument(
        "--bf16", dest="precision", action="store_const", const="bf16", help="build in bfloat16"
    )
    parser.set_defaults(precision=DEFAULT_PRECISION)
    for which, default, what in (("min", DEFAULT_MIN_BATCH, "smallest batch"),
                                 ("opt", DEFAULT_OPT_BATCH, "batch to tune for"),
                                 ("max", DEFAULT_MAX_BATCH, "largest batch")):
        parser.add_argument(f"--{which}-batch", type=int, default=None,
                            help=f"{what} of the optimization profile (default {default})")
    parser.add_argument(
        "--workspace-gib",
        type=float,
        default=DEFAULT_WORKSPACE_GIB,
        help=f"TensorRT workspace limit in GiB (default {DEFAULT_WORKSPACE_GIB})",
    )
    parser.add_argument(
        "--allow-inlined-ternary",
        action="store_true",
        help="build even when TensorRT inlined some TernaryMatMul nodes as their ONNX function "
        "instead of using the plugin (refused by default: such an engine holds decoded float "
        "weights)",
    )
    parser.set_defaults(func=build_engine_main)
    return parser


def build_engine_main(args: argparse.Namespace) -> int:
    onnx = args.onnx / MODEL_FILE if args.onnx.is_dir() else args.onnx
    if not onnx.is_file():
        raise UserError(f"{args.onnx}: no {MODEL_FILE} here; pass an export directory written by "
                        f"`python -m exporter` or its model.onnx")
    if is_export_dir(onnx.parent):
        open_export(onnx.parent)             # the manifest and every file's sha256 check out
    output = args.output or onnx.parent / "model.plan"
    plan = build_engine(
        onnx,
        args.plugin,
        output,
        precision=args.precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_gib=args.workspace_gib,
        allow_inlined_ternary=args.allow_inlined_ternary,
    )
    print(f"wrote {plan} and {sidecar_path(plan)}")
    return 0
