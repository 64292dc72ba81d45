"""`python -m runtime build-engine`: build a TensorRT plan from an export directory."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from terdit_common.errors import UserError
from terdit_common.files import check_disjoint
from terdit_common.inputs import input_file
from terdit_common.locks import file_output
from terdit_common.manifest import (EXPORT_FILES, MODEL_FILE, PLAN_FILE, PLAN_RECORD_FILE,
                                    export_dir_of, open_export)

from ..backends.protocol import BackendError
from .engine_build import (DEFAULT_MAX_BATCH, DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH,
                           DEFAULT_PRECISION, DEFAULT_WORKSPACE_GIB, build_engine,
                           check_workspace, resolve_batch_range)
from .record import sidecar_path


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


def check_build_args(args: argparse.Namespace) -> tuple[Path, Path]:
    """(the ONNX file to build, the plan to write), after the flags that need no TensorRT are
    checked: bounded batch sizes and workspace, regular input files (a FIFO would block the
    build), and outputs (the plan and its build record) that are none of the build's inputs."""
    onnx = args.onnx / MODEL_FILE if args.onnx.is_dir() else args.onnx
    fix = "pass an export directory written by `python -m exporter` or its model.onnx"
    if not os.path.lexists(onnx):
        raise BackendError(f"{args.onnx}: no {MODEL_FILE} here; {fix}")
    if onnx.suffix != ".onnx":
        raise BackendError(f"{args.onnx}: not an ONNX file (.onnx) nor a directory; {fix}")
    input_file(onnx, fix=fix)
    resolve_batch_range(args.min_batch, args.opt_batch, args.max_batch)
    check_workspace(args.workspace_gib)
    if os.path.lexists(args.plugin):
        input_file(args.plugin, "--plugin", "pass the built libterdit_trt_plugin.so")
    output = args.output or onnx.parent / PLAN_FILE
    # the plan may sit inside its export directory (the default), never on one of its files
    inputs = {"MODEL.onnx": onnx, "--plugin": args.plugin, **{
        f"EXPORT_DIR/{name}": onnx.parent / name for name in EXPORT_FILES
        if name not in (PLAN_FILE, PLAN_RECORD_FILE)}}
    for written in (output, sidecar_path(output)):
        if written.is_dir():
            raise BackendError(f"-o {output}: {written} is a directory; pass the .plan file to "
                               f"write")
        try:
            check_disjoint(written, "-o", inputs)
        except UserError as err:
            raise BackendError(str(err)) from None
    return onnx, output


def build_engine_main(args: argparse.Namespace) -> int:
    onnx, output = check_build_args(args)
    # An export directory (given as the directory or by its model.onnx: terdit_common.manifest's
    # one rule) is built only when its manifest and every file's sha256 check out. A lone ONNX
    # file is built as it is: its plan runs only inside an export whose model.onnx has the
    # sha256 the build records.
    if export_dir_of(args.onnx) is not None:
        open_export(export_dir_of(args.onnx))
    with file_output(output, "-o"), file_output(sidecar_path(output), "-o"):
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
