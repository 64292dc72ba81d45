"""python -m runtime {sample, build-engine}: batch sampling over ONNX Runtime, TensorRT or PyTorch."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from terdit_common.cli import (DEFAULTS, RESTART, RESUMABLE, add_act_quant_args,
                               add_sampling_args, run_cli, sample_options)
from terdit_common.errors import UserError
from terdit_common.files import check_disjoint, check_writable_dir
from terdit_common.inputs import input_file, read_npy
from terdit_common.limits import MAX_IMAGES, MAX_THREADS, check_count, check_threads
from terdit_common.op import DTYPES
from terdit_common.ort import KERNEL_CHOICES
from terdit_common.schedulers import make_scheduler

from .backends.opener import BACKENDS
from .pipeline import TerDiTPipeline
from .tensorrt.engine_cli import add_build_engine_subparser

LATENTS_FIX = "pass a float .npy of shape (N, C, H, W), one latent per image"
ACT_QUANT_HELP = (
    "activation quantization of the ternary products. torch backend: 'none' (default), 'int8' "
    "(W1.58A8 with int8 activations, terdit.kernels.int8) or 'fp8' (W1.58A8 with e4m3 "
    "activations; an exact emulation on the CPU). ort / trt: the export's own mode (python -m "
    "exporter --act-quant); another value is refused")


def add_sample_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sample", help="generate images", description=(
            "Generate images with a ternary DiT. Writes OUT/images/NNNNNN.png (global index), "
            "OUT/grid.png, OUT/samples.npz (ADM format: arr_0 uint8 NHWC RGB, arr_1 labels), "
            "OUT/samples.json and OUT/written/ (the sha256 of what it wrote); image i's noise "
            "depends only on (--seed, i), so results do not depend on --batch-size or the number "
            "of ranks. Re-running the same command resumes. "
            "Scale out with `torchrun --nproc_per_node=N -m runtime sample ... --num-images N`."))
    p.add_argument("--model", required=True, metavar="DIR|FILE",
                   help="an export directory (python -m exporter; any backend) or a checkpoint "
                        "(--backend torch)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="ort (ONNX Runtime), trt (TensorRT plan DIR/model.plan) or torch "
                        "(default: ort for export directories, torch for checkpoints)")
    what = p.add_argument_group("what to sample")
    what.add_argument("--classes", type=int, nargs="+", metavar="LABEL",
                      help="class labels, cycled over the images (default: all classes in order)")
    what.add_argument("--num", "--num-images", dest="num", type=int, default=None,
                      help="number of images (default: one per --classes label); under torchrun "
                           "spell it --num-images (torchrun reads --num as its own --numa-binding)")
    what.add_argument("--imagenet-ids", action="store_true",
                      help="--classes are ImageNet ids; map them to the official release's model "
                           "labels (its ImageFolder sorted '0'..'999' as strings)")
    what.add_argument("--uncond", action="store_true",
                      help="unconditional sampling (the null label; no guidance)")
    add_sampling_args(p.add_argument_group("sampler"))
    p.add_argument("--latents", metavar="FILE.npy", default=None,
                   help="initial latents (N, C, H, W) instead of seeded noise, e.g. to reproduce "
                        "another tool's run")
    io_ = p.add_argument_group("outputs and devices")
    io_.add_argument("--out", required=True, help="output directory")
    io_.add_argument("--save-latents", action="store_true",
                     help="also write the final latents (before VAE decoding) as latents.npy")
    io_.add_argument("--vae", metavar="DIR|FILE|NAME", default=None,
                     help="VAE for latent models: a diffusers AutoencoderKL directory, a "
                          "vae_decoder.onnx, or a hub name in the local Hugging Face cache "
                          "(default: the export's vae_decoder.onnx if present)")
    io_.add_argument("--overwrite", action="store_true",
                     help="discard samples of a different run in --out instead of refusing")
    io_.add_argument("--plugin", default=None,
                     help="TensorRT plugin library for --backend trt (or env "
                          "TERDIT_TRT_PLUGIN); the other backends refuse it")
    io_.add_argument("--device", default=None,
                     help="torch backend device, cpu or cuda[:N] (default: cuda if present, else "
                          "cpu; ort and trt refuse it: choose their GPU with "
                          "CUDA_VISIBLE_DEVICES)")
    io_.add_argument("--dtype", choices=DTYPES, default=None,
                     help="torch backend compute dtype (default: bf16 on CUDA, fp32 on CPU; ort "
                          "and trt run the dtype of the export / engine and refuse it)")
    io_.add_argument("--threads", type=int, default=None,
                     help=f"CPU threads: ONNX Runtime's intra-op threads (ort) or torch's "
                          f"(torch); 0 to {MAX_THREADS} (default: the library's own)")
    io_.add_argument("--kernels", choices=KERNEL_CHOICES, default=None,
                     help="ort backend, how terdit::TernaryMatMul runs: 'auto' the terdit CPU "
                          "kernels (plugins/cpu, built with the system C++ compiler on first use) "
                          "when they load, else the file's portable ONNX function; 'native' "
                          "requires the kernels; 'function' never uses them (default: auto)")
    add_act_quant_args(io_, None, ACT_QUANT_HELP)
    io_.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                     help="torch backend on CUDA: do not torch.compile the blocks")
    io_.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                     default=None, help="torch backend on CUDA: do not capture CUDA graphs")
    io_.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar")
    p.set_defaults(func=sample_main)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime",
                                     description="TerDiT Deploy runtime: batch sampling and "
                                                 "TensorRT engine builds.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(sub)
    add_build_engine_subparser(sub)
    return parser


def check_sample_args(args) -> None:
    """The flags that need no model, checked before anything is opened: bounds, and flags that
    would be ignored in this combination (refused, not dropped)."""
    if args.num is not None:
        check_count("--num", args.num, 1, MAX_IMAGES, "images")
    check_threads(args.threads)
    if args.uncond:
        for given, flag in ((args.classes, "--classes"), (args.imagenet_ids, "--imagenet-ids"),
                            (args.cfg_scale is not None, "--cfg-scale"),
                            (getattr(args, "cfg_mode", None), "--cfg-mode")):
            if given:
                raise UserError(f"--uncond and {flag} exclude each other (unconditional "
                                f"sampling has no labels and no guidance); drop one")
    if args.imagenet_ids and not args.classes:
        raise UserError("--imagenet-ids maps the ids given with --classes; pass --classes or "
                        "drop --imagenet-ids")
    if args.latents is not None:
        input_file(args.latents, "--latents", LATENTS_FIX)
        if args.seed is not None and not make_scheduler(args.sampler or DEFAULTS.sampler,
                                                        args.eta or 0.0).needs_noise:
            raise UserError(f"--seed {args.seed}: has no effect with --latents and a sampler "
                            f"that draws no noise per step (--sampler "
                            f"{args.sampler or DEFAULTS.sampler}, --eta {args.eta or 0.0}); the "
                            f"latents fix the images: drop --seed")
    check_writable_dir(args.out, "--out")
    check_disjoint(args.out, "--out", {"--model": args.model, "--vae": args.vae,
                                       "--latents": args.latents})


def sample_main(args) -> int:
    check_sample_args(args)
    options = sample_options(args, **({"cfg_scale": 1.0} if args.uncond else {}))
    pipe = TerDiTPipeline.from_pretrained(
        args.model, args.backend, device=args.device, vae=args.vae, plugin=args.plugin,
        dtype=args.dtype, threads=args.threads, kernels=args.kernels, compile=args.compile,
        cuda_graphs=args.cuda_graphs, act_quant=args.act_quant)
    labels = pipe.labels_for(args.classes, args.num, args.imagenet_ids, args.uncond)
    initial = None
    if args.latents:
        info = pipe.info
        initial = read_npy(args.latents, "--latents", LATENTS_FIX,
                           (len(labels), info.in_channels, info.input_size, info.input_size))
    record = pipe.run(args.out, labels, options, initial_latents=initial,
                      save_latents=args.save_latents, overwrite=args.overwrite,
                      progress=args.progress, notes={"imagenet_ids": bool(args.imagenet_ids)},
                      input_files={"--latents": args.latents})
    if "timing" in record:                           # rank 0
        timing = record["timing"]
        new, old = timing.get("images_generated_rank0", 0), timing.get("images_resumed_rank0", 0)
        rate = timing.get("images_per_second_rank0")
        what = "image(s)" if record["outputs"]["images"] else "latent(s) (no VAE: no images)"
        where = args.out if record["outputs"]["images"] else f"{args.out}/latents.npy"
        print(f"wrote {new} new {what} to {where}"
              + (f", {old} resumed, {len(labels)} in total" if old else "")
              + (f" ({rate} img/s on rank 0)" if rate else ""))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build-engine":
        return run_cli(lambda: args.func(args), f"building an engine from {args.onnx}", RESTART,
                       "lower --max-batch or --workspace-gib")
    return run_cli(lambda: args.func(args), f"sampling into {args.out}", RESUMABLE,
                   "lower --batch-size, then run the same command to resume")
