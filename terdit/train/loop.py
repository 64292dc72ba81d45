"""The training loop of `python -m terdit.train` (terdit/train/train_cli.py has the command line and
the run's layout): IDDPM objective, class dropout, AdamW with warm-up + cosine, gradient
clipping, EMA, resumable checkpoints, DDP / FSDP under torchrun. Every random draw of a step is a
function of (seed, step) and the sample's position in the global batch, so a resume continues
bit-identically and N ranks train the same model as one."""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from terdit_common.errors import UserError
from terdit_common.files import (LOCK_NAME, append_text, atomic_write_text, check_disjoint,
                                 check_writable_dir, output_lock, remove_stale_temps)
from terdit_common.images import write_grid
from terdit_common.sampling import SampleOptions

from ..checkpoint import save_checkpoint
from ..diffusion import GaussianDiffusion
from ..inference import sample_images
from ..model import TerDiT
from .train_config import TrainConfig
from .data import ArrayDataset, mix_seed, batch_indices
from .distributed import Dist, full_tensor, setup_distributed, unwrap, wrap_model
from .plots import plot_losses, read_log
from .setup import build_model, load_training_data, model_config
from .state import (CONFIG_JSON, EMA, check_run_dir, clear_checkpoints, find_resume,
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
    if dataset is None:
        dataset = load_training_data(tc)
    cfg = model_config(tc, dataset, log=print if d.main else (lambda s: None))
    stale = tc.ema_init_weight()
    if d.main and tc.final_from == "ema" and stale > 0.01:
        print(f"warning: after {tc.steps} steps the EMA (decay {tc.ema_decay}"
              f"{', warm-up' if tc.ema_warmup else ', no warm-up'}) still holds {stale:.0%} of "
              f"the random initialisation, so OUT/final will sample noise; lower --ema-decay, "
              f"keep the EMA warm-up, train longer or pass --final-from live", file=sys.stderr)
    resume_path = find_resume(out, tc.resume) if tc.resume else None
    if d.main and resume_path is None and (out / "checkpoints").exists():
        if latest_checkpoint(out) is not None and not tc.overwrite:
            raise UserError(f"{out} already holds checkpoints; pass --resume latest to "
                            f"continue or --overwrite to start over")
        clear_checkpoints(out)               # --overwrite, or only incomplete checkpoints
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
    forward = torch.compile(wrapped) if tc.compile else wrapped
    diffusion = GaussianDiffusion.create(None, tc.num_timesteps, learn_sigma=cfg.learn_sigma)

    start = 0
    if resume_path is not None:
        meta = load_training_checkpoint(resume_path, wrapped, ema, opt)
        start = int(meta["step"])
    log_path = out / "log.jsonl"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_JSON,
                          json.dumps({"train_config": tc.to_dict(), "model_config": cfg.to_dict(),
                                      "world_size": d.world}, indent=2, sort_keys=True) + "\n")
        kept = [r for r in read_log(log_path) if r.get("step", 0) <= start]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
    d.barrier()

    local = tc.global_batch // d.world
    lo, hi = d.rank * local, (d.rank + 1) * local
    shape = (tc.global_batch, *dataset.sample_shape)
    bar = None
    if d.main and tc.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True,
                   file=sys.stderr)
    window: dict[str, list[float]] = {}
    t_window = time.perf_counter()
    t_start = time.perf_counter()
    for step in range(start, tc.steps):
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
        for k, v in zip(names, stats.tolist(), strict=True):
            window.setdefault(k, []).append(v)
        done = step + 1
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
            if d.main:
                plot_losses({"ternary" if cfg.ternary else "fp": log_path}, out / "loss.png")
            d.barrier()
    if bar is not None:
        bar.close()

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


@torch.no_grad()
def preview(model: TerDiT, tc: TrainConfig, dataset: ArrayDataset, path: Path,
            per_class: int = 8) -> Path:
    """A grid of EMA samples, one column per class (at most 10), from the shared sampler with
    the runtime's noise (the training draws have their own generators, so previews do not
    change training)."""
    classes = min(dataset.num_classes, 10)
    labels = [c for _ in range(per_class) for c in range(classes)]
    options = SampleOptions(steps=tc.sample_steps, cfg_scale=tc.sample_cfg_scale, seed=tc.seed,
                            batch_size=len(labels))
    images = sample_images(model.eval(), labels, options)
    return write_grid(path, images, [dataset.classes[c] for c in labels], ncols=classes)
