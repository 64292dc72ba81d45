"""What a training run is built from: the data, the model config checked against it (a preset
follows an image folder's channels and classes) and against the machine's memory, and the
initial model."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Optional

import torch

from terdit_common.errors import UserError
from terdit_common.inputs import read_json_file
from terdit_common.limits import MAX_PARAMETERS, is_int, physical_memory

from ..checkpoint import load_checkpoint
from ..config import TerDiTConfig
from ..model import TerDiT
from .train_config import TrainConfig
from .data import ArrayDataset, load_dataset


def load_training_data(tc: TrainConfig) -> ArrayDataset:
    """--data at the model's image size (an image folder keeps its own channel count)."""
    arch = _arch(tc)
    return load_dataset(tc.data, tc.data_path, image_size=arch.input_size,
                        channels=None if tc.data == "folder" else arch.in_channels)


def _arch(tc: TrainConfig) -> TerDiTConfig:
    return load_model_config(tc.model_config) if tc.model_config else \
        TerDiTConfig.from_name(tc.model)


# config fields the trainer sets from its own flags: field -> (flag, the field's value when the
# flag is not given)
FLAG_FIELDS = {"class_dropout_prob": ("class_dropout", TrainConfig.class_dropout),
               "ternary": ("fp", not TrainConfig.fp)}


def load_model_config(path: str, given: Optional[dict] = None) -> TerDiTConfig:
    """--model-config: a JSON file of TerDiTConfig fields, each of its field's type (UserError
    naming the file, the field and the value). With `given` (the flags of a command line), a
    field that a trainer flag sets (FLAG_FIELDS) must agree with the flag when it is not given:
    the file's value would be replaced without a word."""
    fix = ("fix the file (TerDiTConfig fields as JSON, e.g. a checkpoint's config.json 'config' "
           "object)")
    where = f"--model-config {path}"
    data = read_json_file(path, "--model-config", fix)
    if isinstance(data, dict):
        _check_field_types(data, where, fix)
    try:
        cfg = TerDiTConfig.from_dict(data, source=str(path))
    except ValueError as err:
        raise UserError(f"--model-config {err}; {fix}") from None
    for field, (flag, implied) in FLAG_FIELDS.items() if given is not None else ():
        if field in data and flag not in given and data[field] != implied:
            option = "--" + flag.replace("_", "-")
            give = option if flag == "fp" else f"{option} {data[field]}"
            raise UserError(f"{where}: {field} {_json_value(data[field])} would be replaced "
                            f"by {_json_value(implied)}, the trainer's setting without "
                            f"{option}; give {give} instead, or remove {field} from the file")
    return cfg


def _check_field_types(data: dict, where: str, fix: str) -> None:
    """Every known field of `data` of its TerDiTConfig type (int, float, bool, or null where the
    field is Optional), before TerDiTConfig compares values."""
    hints = typing.get_type_hints(TerDiTConfig)
    for field, value in data.items():
        hint = hints.get(field)
        if hint is None:
            continue                             # unknown fields: TerDiTConfig names them
        kinds = typing.get_args(hint) or (hint,)
        if value is None and type(None) in kinds:
            continue
        kind = next(k for k in kinds if k is not type(None))
        ok = {int: is_int(value), bool: isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
        if not ok:
            want = {int: "an integer", bool: "true or false", float: "a number"}[kind]
            null = " or null" if type(None) in kinds else ""
            raise UserError(f"{where}: field {field} is {_json_value(value)}, expected "
                            f"{want}{null}; {fix}")


def _json_value(value) -> str:
    """`value` as JSON writes it, cut to fit a line, with its kind where JSON does not show it."""
    text = json.dumps(value)
    text = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
    return {str: "the string ", list: "the list ", dict: "the object "}.get(type(value), "") + text


def model_config(tc: TrainConfig, dataset: ArrayDataset, log=print) -> TerDiTConfig:
    """The model config from --model-config (JSON) or --model, checked against the data. A
    preset (--model) takes the channel and class counts of an image folder; an explicit
    --model-config must agree with the data."""
    if tc.model_config:
        cfg = load_model_config(tc.model_config)
        what = f"--model-config {tc.model_config}"
    else:
        cfg = TerDiTConfig.from_name(tc.model)
        what = f"--model {tc.model}"
        if tc.data == "folder":
            c = dataset.sample_shape[0]
            if (c, dataset.num_classes) != (cfg.in_channels, cfg.num_classes):
                log(f"note: {what} adapted to the image folder: {c} channel(s), "
                    f"{dataset.num_classes} classes ({', '.join(dataset.classes[:10])}"
                    f"{', ...' if dataset.num_classes > 10 else ''})")
                cfg = cfg.replace(in_channels=c, num_classes=dataset.num_classes)
    cfg = cfg.replace(ternary=not tc.fp, class_dropout_prob=tc.class_dropout)
    c, h, w = dataset.sample_shape
    if (c, h, w) != (cfg.in_channels, cfg.input_size, cfg.input_size):
        raise UserError(f"{dataset.name} holds samples of shape {(c, h, w)} but {what} takes "
                        f"({cfg.in_channels}, {cfg.input_size}, {cfg.input_size})"
                        f"{_preset_note(cfg)}; choose a matching --model / --model-config")
    if dataset.num_classes > cfg.num_classes or (tc.data == "folder" and
                                                 dataset.num_classes != cfg.num_classes):
        raise UserError(f"{dataset.name} has {dataset.num_classes} classes but {what} has "
                        f"{cfg.num_classes}; set num_classes in the model config")
    return cfg


def _preset_note(cfg: TerDiTConfig) -> str:
    if cfg.in_channels == 4:
        return (f" (a latent-space model: {cfg.in_channels}-channel {cfg.input_size}x"
                f"{cfg.input_size} SD-VAE latents, for --data latents)")
    return ""


# bytes per parameter a training rank holds: fp32 weights, gradients, AdamW's two moments, EMA
TRAINING_BYTES_PER_PARAMETER = 20


def count_parameters(cfg: TerDiTConfig) -> int:
    """The parameters of TerDiT(cfg), counted without allocating them (one block is built on
    the meta device; every block is the same)."""
    with torch.device("meta"):
        one = TerDiT(cfg.replace(n_layers=1))
    block = sum(p.numel() for p in one.layers[0].parameters())
    return sum(p.numel() for p in one.parameters()) + (cfg.n_layers - 1) * block


def training_bytes(cfg: TerDiTConfig, tc: TrainConfig, world: int) -> tuple[int, int]:
    """(parameters, bytes of the training state one rank holds: FSDP shards it over ranks)."""
    n = count_parameters(cfg)
    shards = world if tc.strategy == "fsdp" and world > 1 else 1
    return n, n * TRAINING_BYTES_PER_PARAMETER // shards


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory of `device` (a GPU's, or the machine's for the CPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return physical_memory()


def check_model_size(cfg: TerDiTConfig, tc: TrainConfig, device: torch.device,
                     world: int) -> None:
    """Refuse, before the model is built, one over limits.MAX_PARAMETERS or whose training
    state alone would not fit in `device`'s memory."""
    what = f"--model-config {tc.model_config}" if tc.model_config else f"--model {tc.model}"
    n, need = training_bytes(cfg, tc, world)
    if n > MAX_PARAMETERS:
        raise UserError(f"{what}: {n:.3g} parameters (dim {cfg.dim}, n_layers {cfg.n_layers}), "
                        f"more than {MAX_PARAMETERS:.3g} (limits.MAX_PARAMETERS); choose a "
                        f"smaller model")
    have = device_memory(device)
    if have is not None and need > have:
        raise UserError(f"{what}: {n:.3g} parameters need {_gib(need)} of training state per "
                        f"rank ({TRAINING_BYTES_PER_PARAMETER} bytes each: weights, gradients, "
                        f"AdamW moments, EMA), more than the {_gib(have)} of "
                        f"{_device_name(device)}; choose a smaller model, or shard it over "
                        f"several GPUs (torchrun, --strategy fsdp)")


def out_of_memory_error(err: BaseException, cfg: TerDiTConfig, tc: TrainConfig,
                        device: torch.device, world: int) -> UserError:
    """The out-of-memory `err` of a training run as one line naming its likely cause: the model
    (its training state holds most of the memory) or the batch (the activations do)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
    n, state = training_bytes(cfg, tc, world)
    have = device_memory(device)
    where = _device_name(device)
    if have is not None and state > have / 2:
        cause = (f"the model: {n:.3g} parameters hold {_gib(state)} of training state per "
                 f"rank, most of the {_gib(have)} of {where}; choose a smaller --model / "
                 f"--model-config, or shard it over several GPUs (--strategy fsdp)")
    else:
        cause = (f"the batch: the model's training state is {_gib(state)}, so the "
                 f"activations of {tc.global_batch // world} samples per step and rank "
                 f"(--global-batch {tc.global_batch}) fill {where}; lower --global-batch")
    return UserError(f"out of memory while training ({text}); the likely cause is {cause}")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.4g} GiB"


def _device_name(device: torch.device) -> str:
    return f"GPU {device}" if device.type == "cuda" else "this machine's memory"


def build_model(tc: TrainConfig, cfg: TerDiTConfig) -> TerDiT:
    torch.manual_seed(tc.seed)
    model = TerDiT(cfg)
    if tc.init_from:
        init_from_fp(model, tc.init_from)
    return model


@torch.no_grad()
def init_from_fp(model: TerDiT, path: str | Path) -> None:
    """Copy full-precision weights into the model being trained: a latent ternary model (QAT
    from fp weights; every alpha is reset to the absmean (gamma) of its copied latent weight)
    or a full-precision one (fp fine-tuning, e.g. the fp twin of a QAT run)."""
    src = load_checkpoint(path).model
    differ = [f"{f.name} {getattr(src.cfg, f.name)!r} vs {getattr(model.cfg, f.name)!r}"
              for f in dataclasses.fields(TerDiTConfig)
              if f.name not in ("ternary", "class_dropout_prob")
              and getattr(src.cfg, f.name) != getattr(model.cfg, f.name)]
    if differ:
        raise UserError(f"--init-from {path}: its config does not match the model being trained "
                        f"({'; '.join(differ)}); pass the --model / --model-config it was "
                        f"trained with")
    if src.cfg.ternary:
        raise UserError(f"--init-from {path}: expected a full-precision checkpoint "
                        f"(weights 'float'), got a ternary one")
    state = src.state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(".alphas")]
    if missing:
        raise UserError(f"--init-from {path}: missing keys {missing[:5]}")
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()})
    for layer in model.ternary_layers():
        layer.reset_alpha()
