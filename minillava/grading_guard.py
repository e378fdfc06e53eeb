"""What your code may not change: its arguments, and the grader.

Your arguments are copies. A check keeps its inputs to compute the reference after calling you.
If your function wrote into them (`x += 1`, `x.mul_(2)`, `ids.append(...)`), the reference would
be computed on the changed values and the message would be misleading, or a function that zeroes
its inputs could even pass. So every learner callable is wrapped once, before the check receives
it: it is called on copies of its tensor (and list, tuple, dict) arguments, and a copy that
differs from its original after the call is reported by name. Models handed to your function are
not copied (a check may need to see them change: requires_grad, .grad), but their weights are
compared before and after.

The grader is guarded. A learner's file that rebinds it (`torch.isclose = ...`,
`minillava.grading.assert_close = ...`, a check's `run`) is caught and named: the grading
process takes a snapshot of the grader's names before it forks a check's child, and the child
compares them with it after importing your file and again after the check.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
import sys
import types
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from minillava.grading_checks import _REGISTRY, GradingFailure

# ---------------------------------------------------------------------------------------------
# Your arguments are copies: a function that changes its input is caught and named
# ---------------------------------------------------------------------------------------------


class InputChanged(GradingFailure):
    """Raised when your function changed one of its arguments in place (the check stops)."""


def _copy(value, depth: int = 0):
    """A copy of an argument, handed to your function in place of the check's original."""
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        try:  # same strides as the original, so .view() fails or works exactly as on it
            copy = torch.empty_strided(
                value.size(), value.stride(), dtype=value.dtype, device=value.device
            )
            return copy.copy_(value)  # a differentiable copy: gradients still reach `value`
        except RuntimeError:  # overlapping strides (an expanded tensor), sparse, ...
            return value.clone()
    if depth < 4 and type(value) in (list, tuple):
        return type(value)(_copy(item, depth + 1) for item in value)
    if depth < 4 and type(value) is dict:
        return {key: _copy(item, depth + 1) for key, item in value.items()}
    return value


def _same(original, copy) -> bool:
    """Whether `copy` still equals `original` (it was made by `_copy` before the call)."""
    if original is copy:
        return True
    if isinstance(original, torch.Tensor):
        if not isinstance(copy, torch.Tensor):
            return False
        if original.shape != copy.shape or original.dtype != copy.dtype:
            return False
        try:
            a, b = original.detach(), copy.detach()
            if a.is_floating_point() or a.is_complex():
                return bool(((a == b) | (a.isnan() & b.isnan())).all())
            return torch.equal(a, b)
        except RuntimeError:  # a layout that cannot be compared: assume it was left alone
            return True
    if type(original) in (list, tuple):
        return (
            type(copy) is type(original)
            and len(copy) == len(original)
            and all(_same(a, b) for a, b in zip(original, copy, strict=True))
        )
    if type(original) is dict:
        return (
            type(copy) is dict
            and list(copy) == list(original)
            and all(_same(original[key], copy[key]) for key in original)
        )
    return True


def _weights(value) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, tensor, its values now) for a model's parameters or a single Parameter."""
    if isinstance(value, torch.nn.Module):
        found = [(f".{name}", p) for name, p in value.named_parameters()]
    elif isinstance(value, torch.nn.Parameter):
        found = [("", value)]
    else:
        return []
    return [(name, p, p.detach().clone()) for name, p in found]


def _argument_names(fn, args: Sequence, kwargs: dict) -> list[str]:
    """The name of each argument in your function's signature: x, mask, ... (or "argument 3")."""
    names = [f"argument {i + 1}" for i in range(len(args))] + list(kwargs)
    with contextlib.suppress(TypeError, ValueError):
        params = list(inspect.signature(fn).parameters.values())
        positional = [
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        names[: min(len(args), len(positional))] = positional[: len(args)]
    return names


def _call_on_copies(fn, name: str, args: tuple, kwargs: dict, changed: list[str]):
    """Call `fn` on copies of its arguments; name the first argument it changed in place."""
    copies = [_copy(a) for a in args]
    kwcopies = {key: _copy(value) for key, value in kwargs.items()}
    originals = [*args, *kwargs.values()]
    weights = [_weights(value) for value in originals]
    result = fn(*copies, **kwcopies)
    handed = [*copies, *kwcopies.values()]
    for i, (original, copy) in enumerate(zip(originals, handed, strict=True)):
        what = None
        if not _same(original, copy):
            kind = "tensor" if isinstance(original, torch.Tensor) else type(original).__name__
            what = f"its argument `{_argument_names(fn, args, kwargs)[i]}` (a {kind}) in place"
            fix = f"Leave it as it was and return a new {kind} instead"
            if kind == "tensor":
                fix += " (`x = x + 1`, not `x += 1` or `x.add_(1)`)"
        else:
            for weight_name, tensor, before in weights[i]:
                if not _same(before, tensor):
                    arg = _argument_names(fn, args, kwargs)[i]
                    what = f"the weights of its argument `{arg}` in place ({arg}{weight_name})"
                    fix = "A function that is handed a model only reads its weights"
                    break
        if what is not None:
            message = (
                f"{name} changed {what}. The caller still needs the original: the check computes "
                f"its reference from it. {fix}."
            )
            changed.append(message)
            raise InputChanged(message)
    return result


def _on_copies(obj, changed: list[str]):
    """`obj` as the check will call it: on copies of its arguments (see `_call_on_copies`).

    A function is wrapped; an nn.Module class is subclassed so that `forward` gets copies (the
    instance is still an instance of your class, with your __init__, names and parameters).
    Anything else is handed over as it is.
    """
    if isinstance(obj, type):
        if not issubclass(obj, torch.nn.Module):
            return obj
        try:

            class OnCopies(obj):
                def forward(self, *args, **kwargs):
                    forward = super().forward
                    return _call_on_copies(
                        forward, f"{obj.__name__}.forward", args, kwargs, changed
                    )

        except TypeError:  # a class that refuses subclasses: grade it unwrapped
            return obj
        for attribute in ("__name__", "__qualname__", "__module__", "__doc__"):
            setattr(OnCopies, attribute, getattr(obj, attribute, None))
        return OnCopies
    if not callable(obj):
        return obj
    name = getattr(obj, "__name__", "your function")

    @functools.wraps(obj)
    def on_copies(*args, **kwargs):
        return _call_on_copies(obj, name, args, kwargs, changed)

    return on_copies


# ---------------------------------------------------------------------------------------------
# The grader is guarded: a learner's file that rebinds it is caught and named
# ---------------------------------------------------------------------------------------------


_MISSING = object()

# The torch names the checks' verdicts rest on: the comparisons of the helpers in grading.py
# and of the graders. Only these, not torch's whole namespace: comparing an object touches it,
# and in a forked child the first touch copies a page of memory (all of torch's 2,000 names cost
# ~10 ms a check, these a fraction of one).
_TORCH_NAMES = ("allclose", "isclose", "equal", "all", "any", "isfinite", "isnan", "testing")
_TENSOR_NAMES = (
    *("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__float__"),
    *("__int__", "__len__", "all", "any", "allclose", "isclose", "equal", "item", "tolist"),
    *("abs", "max", "min", "sum", "mean", "detach", "double", "float", "cpu", "numpy", "to"),
)


def _machinery() -> list[tuple[str, object, Sequence[str] | None]]:
    """What a learner's file could rebind to make a wrong answer look right: (name, where, which
    of its names, None for all).

    The grader's files (grading*.py) and the graders (their modules and the classes they
    define), builtins, the registered checks, and torch's comparisons: `minillava.grading.
    assert_close = ...`, `torch.isclose = ...`, `check.run = ...`. Not the library modules the
    checks take their references from (minillava.attention, ...) nor the rest of torch: each
    would double the cost, and a file that patches a reference to agree with its own wrong
    answer is past what this guard is for.
    """
    found: list[tuple[str, object, Sequence[str] | None]] = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("minillava.grading", "minillava.graders")):
            continue
        found.append((name, module, None))
        for key, value in list(vars(module).items()):
            if isinstance(value, type) and value.__module__ == name:
                found.append((f"{name}.{key}", value, None))
    found += [
        ("builtins", builtins, None),
        ("torch", torch, _TORCH_NAMES),
        ("torch.Tensor", torch.Tensor, _TENSOR_NAMES),
    ]
    # The registered checks themselves: `check.run = lambda *a: None` would pass anything.
    found += [(f"check {c.name}", c, ("run",)) for checks in _REGISTRY.values() for c in checks]
    return found


def _snapshot_machinery() -> Callable[..., list[str]]:
    """Remember the grader's names; the returned function lists what changed since, and undoes it.

    A change is a name bound to another object (or deleted), a minillava function whose code was
    swapped, or a new name in a grading*.py or graders file (one that would shadow a builtin).
    `changes(restore=False)` only lists them.
    """
    saved = []
    for label, owner, keys in _machinery():
        names = vars(owner)
        if keys is not None:
            names = {key: names[key] for key in keys if key in names}
        saved.append((label, owner, dict(names)))
    codes = [
        (f"{label}.{key}", value, value.__code__)
        for label, _, names in saved
        if label.startswith("minillava")
        for key, value in names.items()
        if type(value) is types.FunctionType
    ]

    def changes(restore: bool = True) -> list[str]:
        found = []
        for label, owner, names in saved:
            current = vars(owner)
            for key, value in names.items():
                if current.get(key, _MISSING) is not value and (label, key) != ("builtins", "_"):
                    found.append(f"{label}.{key}")
                    if restore:
                        with contextlib.suppress(AttributeError, TypeError):
                            setattr(owner, key, value)
            strict = isinstance(owner, ModuleType) and label.startswith("minillava")
            for key in [k for k in current if strict and k not in names]:
                if not key.startswith("__") and not isinstance(current[key], ModuleType):
                    found.append(f"{label}.{key}")
                    if restore:
                        with contextlib.suppress(AttributeError):
                            delattr(owner, key)
        for name, function, code in codes:
            if function.__code__ is not code:
                found.append(f"{name}.__code__")
                if restore:
                    function.__code__ = code
        return found

    return changes


_LAST_SNAPSHOT: list = []  # [the minillava modules it covers, its `changes`]


def _grader_snapshot() -> Callable[..., list[str]]:
    """The snapshot a check's child compares with, taken here, in the grading process.

    Taking it costs a few milliseconds, more in a forked child (whose first write to each object
    copies a page of memory), and comparing costs less than one. So it is taken before the fork
    and reused from check to check while this process's grader is unchanged (the same minillava
    modules, nothing rebound: a test's monkeypatch or a reload in a notebook makes a new one).
    """
    modules = [n for n in sys.modules if n == "minillava" or n.startswith("minillava.")]
    if _LAST_SNAPSHOT and _LAST_SNAPSHOT[0] == modules and not _LAST_SNAPSHOT[1](restore=False):
        return _LAST_SNAPSHOT[1]
    changes = _snapshot_machinery()
    _LAST_SNAPSHOT[:] = [modules, changes]
    return changes


_GRADER_CHANGED = "Your code changed the grader"


def _grader_changed_message(changed: list[str], when: str) -> str:
    names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return (
        f"{_GRADER_CHANGED} {when}: it changed {names}. A check cannot trust what it "
        "sees after that, so it scores 0. Remove the code that assigns to the grader's, "
        "minillava's or torch's names."
    )
