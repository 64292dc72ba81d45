"""Compact QAT trainer for ternary DiTs: `python -m terdit.train`.

IDDPM objective (eps MSE + VB for the learned-range variance), uniform timesteps, class dropout
for classifier-free guidance, AdamW with a warm-up + cosine learning rate, gradient clipping, an
EMA with warm-up, periodic resumable checkpoints. One GPU or CPU by default; under `torchrun`
(WORLD_SIZE > 1) DDP, or FSDP with `--strategy fsdp`. Every random draw of a step (data order,
timesteps, noise, dropped labels) is a function of (seed, step) and of the sample's position in
the global batch, so a resume continues bit-identically and N ranks train the same model as one.

Output layout (OUT = --out):
  OUT/train_config.json                         the run's record (written when it starts)
  OUT/checkpoints/step_XXXXXXX/{model,ema}/     our checkpoint dirs (latent weights)
  OUT/checkpoints/step_XXXXXXX/train_state.safetensors + train_state.json
  OUT/final/                                    the EMA model (packed for ternary by default;
                                                --final-from live: the last step's weights)
  OUT/log.jsonl, OUT/loss.png, OUT/samples/step_XXXXXXX.png

OUT holds nothing else of ours, and we touch nothing else there (train.state.check_run_dir);
OUT must not be, contain or lie inside an input (--data-path, --model-config, --init-from).
Every input (data, labels, --model-config, --init-from, the run to --resume) and every size is
checked before anything is written into OUT; a run that stops before its first checkpoint
(refused, interrupted, or a loss that is not finite) removes what it wrote.
Exit codes: 0 done; 2 bad input or a loss that is not finite (one `error:` line naming the file,
flag or step); 130 Ctrl-C or SIGTERM (add --resume latest to continue); 1 an internal error (a
bug; one line).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

import torch.distributed as dist

from terdit_common.cli import env_int, run_cli

from ..config import PRESETS
from .train_config import (DEVICES, FINAL_FROM, FINAL_WEIGHTS, LR_SCHEDULES, PRECISIONS,
                           STRATEGIES, TrainConfig)
from .data import DATASETS
from .loop import train
from .setup import load_model_config

# ---- CLI ---------------------------------------------------------------------------------------

# Every TrainConfig field is a flag (--field-name); its default and type come from TrainConfig.
# Optional fields (default None) have no default shown; booleans default to False unless
# listed in NEGATED, whose flag turns them off.
FLAG_HELP = {
    "out": "output directory",
    "model": "model preset (TerDiT-tiny: a test preset on 4x8x8 latents)",
    "model_config": "JSON file of TerDiTConfig fields (instead of --model)",
    "fp": "train the same architecture in full precision (the fp twin)",
    "init_from": "start from the weights of a full-precision checkpoint (ternary QAT from fp "
                 "weights, or fp fine-tuning with --fp)",
    "data": "training data",
    "data_path": "dataset directory / file (default: the dataset's standard location)",
    "steps": "optimizer steps",
    "global_batch": "samples per step over all ranks",
    "lr": "peak learning rate",
    "lr_schedule": "after the warm-up: constant, or a cosine decay to --min-lr-ratio x lr",
    "warmup_steps": "linear learning-rate warm-up (default: min(500, steps / 10))",
    "min_lr_ratio": "final learning rate of the cosine schedule, as a fraction of --lr",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this value",
    "ema_decay": "EMA decay (reached gradually with the warm-up)",
    "ema_warmup": "use --ema-decay from the first step (short runs then sample noise)",
    "class_dropout": "probability of replacing a label by the null class (CFG)",
    "num_timesteps": "diffusion timesteps T",
    "seed": "seed of every random draw",
    "log_every": "steps per OUT/log.jsonl row",
    "ckpt_every": "steps per resumable checkpoint",
    "sample_every": "write an EMA sample grid every N steps (0: never)",
    "sample_steps": "DDIM steps of the previews",
    "sample_cfg_scale": "guidance scale of the previews",
    "final_weights": "form of the ternary model in OUT/final",
    "final_from": "OUT/final holds the EMA or the live (last-step) weights",
    "strategy": "multi-rank strategy under torchrun",
    "precision": "auto: bf16 autocast on CUDA, fp32 on the CPU",
    "device": "where to train",
    "threads": "torch CPU threads (0: torch's default)",
    "compile": "torch.compile the training forward (faster after a one-off compile)",
    "resume": "continue a run from its latest checkpoint ('latest') or a step directory",
    "progress": "no progress bar",
    "overwrite": "start over in an OUT that already holds checkpoints",
}
CHOICES = {"model": sorted(PRESETS), "data": DATASETS, "lr_schedule": LR_SCHEDULES,
           "final_weights": FINAL_WEIGHTS, "final_from": FINAL_FROM, "strategy": STRATEGIES,
           "precision": PRECISIONS, "device": DEVICES}
NEGATED = {"ema_warmup": "--no-ema-warmup", "progress": "--no-progress"}
TYPES = {"warmup_steps": int}


def build_parser() -> argparse.ArgumentParser:
    """Every flag's default is SUPPRESS, so the parsed namespace holds exactly the flags given
    (TrainConfig.from_flags refuses those that would have no effect); the defaults shown come
    from TrainConfig."""
    p = argparse.ArgumentParser(prog="python -m terdit.train", description=__doc__.split("\n")[0],
                                epilog=__doc__[__doc__.index("Exit codes"):].strip())
    for field in dataclasses.fields(TrainConfig):
        name, default, helptext = field.name, field.default, FLAG_HELP[field.name]
        flag = "--" + name.replace("_", "-")
        shown = "" if default is None or isinstance(default, bool) else \
            f" (default: {default})".replace("%", "%%")
        if name in NEGATED:
            p.add_argument(NEGATED[name], dest=name, action="store_false",
                           default=argparse.SUPPRESS, help=helptext)
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=helptext)
        else:
            kind = TYPES.get(name, str) if default is None else type(default)
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                           choices=CHOICES.get(name), help=helptext + shown)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        given = vars(args)
        if "model_config" in given:              # a bad file first, then conflicting flags
            load_model_config(given["model_config"], given)
        tc = TrainConfig.from_flags(given, world=env_int("WORLD_SIZE", 1))
        final = train(tc)
        if env_int("RANK", 0) == 0:
            print(f"final model: {final}")
        return 0

    try:
        out = getattr(args, "out", TrainConfig.out)
        return run_cli(body, f"training into {out}", "add --resume latest to the same "
                       "command to continue from the last checkpoint (a run stopped before its "
                       "first checkpoint leaves nothing: run the same command again)",
                       "use a smaller dataset or model")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

