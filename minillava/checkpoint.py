"""Checkpoints: save and load training state safely.

A checkpoint is one `torch.save`d dict of tensors and plain Python values:

    {"model": state_dict, "optimizer": state_dict | None, "scheduler": state_dict | None,
     "step": int, "config": dict, "model_config": dict, "extra": dict}

Two rules make it safe:

* **Atomic writes.** We write `path.tmp`, flush it to disk (fsync) and only then rename it over
  `path`. A run killed mid-save (Ctrl-C, out of memory, a pre-empted GPU) leaves the previous
  checkpoint intact instead of a truncated file.
* **No pickled code.** `torch.load(..., weights_only=True)` refuses to unpickle arbitrary objects,
  so loading a checkpoint someone sent you cannot execute code. That is why configs are stored
  as plain dicts (`dataclasses.asdict`), never as dataclass objects, and `save_checkpoint` checks
  this before writing rather than letting the load fail later; `config_from_dict` (and, for the
  ShapesWorld a run trained on, `world_config_from_dict`) turns them back into dataclasses.

Reading a checkpoint can go wrong in two ways that are situations, not bugs: there is none yet
(`CheckpointNotFoundError`: run `make train`), or it was written for another vocabulary
(`CheckpointMismatchError`: retrain). The `minillava` command prints either in one line.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from minillava.data.shapes import WorldConfig
from minillava.device import pick_device
from minillava.llava import Llava, LlavaConfig
from minillava.tokenizer import get_tokenizer

# Where `make train` (`minillava train --preset cpu`) writes the final model, and so where
# `minillava chat`, `eval` and `export` look when no --checkpoint is given.
DEFAULT_CHECKPOINT = "runs/cpu/llava.pt"

PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor, torch.Size)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside `DistributedDataParallel(...)` (`.module`) or `torch.compile`."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _check_plain(value: object, where: str) -> None:
    """Raise if `value` holds anything `torch.load(weights_only=True)` would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise TypeError(
            f"save_checkpoint: {where} is a {type(value).__name__}; checkpoints hold only "
            "tensors and plain Python values (use dataclasses.asdict for configs)"
        )


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: object | None = None,
    step: int,
    config: dict,
    model_config: dict,
    extra: dict | None = None,
) -> None:
    """Write a checkpoint atomically (temp file, fsync, rename)."""
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "config": config,
        "model_config": model_config,
        "extra": extra or {},
    }
    for key in ("config", "model_config", "extra", "optimizer", "scheduler"):
        _check_plain(state[key], key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
    os.replace(tmp, path)  # atomic on POSIX and Windows: readers see old or new, never half


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for: the model has not been trained yet (or the path is
    wrong). The `minillava` command prints the message in one line and exits with status 1."""


def require_checkpoint(path: str | Path) -> Path:
    """`path` as a Path if a file is there; else CheckpointNotFoundError saying how to get one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"no checkpoint at {path}; run `make train` first (or pass --checkpoint PATH)"
        )
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`, refusing pickled code."""
    path = require_checkpoint(path)
    return torch.load(path, map_location=map_location, weights_only=True)


T = typing.TypeVar("T")


def config_from_dict(cls: type[T], values: Mapping) -> T:
    """Rebuild a (possibly nested) config dataclass from the dict `dataclasses.asdict` made.

    A tuple written to JSON (preset.json, a notebook's copy) comes back as a list, so a field
    typed as a tuple gets its lists turned back into tuples, nested ones too (a tuple of pairs).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)} in checkpoint config")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif isinstance(value, list | tuple) and typing.get_origin(hint) is tuple:
            value = _as_tuples(value)
        kwargs[name] = value
    return cls(**kwargs)


def _as_tuples(value):
    """Lists (and tuples) -> tuples, all the way down: [["a", "b"]] -> (("a", "b"),)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def world_config_from_dict(world: Mapping | None, image_size: int) -> WorldConfig:
    """The ShapesWorld a run trained on, from the `world` dict its checkpoint stores, drawn at
    `image_size` (the model's ViT input size).

    `minillava train` stores `asdict(stages.world_config(preset))` as the run config's "world",
    so evaluation renders images the way training did. Fields this code does not know (a newer
    run's) are ignored rather than refused: the scenes can still be drawn. None: the defaults.
    """
    known = {f.name for f in dataclasses.fields(WorldConfig)}
    values = {k: v for k, v in (world or {}).items() if k in known}
    return config_from_dict(WorldConfig, {**values, "image_size": image_size})


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the code reading it (e.g. trained with another vocabulary).

    Not a bug to debug but a situation to explain: the `minillava` command prints its message in
    one line instead of a traceback.
    """


def check_vocabulary(path: str | Path, vocab_size: int, image_token_id: int, tokenizer) -> None:
    """Raise if a checkpoint's decoder was trained with another vocabulary than `tokenizer`'s.

    The weights alone cannot tell: an embedding table of 666 rows loads without complaint, and
    the mismatch would surface only later, as an index error deep inside `nn.Embedding` when the
    tokenizer hands it id 683, or as silently wrong text when the ids merely shift. The vocabulary
    size and the id of `<image>` (where the image tokens are spliced in) are the two numbers the
    model bakes in, so we compare them up front and say what to do.
    """
    mismatches = []
    if vocab_size != tokenizer.vocab_size:
        mismatches.append(
            f"vocab_size {vocab_size} in the checkpoint vs {tokenizer.vocab_size} in the tokenizer"
        )
    if image_token_id != tokenizer.image_id:
        mismatches.append(
            f"<image> id {image_token_id} in the checkpoint vs {tokenizer.image_id} in the "
            "tokenizer"
        )
    if mismatches:
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} was trained with another vocabulary than tokenizer "
            f"{tokenizer.name!r} ({'; '.join(mismatches)}). The tokenizer changed since this "
            "checkpoint was written; retrain with `minillava train` (or `make train`) to get a "
            "checkpoint that matches it."
        )


def load_llava(path: str | Path, device: str | torch.device = "auto"):
    """Rebuild the trained LLaVA from a checkpoint: returns (model in eval mode, tokenizer, info).

    `info` is the checkpoint dict without the weights: `info["config"]` is the training preset as
    a dict (its `world` entry is the ShapesWorld config the model was trained on, so evaluation
    renders images the same way), `info["model_config"]` the `LlavaConfig` as a dict.
    Raises CheckpointNotFoundError if there is no file at `path`, CheckpointMismatchError (a
    ValueError) if the checkpoint's vocabulary is not the tokenizer's (`check_vocabulary`).
    """
    ckpt = load_checkpoint(path)
    info = {key: value for key, value in ckpt.items() if key not in ("model", "optimizer")}
    tokenizer = get_tokenizer(info["config"].get("tokenizer", "shapesworld"))
    config = config_from_dict(LlavaConfig, ckpt["model_config"])
    check_vocabulary(path, config.text.vocab_size, config.image_token_id, tokenizer)
    model = Llava(config)
    model.load_state_dict(ckpt["model"])
    model.to(pick_device(str(device))).eval()
    return model, tokenizer, info
