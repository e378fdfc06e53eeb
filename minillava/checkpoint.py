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

Reading a checkpoint can go wrong in ways that are situations, not bugs: there is none yet
(`CheckpointNotFoundError`: run `make train`); it was written for another vocabulary, another
model or another stage (`CheckpointMismatchError`: retrain, or pass the right file); or the file
is cut short or is no checkpoint at all (`CheckpointUnreadableError`, a kind of mismatch). The
`minillava` command prints each in one line.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
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


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the code reading it (e.g. trained with another vocabulary).

    Not a bug to debug but a situation to explain: the `minillava` command prints its message in
    one line instead of a traceback.
    """


class CheckpointUnreadableError(CheckpointMismatchError):
    """A file where a checkpoint should be that cannot be read as one: empty, cut short (a copy
    or a download that stopped half-way), or something else entirely.

    A kind of CheckpointMismatchError, so that the `minillava` command prints it in one line too.
    """


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`, refusing pickled code.

    A file that is not a whole checkpoint raises CheckpointUnreadableError naming it: torch's
    own errors for it (an EOFError, a "failed finding central directory" from the zip reader, a
    KeyError from the unpickler) would only say where torch gave up, not what is wrong.
    """
    path = require_checkpoint(path)
    what_to_do = "delete it and train again (or pass another checkpoint)"
    if path.stat().st_size == 0:
        raise CheckpointUnreadableError(f"checkpoint {path} is empty; {what_to_do}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # whatever torch's reader stumbled on
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
            raise CheckpointUnreadableError(  # a whole file, but with code in it: refused
                f"checkpoint {path} holds pickled Python objects, which "
                "torch.load(weights_only=True) refuses to run; load only checkpoints that "
                "`minillava train` wrote"
            ) from None
        raise CheckpointUnreadableError(
            f"checkpoint {path} cannot be read: it is cut short (an interrupted copy?) or not a "
            f"checkpoint at all; {what_to_do}"
        ) from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and "step" in ckpt):
        raise CheckpointUnreadableError(
            f"checkpoint {path} is not one minillava writes (it has no model weights and step); "
            f"{what_to_do}"
        )
    return ckpt


def weights_mismatch(model: nn.Module, state: Mapping) -> str | None:
    """How the weights `state` do not fit `model`, in a few words (None: they fit).

    `load_state_dict` would say it too, in a paragraph per tensor; this is the one line a person
    needs: the first weight whose shape differs, or the names that are missing or left over.
    """
    own = model.state_dict()
    for key, value in own.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            return (
                f"{key} is {list(state[key].shape)} in the checkpoint but {list(value.shape)} "
                "in this model"
            )
    missing = [key for key in own if key not in state]
    extra = [key for key in state if key not in own]
    parts = [
        f"{len(keys)} weights {kind} (e.g. {keys[0]})"
        for keys, kind in ((missing, "missing"), (extra, "left over"))
        if keys
    ]
    return ", ".join(parts) or None


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
    Raises CheckpointNotFoundError if there is no file at `path`; CheckpointMismatchError (a
    ValueError) if the file is not a whole checkpoint, if it is no LLaVA (another stage's, such
    as lm.pt or clip.pt), if its weights do not fit its config, or if its vocabulary is not the
    tokenizer's (`check_vocabulary`).
    """
    ckpt = load_checkpoint(path)
    info = {key: value for key, value in ckpt.items() if key not in ("model", "optimizer")}
    tokenizer = get_tokenizer(info["config"].get("tokenizer", "shapesworld"))
    pass_this = "pass the llava.pt that `minillava train` writes (the final model)"
    stage = (ckpt.get("extra") or {}).get("stage")
    if stage in ("lm", "clip"):  # the parts trained before LLaVA is assembled
        part = "the decoder alone" if stage == "lm" else "CLIP's ViT and text encoder"
        raise CheckpointMismatchError(
            f"checkpoint {path} is the {stage!r} stage's ({part}), not a LLaVA model; {pass_this}"
        )
    try:
        config = config_from_dict(LlavaConfig, ckpt["model_config"])
    except (KeyError, TypeError, ValueError):  # the config of some other model, or none
        raise CheckpointMismatchError(
            f"checkpoint {path} is not a LLaVA model (its config is not a LlavaConfig); {pass_this}"
        ) from None
    check_vocabulary(path, config.text.vocab_size, config.image_token_id, tokenizer)
    model = Llava(config)
    mismatch = weights_mismatch(model, ckpt["model"])
    if mismatch:  # e.g. a LoRA run's instruct.pt, whose adapters are not merged yet
        raise CheckpointMismatchError(
            f"checkpoint {path}: the weights do not fit the model its config describes "
            f"({mismatch}); {pass_this}"
        )
    model.load_state_dict(ckpt["model"])
    model.to(pick_device(str(device))).eval()
    return model, tokenizer, info
