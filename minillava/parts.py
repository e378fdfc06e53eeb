"""Your parts, your model: the functions you wrote in exercises/ run inside the library's LLaVA.

    minillava train --parts exercises        (make train PARTS=exercises)

builds and trains the same model as always, but wherever a chapter's concept is computed (a
*seam*) it calls your function from exercises/chNN_*.py instead of the library's, if yours is
done and passes its checks (`minillava grade chNN`). Where it is not done yet, or fails a check,
the library's runs, and the table printed at the start says which parts are whose, and why.
`--parts solutions` runs the reference solutions at every seam (what the tests compare with the
library); `--parts library`, the default, runs the library alone, exactly as it always has.

The seams, and what your function replaces there:

    exercise (chapter)                   replaces, in the library          adapter (below)
    ch02 scaled_dot_product_attention    attention.attention: every        is_causal -> a causal
                                         attention of the ViT, the CLIP    mask; keep the output,
                                         text encoder and the decoder      not the weights
                                         (both the SDPA and by-hand paths)
    ch04 rms_norm                        decoder.rms_norm: every RMSNorm   computed in float32
    ch04 apply_rotary                    decoder.Attention: rotating the   the batch's rows end
                                         queries and keys (cos/sin table)  to end: positions (B, T)
    ch04 swiglu                          decoder.MLP.forward               -
    ch05 patchify                        vit.PatchEmbedding: the stride-p  yours(images, p) @ Wᵀ
                                         convolution                       (the same map)
    ch05 add_cls_and_positions           vit.VisionEmbeddings.forward      -
    ch06 contrastive_loss                clip.clip_loss (in CLIP.forward)  temperature =
                                                                           1 / exp(logit_scale)
    ch07 linear_projector                projector.LinearProjector         -
    ch07 mlp_projector                   projector.MLPProjector            -
    ch08 splice_image                    llava.splice_row, per row         rows with one <image>
    ch08 build_labels                    llava.splice_row_labels, per row  answer mask = scored
    ch09 lora_forward                    lora.LoRALinear.forward           alpha = the layer's

Each replaces a computation by the same computation: with the reference solutions the losses
and gradients are the library's to float rounding (tests/test_parts.py checks every seam; the
attention, RoPE and CLIP's loss round differently, by about 1e-6 of a value, the others give
the library's numbers bit for bit), so a run with your parts that ends at the same figures,
within run-to-run noise, says your parts are right. Only the speed differs: your attention is
written by hand where the library's calls PyTorch's fused kernel (FlashAttention on a GPU), and
your RoPE computes its angles in every layer where the library looks them up in a table. With
the solutions at every seam, a training step of the tiny preset took 1.2 times as long (CPU).

Where a seam does not fit, the library's code runs there even when yours was chosen: attention
with dropout (the exercise has none), the decoder's MLP when LoRA wraps its layers (the LoRA
layers then run `lora_forward`), a row with no or several <image> tokens, labels that are not
the tokens themselves, and a LoRA layer with dropout while training.

Left out, because the exercise cannot stand in for the library's computation without changing
it: the sampling distribution (ch04 next_token_probs: only a chat with temperature > 0
samples; training and the evaluation decode greedily), greedy_generate (ch10: no images, no
padding, no stop tokens), attend_with_cache (ch04: the library's cache is preallocated),
select_patch_features (ch08: the library stops the ViT at that layer instead of computing every
hidden state), pool_at_eot (ch06: right padding only) and the single-head attention_head (ch05).
The stretch exercises, each chapter's last, are left out too: they build what the cpu preset's
model does not use (grouped-query attention, a Perceiver resampler, 2-D sine-cosine positions,
hard negatives, a ring all-reduce), what runs after training (merge_lora, generation with a cache,
batched generation) or what the library computes its own way (BPE on counted words, Gram-Schmidt,
the batch splice, which the ch08 seam already covers row by row).

A part runs with the device of its first tensor as the default one (`_on_device`), and your
file is imported into the training process, which `minillava grade` never does: a file that
loops or exits when imported stops the training too.

How a seam is wired. The library asks this module at the point where it computes the concept:

    return parts.get("rms_norm", rms_norm)(x, self.weight, self.eps)    # decoder.RMSNorm
    yours = parts.get("patchify")                                       # vit.PatchEmbedding
    if yours is not None: ...

`get` returns the library's function (or None) unless your part was chosen, so the default path
is the library's code, unchanged: a dictionary look-up per call is all a seam costs.

This module imports nothing of minillava at its top: the model's modules import it, so it sits
below them. `use_parts` imports the grader, and your exercise files, only when it is called.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

PARTS = ("library", "exercises", "solutions")  # the values of `minillava train --parts`
YOURS, SOLUTION, LIBRARY = "yours", "solution", "library"  # whose function runs at a seam

# How `minillava train` tells the processes it starts (torchrun workers) which parts passed, so
# that the checks run, and the table is printed, once: the names of the seams that run yours.
PARTS_ENV = "MINILLAVA_PARTS"


# ---------------------------------------------------------------------------------------------
# Adapters: your function, called the way the library's site calls its own
# ---------------------------------------------------------------------------------------------
# Each takes (yours, library, *the site's arguments); `library` is the site's own function (or
# None), for the cases the exercise does not cover.


def _attention(yours, library, q, k, v, mask=None):
    """q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D): your (output, weights), output kept.

    A query row with no key allowed (a fully padded row) is NaN after softmax: zeroed, as the
    library does. (attention.attention turns is_causal into a mask before calling this.)
    """
    out, _weights = yours(q, k, v, mask)
    return out if mask is None else torch.nan_to_num(out, nan=0.0)


def _rms_norm(yours, library, x, weight, eps):
    """x (..., C) -> (..., C), in float32 as the library computes it (under bf16 autocast the
    squares of small numbers would underflow), returned in the library's dtype."""
    return yours(x.float(), weight, eps).to(torch.promote_types(x.dtype, weight.dtype))


def _apply_rotary(yours, library, x, positions, theta):
    """x (B, H, T, D), positions (B, T) -> x rotated, (B, H, T, D).

    Your apply_rotary takes one row of positions (T,) for the whole batch, but here each row has
    its own (left padding shifts them, right padding repeats the last one). So the B rows are
    laid end to end as one sequence of B * T tokens, each with its own position: one call, the
    same arithmetic per token as B calls.
    """
    B, H, T, D = x.shape
    flat = x.transpose(0, 1).reshape(1, H, B * T, D)  # (1, H, B * T, D)
    out = yours(flat, positions.reshape(B * T), theta)
    return out.reshape(H, B, T, D).transpose(0, 1).to(x.dtype)


def _splice_image(yours, library, ids, embeds, images, image_token_id):
    """One row: ids (T,), embeds (T, C), images (n, P, C) -> (T + n (P - 1), C).

    Your splice_image replaces the one <image> of a row; a row with none or several is spliced
    by the library.
    """
    if images.shape[0] != 1:
        return library(ids, embeds, images, image_token_id)
    return yours(ids, embeds, images[0], image_token_id)


def _build_labels(yours, library, ids, labels, image_token_id, num_image_tokens, ignore_index):
    """One row: ids (T,), labels (T,) -> labels of the spliced row (T + n (P - 1),).

    Your build_labels takes an answer mask: the scored positions (label != ignore_index), whose
    label is then the token itself. Where the labels are something else, the library's.
    """
    scored = labels != ignore_index
    if not torch.equal(labels[scored], ids[scored]):
        return library(ids, labels, image_token_id, num_image_tokens, ignore_index)
    out = yours(ids, scored, image_token_id, num_image_tokens, ignore_index)
    return torch.as_tensor(out, dtype=labels.dtype, device=labels.device)


# ---------------------------------------------------------------------------------------------
# The seams
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seam:
    """A place where an exercise's function can run instead of the library's."""

    name: str  # the exercise's function, e.g. "rms_norm"
    chapter: str  # "ch04": its file is exercises/ch04_*.py, its checks minillava/graders/ch04.py
    library: str  # what it replaces: a function or method of minillava, by its dotted name
    runs_in: str  # where in the model, in words (the table's last column)
    adapter: Callable | None = None  # (yours, library, *site arguments); None: called as is


SEAMS = (
    Seam("scaled_dot_product_attention", "ch02", "minillava.attention.attention",
         "every attention: ViT, CLIP text encoder, decoder", _attention),
    Seam("rms_norm", "ch04", "minillava.decoder.rms_norm", "every RMSNorm of the decoder",
         _rms_norm),
    Seam("apply_rotary", "ch04", "minillava.decoder.apply_rotary",
         "the decoder's queries and keys (RoPE)", _apply_rotary),
    Seam("swiglu", "ch04", "minillava.decoder.MLP.forward", "the decoder's MLPs"),
    Seam("patchify", "ch05", "minillava.vit.PatchEmbedding.forward",
         "the ViT's patch embedding"),
    Seam("add_cls_and_positions", "ch05", "minillava.vit.add_cls_and_positions",
         "the ViT's [CLS] token and position embeddings"),
    Seam("contrastive_loss", "ch06", "minillava.clip.clip_loss", "CLIP's loss (clip stage)"),
    Seam("linear_projector", "ch07", "minillava.projector.LinearProjector.forward",
         "the projector, if linear"),
    Seam("mlp_projector", "ch07", "minillava.projector.MLPProjector.forward",
         "the projector, if mlp2x_gelu"),
    Seam("splice_image", "ch08", "minillava.llava.splice_row",
         "image features into each prompt", _splice_image),
    Seam("build_labels", "ch08", "minillava.llava.splice_row_labels",
         "the labels of each spliced prompt", _build_labels),
    Seam("lora_forward", "ch09", "minillava.lora.LoRALinear.forward",
         "every LoRA layer (instruct --lora)"),
)  # fmt: skip
SEAMS_BY_NAME = {seam.name: seam for seam in SEAMS}


# ---------------------------------------------------------------------------------------------
# The registry: which seams run someone else's function
# ---------------------------------------------------------------------------------------------

_chosen: dict[str, Callable] = {}  # seam name -> the exercise's (or solution's) function


def get(name: str, default: Callable | None = None) -> Callable | None:
    """The function that runs at seam `name`: the chosen exercise function, wrapped by its
    adapter to take the site's arguments; `default` (the library's) when none was chosen."""
    yours = _chosen.get(name)
    if yours is None:
        return default
    adapter = SEAMS_BY_NAME[name].adapter
    return yours if adapter is None else functools.partial(adapter, yours, default)


def use(name: str, fn: Callable) -> None:
    """Run `fn` (an exercise's function, with the exercise's signature) at seam `name`."""
    if name not in SEAMS_BY_NAME:
        raise KeyError(f"no seam named {name!r}; seams: {list(SEAMS_BY_NAME)}")
    _chosen[name] = _on_device(fn)


def reset() -> None:
    """The library's function at every seam again."""
    _chosen.clear()


def in_use() -> dict[str, Callable]:
    """{seam name: function} of the seams that do not run the library's."""
    return {name: fn.__wrapped__ for name, fn in _chosen.items()}


def _on_device(fn: Callable) -> Callable:
    """`fn`, run with the device of its first tensor argument as the default device.

    The checks call your function on the CPU, so a `torch.arange(D)` in it passes them; in a
    model on a GPU the same line would make a CPU tensor, and the next product with a GPU one
    would fail. With the GPU as the default device, it makes a GPU tensor, as meant.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None or device.type == "cpu":
            return fn(*args, **kwargs)
        with device:  # torch.device as a context: the default for tensors made inside
            return fn(*args, **kwargs)

    return run


# ---------------------------------------------------------------------------------------------
# Choosing: `minillava train --parts library | exercises | solutions`
# ---------------------------------------------------------------------------------------------


@dataclass
class Choice:
    """One line of the table: whose function runs at `seam`, and why."""

    seam: Seam
    whose: str  # YOURS, SOLUTION or LIBRARY
    why: str = ""


def use_parts(parts: str = "library", decided: set[str] | None = None) -> list[Choice]:
    """Choose, seam by seam, whose function runs: the library's, yours or the solution's.

    parts: "library" (every seam the library's), "solutions" (every seam the reference
        solution's), or "exercises": yours where it is done and passes every check of its
        exercise (`minillava grade`), the library's where not.
    decided: the seams that passed, as another process found (`decided_in_env`): they run yours
        without checking again.
    Returns one Choice per seam, in the order of SEAMS (`format_parts_report` prints them).
    """
    if parts not in PARTS:
        raise ValueError(f"parts={parts!r}, expected one of {PARTS}")
    reset()
    if parts == "library":
        return [Choice(seam, LIBRARY) for seam in SEAMS]
    from minillava import grading  # here, not at the top: the model's modules import this one

    target = "solutions" if parts == "solutions" else "exercises"
    choices, functions, modules = [], {}, {}
    for seam in SEAMS:
        fn, problem = _load(grading, seam, target, modules)
        if problem is None and target == "exercises":
            if decided is None:
                problem = _check(grading, seam, fn)
            elif seam.name not in decided:
                problem = "the launching process found it not done or failing"
        if problem:
            choices.append(Choice(seam, LIBRARY, problem))
            continue
        functions[seam.name] = fn
        why = "the reference solution" if target == "solutions" else "passes its checks"
        choices.append(Choice(seam, SOLUTION if target == "solutions" else YOURS, why))
    # Only now: every check above compared your function with the library's own.
    for name, fn in functions.items():
        use(name, fn)
    return choices


def use_your_parts(chapter: str) -> list[Choice]:
    """In a notebook: your finished functions of the chapters up to `chapter` run in the model
    the notebook builds (the library's where yours is not done or fails a check), and one line
    says whose is whose. Re-run the cell after finishing an exercise to bring yours in."""
    choices = [c for c in use_parts("exercises") if c.seam.chapter <= chapter]
    for seam in SEAMS:  # a later chapter's exercise is not this notebook's to use yet
        if seam.chapter > chapter:
            _chosen.pop(seam.name, None)
    yours = [c.seam.name for c in choices if c.whose == YOURS]
    library = [c.seam.name for c in choices if c.whose != YOURS]
    if not yours:
        print(f"The model below runs the library's parts: none of yours is done and passing yet "
              f"({', '.join(library)}).")  # fmt: skip
    else:
        rest = f"; the library's: {', '.join(library)}" if library else ""
        print(f"The model below runs your {', '.join(yours)}{rest}.")
    return choices


def _load(grading, seam: Seam, target: str, modules: dict) -> tuple[Callable | None, str | None]:
    """(the exercise's function, None), or (None, why it cannot be used).

    Your file is read from disk again (edits since it was imported count), once per call of
    `use_parts`: `modules` keeps each chapter's module, or the exception importing it raised.
    """
    chapter = grading.get_chapter(seam.chapter)
    label = f"{target}/{chapter.module}.py"
    if chapter.id not in modules:
        try:
            modules[chapter.id] = grading.load_module(chapter, target, reload=target == "exercises")
        except Exception as error:  # noqa: BLE001 - a file that does not import: say why, go on
            modules[chapter.id] = error
    module = modules[chapter.id]
    if isinstance(module, Exception):
        return None, f"{label} does not import: {type(module).__name__}: {module}"
    fn = getattr(module, seam.name, None)
    if not callable(fn):
        return None, f"{label} has no function {seam.name}"
    return fn, None


def _check(grading, seam: Seam, fn: Callable) -> str | None:
    """None if `fn` passes every check of its exercise, else why not (the grader's words)."""
    checks = [c for c in grading.get_chapter(seam.chapter).checks if c.uses == (seam.name,)]
    for check in checks:
        result = grading.run_check(check, fn)
        if result.status == grading.TODO:
            return "not implemented yet"
        if not result.passed:
            first = (result.message.strip().splitlines() or [result.status])[0]
            first = first if len(first) <= 160 else first[:157] + "..."
            return f"fails {check.name}: {first}"
    return None


def format_parts_report(choices: list[Choice], parts: str = "exercises") -> str:
    """The table `minillava train` prints at the start, one line per seam: whose function runs
    there, and where in the model it runs (or, for the library's, why not yours)."""
    mine = sum(c.whose != LIBRARY for c in choices)
    who = "the solutions'" if parts == "solutions" else "yours"
    lines = [f"Parts (--parts {parts}): {who} at {mine} of {len(choices)} seams, the library's "
             "at the others (minillava/parts.py)"]  # fmt: skip
    for c in choices:
        name = f"{c.seam.chapter} {c.seam.name}"
        detail = c.seam.runs_in if c.whose != LIBRARY else c.why or c.seam.runs_in
        lines.append(f"  {c.whose:<9} {name:<34} {detail}")
    if any(c.whose == LIBRARY and c.why for c in choices):
        lines.append("  (minillava grade chNN says what an exercise still misses)")
    return "\n".join(lines)


def summary(choices: list[Choice]) -> dict[str, str]:
    """{seam: whose}: what a run's preset.json and checkpoints record."""
    return {c.seam.name: c.whose for c in choices}


# ---------------------------------------------------------------------------------------------
# Several processes: the launcher decides, its workers follow
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def decision_in_env(choices: list[Choice]) -> Iterator[None]:
    """While the block runs, the environment names the seams that run yours (PARTS_ENV), for
    the processes started in it; afterwards it is as before."""
    previous = os.environ.get(PARTS_ENV)
    os.environ[PARTS_ENV] = ",".join(c.seam.name for c in choices if c.whose != LIBRARY)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARTS_ENV, None)
        else:
            os.environ[PARTS_ENV] = previous


def decided_in_env() -> set[str] | None:
    """The seams the launching process found passing (`decision_in_env`), or None if it did
    not say (then this process checks for itself)."""
    text = os.environ.get(PARTS_ENV)
    if text is None:
        return None
    return {name for name in text.split(",") if name}
