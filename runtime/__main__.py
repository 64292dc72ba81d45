"""python -m runtime {sample, build-engine}: batch sampling over ONNX Runtime, TensorRT or PyTorch."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .backends import BACKENDS, BackendError, open_backend
from .pipeline import Pipeline, SampleOptions, SamplingError, imagenet_to_model_label, open_vae
from .schedulers import SAMPLERS

DEFAULTS = SampleOptions()


def add_sample_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sample", help="generate images", description=(
            "Generate images with a ternary DiT. Writes OUT/images/NNNNNN.png (global index), "
            "OUT/grid.png, OUT/samples.npz (ADM format: arr_0 uint8 NHWC, arr_1 labels) and "
            "OUT/samples.json; image i's noise depends only on (--seed, i), so results do not "
            "depend on --batch-size or the number of ranks. Re-running the same command resumes. "
            "Scale out with `torchrun --nproc_per_node=N -m runtime sample ... --num-images N`."))
    p.add_argument("--model", required=True, metavar="DIR|FILE",
                   help="an export directory (python -m exporter) for ort/trt, or a checkpoint for torch")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="ort (ONNX Runtime), trt (TensorRT plan in DIR/model.plan) or torch "
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
    how = p.add_argument_group("sampler")
    how.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS.sampler,
                     help="ddpm: IDDPM ancestral with learned variance (official default, 250 "
                          "steps); ddim; dpm-solver: DPM-Solver++(2M) (default: %(default)s)")
    how.add_argument("--steps", type=int, default=DEFAULTS.steps,
                     help="sampling steps, respaced as the official code does (default: %(default)s)")
    how.add_argument("--eta", type=float, default=DEFAULTS.eta, help="DDIM eta (default: %(default)s)")
    how.add_argument("--cfg", type=float, default=DEFAULTS.cfg_scale, metavar="SCALE",
                     help="classifier-free guidance scale; 1 disables it (default: %(default)s)")
    how.add_argument("--cfg-mode", choices=("official", "standard"), default=None,
                     help="official: guide eps channels 0..2 (the TerDiT release; default for "
                          "4-channel latents); standard: all eps channels (default otherwise)")
    how.add_argument("--clip-denoised", dest="clip_denoised", action="store_true", default=None,
                     help="clamp each predicted x_0 to [-1, 1] (default: on for pixel-space "
                          "models, off for latent models as in the official sampler)")
    how.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false")
    how.add_argument("--seed", type=int, default=DEFAULTS.seed, help="(default: %(default)s)")
    how.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                     help="images per forward; halved automatically on out-of-memory "
                          "(default: %(default)s)")
    how.add_argument("--latents", metavar="FILE.npy", default=None,
                     help="initial latents (N, C, H, W) instead of seeded noise, e.g. to reproduce "
                          "another tool's run")
    io_ = p.add_argument_group("outputs and devices")
    io_.add_argument("--out", required=True, help="output directory")
    io_.add_argument("--save-latents", action="store_true",
                     help="also write the final latents (before VAE decoding) as latents.npy")
    io_.add_argument("--vae", metavar="DIR|FILE", default=None,
                     help="VAE for latent models: a diffusers AutoencoderKL directory or a "
                          "vae_decoder.onnx (default: the export's vae_decoder.onnx if present)")
    io_.add_argument("--overwrite", action="store_true",
                     help="discard samples of a different run in --out instead of refusing")
    io_.add_argument("--plugin", default=None,
                     help="TensorRT plugin library for --backend trt (or env TERDIT_TRT_PLUGIN)")
    io_.add_argument("--device", default=None, help="torch backend device (default: cuda if present)")
    io_.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                     help="torch backend compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    io_.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    io_.add_argument("--fp8", action="store_true",
                     help="torch backend: FP8 activations on the token GEMMs (W1.58A8); FP8 "
                          "tensor cores on CUDA, torch's emulation on the CPU")
    io_.add_argument("--fp8-fast-accum", action="store_true",
                     help="with --fp8: cuBLASLt fast FP8 accumulation (faster, less exact)")
    io_.add_argument("--no-compile", dest="compile", action="store_false",
                     help="torch backend on CUDA: do not torch.compile the blocks")
    io_.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                     help="torch backend on CUDA: do not capture CUDA graphs")
    io_.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar")
    p.set_defaults(func=sample_main)
    return p


def build_parser() -> argparse.ArgumentParser:
    from .tensorrt_engine import add_build_engine_subparser
    parser = argparse.ArgumentParser(prog="python -m runtime",
                                     description="TerDiT Deploy runtime: batch sampling and "
                                                 "TensorRT engine builds.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(sub)
    add_build_engine_subparser(sub)
    return parser


def _labels(args, info) -> list[int]:
    if args.uncond:
        if args.classes:
            raise ValueError("--uncond and --classes exclude each other")
        n = args.num if args.num is not None else 1
        return [info.null_class] * max(n, 0) if n > 0 else _bad_num(n)
    classes = args.classes
    if classes is None:
        classes = list(range(info.num_classes))
    elif args.imagenet_ids:
        classes = [imagenet_to_model_label(c) for c in classes]
    for c in classes:
        if not 0 <= c < info.num_classes:
            raise ValueError(f"class label {c} is outside [0, {info.num_classes}) for this model "
                             f"(the null label {info.null_class} is not a user label; use --uncond)")
    n = args.num if args.num is not None else len(classes)
    if n < 1:
        _bad_num(n)
    return [classes[i % len(classes)] for i in range(n)]


def _bad_num(n):
    raise ValueError(f"--num {n} must be a positive count")


def _distributed():
    """(rank, world size, barrier) under torchrun; a single process needs no torch.distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def sample_main(args) -> int:
    rank, world, barrier = _distributed()
    try:
        options = SampleOptions(steps=args.steps, sampler=args.sampler, eta=args.eta,
                                cfg_scale=1.0 if args.uncond else args.cfg, cfg_mode=args.cfg_mode,
                                seed=args.seed, batch_size=args.batch_size,
                                clip_denoised=args.clip_denoised)
        device = args.device
        if device is None and world > 1:
            import torch
            if torch.cuda.is_available():
                device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        backend = open_backend(args.model, args.backend, plugin=args.plugin, device=device,
                               dtype=args.dtype, threads=args.threads, compile=args.compile,
                               cuda_graphs=args.cuda_graphs, fp8=args.fp8,
                               fp8_fast_accum=args.fp8_fast_accum)
        labels = _labels(args, backend.info)
        model_path = Path(args.model)
        vae = None
        if backend.info.in_channels == 4 or args.vae:
            vae = open_vae(args.vae, model_path if model_path.is_dir() else None)
        initial = None
        if args.latents:
            try:
                initial = np.load(args.latents, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"--latents {args.latents}: cannot read a .npy array ({err})") from None
        record = Pipeline(backend, vae).run(
            args.out, labels, options, initial_latents=initial, save_latents=args.save_latents,
            overwrite=args.overwrite, rank=rank, world_size=world, barrier=barrier,
            progress=args.progress, extra_settings={"imagenet_ids": bool(args.imagenet_ids)})
    except (ValueError, BackendError, SamplingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        timing = record.get("timing", {})
        rate = timing.get("images_per_second_rank0")
        print(f"wrote {len(labels)} image(s) to {args.out}"
              + (f" ({rate} img/s on rank 0)" if rate else ""))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
