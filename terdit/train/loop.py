"""The training loop of `python -m terdit.train` (terdit/train/train_cli.py has the command line and
the run's layout): IDDPM objective, class dropout, AdamW with warm-up + cosine, gradient
clipping, EMA, resumable checkpoints, DDP / FSDP under torchrun. Every random draw of a step is a
function of (seed, step) and the sample's position in the global batch, so a resume continues
bit-identically and N ranks train the same model as one."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from terdit_common.cli import is_out_of_memory
from terdit_common.errors import UserError
from terdit_common.files import (LOCK_NAME, append_text, atomic_write_text, check_disjoint,
                                 check_writable_dir, remove_all, remove_stale_temps)
from terdit_common.images import write_grid
from terdit_common.locks import output_lock

from ..checkpoint import save_checkpoint
from ..config import TerDiTConfig
from ..diffusion import GaussianDiffusion
from ..inference import sample_images
from ..model import TerDiT
from .train_config import TrainConfig
from .data import ArrayDataset, mix_seed, batch_indices
from .distributed import Dist, full_tensor, setup_distributed, unwrap, wrap_model
from .plots import plot_losses, read_log
from .setup import (build_model, check_model_size, load_training_data, model_config,
                    out_of_memory_error)
from .state import (CONFIG_JSON, EMA, RUN_FILES, check_run_dir, clear_checkpoints, find_resume,
                    latest_checkpoint, load_training_checkpoint, model_from_params,
                    read_train_state, recover_interrupted_save, save_training_checkpoint)

__all__ = ["preview", "step_draws", "train"]


# ---- the step ------------------------------------------------------------------------------------

def step_draws(tc: TrainConfig, step: int, shape: Sequence[int], null_class: int,
               labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Timesteps, noise and CFG-dropped labels of the global batch of `step` (CPU, from a
    generator seeded by (seed, step) only)."""
    g = torch.Generator().manual_seed(mix_seed(tc.seed, step, 0xD1FF))
    b = shape[0]
    t = torch.randint(0, tc.num_timesteps, (b,), generator=g)
    noise = torch.randn(tuple(shape), generator=g)
    drop = torch.rand(b, generator=g) < tc.class_dropout
    return t, noise, torch.where(drop, torch.full_like(labels, null_class), labels)


def _call(model: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    return model(x, t, y)


def _autocast(tc: TrainConfig, device: torch.device):
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---- training ------------------------------------------------------------------------------------

def train(tc: TrainConfig, dataset: Optional[ArrayDataset] = None) -> Path:
    """Train per `tc`; returns OUT/final. `dataset` overrides --data (tests pass one)."""
    if tc.threads:
        torch.set_num_threads(tc.threads)
    d = setup_distributed(tc)
    out = Path(tc.out)
    with contextlib.ExitStack() as stack:
        if d.main:
            check_writable_dir(out, "--out")
            check_disjoint(out, "--out", {"--data-path": tc.data_path,
                                          "--model-config": tc.model_config,
                                          "--init-from": tc.init_from})
            check_run_dir(out)                         # before anything is created
            stack.enter_context(output_lock(out / LOCK_NAME, f"--out {out}"))
            check_run_dir(out)                         # again, under the lock
            recover_interrupted_save(out)
            remove_stale_temps(out, out / "checkpoints", out / "samples", out / "final")
        return _train(tc, d, out, dataset)


def _train(tc: TrainConfig, d: Dist, out: Path, dataset: Optional[ArrayDataset]) -> Path:
    """Check everything (data, model, resume state, --init-from) before anything is written into
    OUT, then train. What a run wrote before its first checkpoint is removed when it stops (a
    refused, interrupted or diverged run leaves OUT as it was); after that, it can be resumed."""
    if dataset is None:
        dataset = load_training_data(tc)
    cfg = model_config(tc, dataset, log=print if d.main else (lambda s: None))
    check_model_size(cfg, tc, d.device, d.world)
    stale = tc.ema_init_weight()
    if d.main and tc.final_from == "ema" and stale > 0.01:
        print(f"warning: after {tc.steps} steps the EMA (decay {tc.ema_decay}"
              f"{', warm-up' if tc.ema_warmup else ', no warm-up'}) still holds {stale:.0%} of "
              f"the random initialisation, so OUT/final will sample noise; lower --ema-decay, "
              f"keep the EMA warm-up, train longer or pass --final-from live", file=sys.stderr)
    before = {name for name in RUN_FILES if os.path.lexists(out / name)}
    saved: list[int] = []                    # steps checkpointed by this run
    try:
        run = _prepare(tc, d, out, cfg)
        return _write_and_train(tc, d, out, dataset, cfg, run, saved)
    except BaseException as err:
        if d.main and not saved:
            remove_all(out / name for name in RUN_FILES if name not in before | {LOCK_NAME})
        if isinstance(err, Exception) and is_out_of_memory(err):
            raise out_of_memory_error(err, cfg, tc, d.device, d.world) from None
        raise


@dataclass
class _Run:
    """A run checked and set up, before anything is written."""

    wrapped: nn.Module                       # the model, under DDP / FSDP on several ranks
    ema: EMA
    opt: torch.optim.Optimizer
    start: int                               # steps done (0, or the resumed checkpoint's)
    resumed: bool
    log_rows: list[dict]                     # rows of OUT/log.jsonl kept (up to `start`)


def _prepare(tc: TrainConfig, d: Dist, out: Path, cfg: TerDiTConfig) -> _Run:
    """Every check of the resume state, the existing run and --init-from, and the model, EMA and
    optimizer (restored from the checkpoint on --resume); writes nothing."""
    resume_path = find_resume(out, tc.resume) if tc.resume else None
    if d.main and resume_path is None and latest_checkpoint(out) is not None \
            and not tc.overwrite:
        raise UserError(f"{out} already holds checkpoints; pass --resume latest to continue or "
                        f"--overwrite to start over")
    rows: list[dict] = []
    if resume_path is not None:
        recorded = read_train_state(resume_path)["train_config"]
        changed = tc.resume_conflicts(recorded)
        if changed:
            raise UserError(f"--resume {tc.resume}: the run was started with other settings "
                            f"({'; '.join(changed)}); resume with the original settings, or "
                            f"start a new run (another --out)")
    model = build_model(tc, cfg).to(d.device)
    model.train()
    ema = EMA(model, tc.ema_decay)
    wrapped = wrap_model(model, tc.strategy, d)
    if tc.strategy == "fsdp" and d.world > 1:
        ema = EMA(wrapped, tc.ema_decay)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=tc.lr_at(0), weight_decay=tc.weight_decay)
    start = 0
    if resume_path is not None:
        start = int(load_training_checkpoint(resume_path, wrapped, ema, opt)["step"])
        if d.main:
            rows = [r for r in read_log(out / "log.jsonl") if r.get("step", 0) <= start]
    return _Run(wrapped, ema, opt, start, resume_path is not None, rows)


def _write_and_train(tc: TrainConfig, d: Dist, out: Path, dataset: ArrayDataset,
                     cfg: TerDiTConfig, run: _Run, saved: list[int]) -> Path:
    """Write the run's record and log, then train from `run.start`; `saved` collects the steps
    checkpointed."""
    wrapped, ema = run.wrapped, run.ema
    forward = torch.compile(wrapped) if tc.compile else wrapped
    diffusion = GaussianDiffusion.create(None, tc.num_timesteps, learn_sigma=cfg.learn_sigma)
    log_path = out / "log.jsonl"
    if d.main:
        if not run.resumed:
            clear_checkpoints(out)           # --overwrite, or only incomplete checkpoints
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_JSON,
                          json.dumps({"train_config": tc.to_dict(), "model_config": cfg.to_dict(),
                                      "world_size": d.world}, indent=2, sort_keys=True) + "\n")
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in run.log_rows))
    d.barrier()

    bar = None
    if d.main and tc.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=run.start, desc="train", dynamic_ncols=True,
                   file=sys.stderr)
    try:
        _steps(tc, d, out, dataset, cfg, run, forward, diffusion, bar, saved)
    finally:
        if bar is not None:
            bar.close()                      # a message that follows starts on its own line

    final = out / "final"
    if tc.final_from == "ema":
        final_params = ema.full_state()
    else:
        final_params = {n: full_tensor(p).detach().cpu()
                        for n, p in unwrap(wrapped).named_parameters()}
    if d.main:
        final_model = model_from_params(cfg, final_params)
        if cfg.ternary and tc.final_weights == "packed":
            from ..ternary import pack_model_
            pack_model_(final_model)
        meta = {"step": tc.steps, "role": tc.final_from, "train_config": tc.to_dict(),
                "class_names": list(dataset.classes)}   # the runtime captions grids with them
        if tc.final_from == "ema":
            meta["ema_decay"] = tc.ema_decay
        save_checkpoint(final_model, final, overwrite=True, metadata=meta)
    d.barrier()
    return final


def _steps(tc: TrainConfig, d: Dist, out: Path, dataset: ArrayDataset, cfg: TerDiTConfig,
           run: _Run, forward: nn.Module, diffusion: GaussianDiffusion, bar,
           saved: list[int]) -> None:
    """Optimizer steps `run.start` .. --steps, with the log rows, previews and checkpoints; a
    step whose loss or gradient norm is not finite stops the run before anything of it is
    written."""
    wrapped, ema, opt = run.wrapped, run.ema, run.opt
    log_path = out / "log.jsonl"
    local = tc.global_batch // d.world
    lo, hi = d.rank * local, (d.rank + 1) * local
    shape = (tc.global_batch, *dataset.sample_shape)
    window: dict[str, list[float]] = {}
    t_window = time.perf_counter()
    t_start = time.perf_counter()
    for step in range(run.start, tc.steps):
        idx = batch_indices(tc.seed, step, tc.global_batch, len(dataset))
        x, y = dataset.batch(idx)
        t, noise, y = step_draws(tc, step, shape, cfg.null_class, y)
        x, y, t, noise = (v[lo:hi].to(d.device) for v in (x, y, t, noise))

        with _autocast(tc, d.device):
            terms = diffusion.training_losses(functools.partial(_call, forward, y=y), x, t, noise)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), tc.grad_clip)
        lr = tc.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ema.update(wrapped, tc.ema_decay_at(step))

        names = [k for k in ("loss", "mse", "vb") if k in terms] + ["grad_norm"]
        stats = torch.stack([terms[k].detach().float().mean() for k in names[:-1]]
                            + [full_tensor(grad_norm).detach().float()])
        if d.world > 1:
            dist.all_reduce(stats)
            stats /= d.world
        values = dict(zip(names, stats.tolist(), strict=True))
        done = step + 1
        if not all(math.isfinite(v) for v in values.values()):
            raise UserError(_diverged(done, values, tc, cfg, out if saved or run.resumed
                                      else None))
        for k, v in values.items():
            window.setdefault(k, []).append(v)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{window['loss'][-1]:.4f}")
        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            row = {"step": done, **{k: float(np.mean(v)) for k, v in window.items()},
                   "lr": lr, "it_s": len(window["loss"]) / max(now - t_window, 1e-9),
                   "elapsed_s": now - t_start}
            window, t_window = {}, now
            if d.main:
                append_text(log_path, json.dumps(row) + "\n")
        if tc.sample_every and done % tc.sample_every == 0:
            ema_params = ema.full_state()          # collective under FSDP: every rank calls it
            if d.main:
                preview(model_from_params(cfg, ema_params).to(d.device), tc, dataset,
                        out / "samples" / f"step_{done:07d}.png")
        if done % tc.ckpt_every == 0 or done == tc.steps:
            save_training_checkpoint(out, done, wrapped, ema, opt, tc, cfg, d,
                                     {"elapsed_s": time.perf_counter() - t_start})
            saved.append(done)
            if d.main:
                plot_losses({"ternary" if cfg.ternary else "fp": log_path}, out / "loss.png")
            d.barrier()


def _diverged(step: int, values: dict[str, float], tc: TrainConfig, cfg: TerDiTConfig,
              resumable: Optional[Path]) -> str:
    """The message of a step whose loss or gradient norm is NaN or infinite."""
    seen = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    causes = [f"a learning rate too high (--lr {tc.lr:g})",
              "NaN or Inf in the training data (--data-path)"]
    if np.float32(cfg.norm_eps) == 0:        # RMSNorm adds it in fp32: rsqrt(0) of a zero row
        causes.insert(0, f"norm_eps {cfg.norm_eps:g} of the model config, which is 0 in fp32 "
                         f"(the official models use 1e-05)")
    after = (f"; the checkpoints of {resumable} stay: --resume latest continues from the last "
             f"one") if resumable is not None else ""
    return (f"step {step}: the training loss is not finite ({seen}); likely causes: "
            f"{'; '.join(causes)}; nothing of step {step} was written: fix the cause and run "
            f"again{after}")


@torch.no_grad()
def preview(model: TerDiT, tc: TrainConfig, dataset: ArrayDataset, path: Path,
            per_class: int = 8) -> Path:
    """A grid of EMA samples, one column per class (at most 10), from the shared sampler with
    the runtime's noise (the training draws have their own generators, so previews do not
    change training)."""
    classes = min(dataset.num_classes, 10)
    labels = [c for _ in range(per_class) for c in range(classes)]
    options = dataclasses.replace(tc.preview_options(), batch_size=len(labels))
    images = sample_images(model.eval(), labels, options)
    return write_grid(path, images, [dataset.classes[c] for c in labels], ncols=classes)
