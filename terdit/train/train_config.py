"""The trainer's settings: one frozen dataclass (every default lives here; the CLI only maps
flags onto it), plus the learning-rate and EMA schedules that depend on them."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from terdit_common.errors import UserError
from terdit_common.limits import (MAX_BATCH, MAX_COUNT, MAX_SEED, MAX_TIMESTEPS, check_count,
                                  check_threads)
from terdit_common.sampling import SampleOptions
from terdit_common.noise_schedule import MIN_TIMESTEPS, NUM_TRAIN_STEPS

from .data import DATASETS

STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
FINAL_WEIGHTS = ("packed", "latent")
FINAL_FROM = ("ema", "live")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Every training default lives here; the CLI only maps flags onto these fields."""

    out: str = "runs/terdit"
    model: str = "TerDiT-demo"
    model_config: Optional[str] = None     # JSON file of TerDiTConfig fields (overrides model)
    fp: bool = False                       # train the same architecture in full precision
    init_from: Optional[str] = None        # fp checkpoint to start ternary QAT from
    data: str = "fashion-mnist"
    data_path: Optional[str] = None
    steps: int = 10_000
    global_batch: int = 64
    lr: float = 5e-4                       # TerDiT's learning rate (peak of the schedule)
    lr_schedule: str = "cosine"            # constant | cosine (decays to min_lr_ratio * lr)
    warmup_steps: Optional[int] = None     # linear warm-up; None: min(500, steps // 10)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    ema_decay: float = 0.9999              # the decay the EMA warms up to
    ema_warmup: bool = True                # decay of update n: min(ema_decay, (1 + n) / (10 + n))
    class_dropout: float = 0.1
    num_timesteps: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    sample_every: int = 0                  # 0: no preview grids
    sample_steps: int = SampleOptions.steps            # DDIM steps of the previews
    sample_cfg_scale: float = SampleOptions.cfg_scale  # guidance scale of the previews
    final_weights: str = "packed"
    final_from: str = "ema"                # which weights OUT/final holds
    strategy: str = "ddp"
    precision: str = "auto"                # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    threads: int = 0                       # torch CPU threads (0: leave torch's default)
    compile: bool = False                  # torch.compile the training forward
    resume: Optional[str] = None           # "latest" or a checkpoints/step_XXXXXXX directory
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, choices in (("strategy", STRATEGIES), ("precision", PRECISIONS),
                              ("device", DEVICES), ("final_weights", FINAL_WEIGHTS),
                              ("final_from", FINAL_FROM), ("lr_schedule", LR_SCHEDULES),
                              ("data", DATASETS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{_flag(name)} {getattr(self, name)!r} is not one of "
                                 f"{', '.join(choices)}")
        for name in ("steps", "log_every", "ckpt_every"):
            check_count(_flag(name), getattr(self, name), 1, MAX_COUNT)
        check_count("--sample-every", self.sample_every, 0, MAX_COUNT)
        check_count("--global-batch", self.global_batch, 1, MAX_BATCH,
                    "samples per step (limits.MAX_BATCH)")
        check_count("--num-timesteps", self.num_timesteps, 1, MAX_TIMESTEPS,
                    "(limits.MAX_TIMESTEPS)")
        check_threads(self.threads)
        check_count("--seed", self.seed, 0, MAX_SEED)
        if not math.isfinite(self.lr) or self.lr < 0:
            raise ValueError(f"--lr {self.lr!r} must be a finite number >= 0")
        if not math.isfinite(self.grad_clip) or self.grad_clip <= 0:
            raise ValueError(f"--grad-clip {self.grad_clip!r} must be a finite positive number")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"--weight-decay {self.weight_decay!r} must be finite and >= 0")
        self.preview_options()
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must be in "
                             f"[0, --steps {self.steps}]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio {self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay {self.ema_decay} must be in [0, 1)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"--class-dropout {self.class_dropout} must be in [0, 1)")
        if self.num_timesteps < MIN_TIMESTEPS:
            raise ValueError(f"--num-timesteps {self.num_timesteps}: must be at least "
                             f"{MIN_TIMESTEPS} (the linear schedule 1e-4..0.02 rescaled to T "
                             f"steps has betas above 1 below that)")

    def preview_options(self) -> SampleOptions:
        """How the previews sample (--sample-steps, --sample-cfg-scale, --seed), checked by
        SampleOptions with its messages naming the trainer's flags."""
        try:
            return SampleOptions(steps=self.sample_steps, cfg_scale=self.sample_cfg_scale,
                                 seed=self.seed)
        except UserError as err:
            flag, _, rule = str(err).partition(" ")
            raise UserError(f"{PREVIEW_FLAGS.get(flag, flag)} {rule}") from None

    @property
    def warmup(self) -> int:
        return min(500, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr`, then
        constant or a cosine decay to `min_lr_ratio * lr` at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup - 1)
        progress = min(1.0, (step - self.warmup) / span)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def ema_decay_at(self, step: int) -> float:
        """EMA decay of the update after optimizer step `step` (0-based). The warm-up keeps a
        short run from ending with an EMA that is still mostly the random initialisation."""
        if not self.ema_warmup:
            return self.ema_decay
        return min(self.ema_decay, (1.0 + step) / (10.0 + step))

    def ema_init_weight(self, steps: Optional[int] = None) -> float:
        """The share of the initial weights left in the EMA after `steps` updates."""
        weight = 1.0
        for step in range(self.steps if steps is None else steps):
            weight *= self.ema_decay_at(step)
            if weight < 1e-9:
                break
        return weight

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_flags(cls, given: dict, world: int = 1) -> "TrainConfig":
        """The config of the flags a user gave (`given`: field -> value, absent flags left out),
        refusing every flag that would have no effect (each flag acts or is refused)."""
        tc = cls(**given)
        inert = []
        if "model" in given and tc.model_config:
            inert.append(("--model", "--model-config gives the architecture; give one of them"))
        if "min_lr_ratio" in given and tc.lr_schedule == "constant":
            inert.append(("--min-lr-ratio", "it sets the end of the cosine schedule and "
                                            "--lr-schedule is constant"))
        for name in ("sample_steps", "sample_cfg_scale"):
            if name in given and not tc.sample_every:
                inert.append((_flag(name), "it sets the preview grids and --sample-every is 0 "
                                           "(no previews)"))
        if tc.sample_every and tc.num_timesteps != NUM_TRAIN_STEPS:
            inert.append(("--sample-every", f"the previews sample on the {NUM_TRAIN_STEPS}-step "
                                            f"schedule of the runtime, and this model learns "
                                            f"--num-timesteps {tc.num_timesteps}, so they would "
                                            f"be wrong"))
        for name, what in (("sample_every", "no preview would be written"),
                           ("ckpt_every", "the last step is checkpointed anyway"),
                           ("log_every", "the last step is logged anyway")):
            if name in given and getattr(tc, name) > tc.steps:
                inert.append((_flag(name), f"it is more than --steps {tc.steps}, so {what}"))
        if given.get("final_weights") == "packed" and tc.fp:
            inert.append(("--final-weights packed", "a full-precision (--fp) model has no "
                                                    "packed ternary form"))
        if "overwrite" in given and tc.resume:
            inert.append(("--overwrite", "--resume continues the run and replaces nothing"))
        if "strategy" in given and world <= 1:
            inert.append((f"--strategy {tc.strategy}", "it chooses how several ranks share the "
                                                       "model, and this is one process (launch "
                                                       "with torchrun for several)"))
        if inert:
            flag, why = inert[0]
            raise ValueError(f"{flag} would have no effect: {why}; drop {flag.split()[0]}")
        return tc

    def resume_conflicts(self, recorded: dict) -> list[str]:
        """The settings of a resumed run that differ from those it was started with and would
        change its results (a resume must continue the same computation)."""
        changed = []
        for name in RESUME_MUST_MATCH:
            if name == "steps" and self.lr_schedule == "constant":
                continue                     # a constant schedule does not depend on --steps
            if name in recorded and recorded[name] != getattr(self, name):
                changed.append(f"{_flag(name)} {recorded[name]!r} -> {getattr(self, name)!r}")
        return changed


# Fields whose change on --resume would make a different run than the one being continued.
RESUME_MUST_MATCH = ("model", "model_config", "fp", "init_from", "data", "data_path", "steps",
                     "global_batch", "lr", "lr_schedule", "warmup_steps", "min_lr_ratio",
                     "weight_decay", "grad_clip", "ema_decay", "ema_warmup", "class_dropout",
                     "num_timesteps", "seed", "precision")


# SampleOptions' flags -> the trainer's flags of the same setting of the previews
PREVIEW_FLAGS = {"--steps": "--sample-steps", "--cfg-scale": "--sample-cfg-scale"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
