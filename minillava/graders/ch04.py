"""Chapter 4 graders: the Brain (exercises/ch04_brain.py).

Each check compares the learner's function with minillava.decoder / minillava.generate on small
random inputs, then tests a property every right answer has (RMSNorm's unit RMS, RoPE keeping
lengths and depending only on relative positions, probabilities that sum to 1, a cache that
changes nothing). The stretch, generate_with_cache, runs the learner's loop on a real Decoder
that records what every forward call was fed.

Where a wrong answer equals what a known mistake returns on the same input, the message names
the mistake (the diagnosis); the hint, shown with --hint, says where to look, in words.
"""

import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F

from minillava import decoder as ref
from minillava import generate as gen
from minillava.attention import causal_mask, manual_attention
from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_tensor,
    diagnose,
    grader,
    step,
)

TITLE = "The Brain"
MODULE = "ch04_brain"


# --- rms_norm -----------------------------------------------------------------------------------


@grader("rms_norm", points=1)
def check_rms_norm(rms_norm):
    """Random (2, 5, 16) inputs against decoder.RMSNorm; an all-zero vector must stay finite."""
    x, weight = torch.randn(2, 5, 16) * 3 + 1, torch.rand(16) + 0.5
    module = ref.RMSNorm(16, eps=1e-5)
    module.weight.data.copy_(weight)
    step("calling rms_norm(x, weight) with x (2, 5, 16), weight (16,)")
    got = rms_norm(x, weight)
    mean_sq = x.pow(2).mean(-1, keepdim=True)
    centred = x - x.mean(-1, keepdim=True)
    assert_close(
        got,
        module(x).detach(),
        "rms_norm(x, weight)",
        why_shape="the output has the shape of x",
        diagnosis=diagnose(
            got,
            {
                "You subtracted the mean: that is LayerNorm. RMSNorm keeps the mean and fixes "
                "only the size of each vector.": centred
                * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
                * weight,
                "You divided by the mean of the squares itself, not by its square root: the "
                "result is not unit-sized.": x / (mean_sq + 1e-5) * weight,
                "The weight is missing: the normalised vector is scaled by it, feature by "
                "feature, at the end.": x * torch.rsqrt(mean_sq + 1e-5),
                "You averaged over the batch, the first dimension; each vector is normalised "
                "over its own C features, the last dimension.": x
                * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-5)
                * weight,
            },
        ),
        hint="Divide each vector by its root mean square (the square root of the mean of its "
        "squared features, plus eps under the root), then scale by the weight. Nothing is "
        "subtracted and there is no bias.",
    )
    step("calling rms_norm on a vector of zeros")
    zeros = rms_norm(torch.zeros(1, 4), torch.ones(4))
    zeros = assert_tensor(zeros, "rms_norm(zeros)")
    if not torch.isfinite(zeros).all():
        raise GradingFailure(
            "rms_norm of a zero vector gave NaN or inf: the root mean square of zeros is 0, and "
            "your code divided by 0.",
            "Add eps *inside* the square root, to the mean of the squares, so that the divisor "
            "is never 0.",
        )


# --- apply_rotary -------------------------------------------------------------------------------


def _library_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    cos, sin = ref.RotaryEmbedding(x.shape[-1], theta)(positions[None])
    return ref.apply_rotary(x, cos, sin)


def _interleaved(x, positions, theta):
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2).float() / D)
    angles = positions.float()[:, None] * inv_freq
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.stack(
        [a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()], -1
    )
    return out.flatten(-2)


def _rotate(x, angles):
    D = x.shape[-1]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


ROTARY_HINT = (
    "Split the last dimension into two halves: pair i is feature i of the first half with "
    "feature i of the second. Turn each pair by the angle position times θ^(-2i/D), so that "
    "pair 0 turns fastest."
)


@grader("apply_rotary", points=2)
def check_apply_rotary(apply_rotary):
    """Against decoder.apply_rotary (rotate_half pairing); lengths kept; scores depend on m - n."""
    x = torch.randn(2, 3, 5, 8)
    positions = torch.arange(5) + 2
    for theta in (10000.0, 100.0):
        step(f"calling apply_rotary(x (2, 3, 5, 8), positions = [2..6], theta={theta})")
        got = apply_rotary(x, positions, theta)
        D = 8
        half = torch.arange(0, D, 2).float()
        angles = positions.float()[:, None]
        assert_close(
            got,
            _library_rotary(x, positions, theta),
            f"apply_rotary(x, positions, theta={theta})",
            why_shape="RoPE rotates x in place: the output has x's shape (B, H, T, D)",
            diagnosis=diagnose(
                got,
                {
                    "You paired neighbours, features 2i and 2i + 1: that is the original "
                    "RoFormer layout. Hugging Face Llama, and the library, pair feature i with "
                    "feature i + D/2, the two halves of the last dimension; the two layouts "
                    "are not interchangeable.": _interleaved(x, positions, theta),
                    "Your frequencies fall too slowly: pair i must turn at θ^(-2i/D) per "
                    "position, and yours turns at θ^(-i/D), as if the exponent counted "
                    "features instead of pairs.": _rotate(x, angles * theta ** (-half / 2 / D)),
                    "Your frequencies grow with i: the exponent must be negative, so that pair "
                    "0 turns fastest (one radian per position) and the last pair slowest.": (
                        _rotate(x, angles * theta ** (half / D))
                    ),
                    "You rotated the wrong way, clockwise: the sine terms have the wrong "
                    "signs.": _rotate(x, -angles * theta ** (-half / D)),
                    "Your output is the input: no rotation happened.": x,
                },
            ),
            hint=ROTARY_HINT,
        )
    step("checking that the rotation keeps every vector's length")
    q = torch.randn(1, 1, 6, 16)
    rotated = assert_tensor(apply_rotary(q, torch.arange(6), 10000.0), "apply_rotary(q, ...)")
    if not torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-4):
        raise GradingFailure(
            "apply_rotary changed the length of the vectors; a rotation never does.",
            "Both members of a pair must turn by the same angle, with the cosine on the "
            "diagonal and the sine off it; nothing may be scaled or added.",
        )
    step("checking that q·k depends only on the distance between the two positions")
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    scores = []
    for m, n in ((3, 1), (10, 8), (50, 48)):
        qm = apply_rotary(q, torch.tensor([m]), 10000.0)
        kn = apply_rotary(k, torch.tensor([n]), 10000.0)
        scores.append(float((qm * kn).sum()))
    if max(scores) - min(scores) > 1e-3 * (1 + abs(scores[0])):
        raise GradingFailure(
            f"q at position m and k at position n should give the same score whenever m - n is "
            f"the same; for (3, 1), (10, 8), (50, 48) you give {[round(s, 4) for s in scores]}.",
            "The angle must be the position times a frequency that depends on the pair alone, "
            "never on the position: then moving both tokens by the same amount cancels out.",
        )


# --- swiglu -------------------------------------------------------------------------------------


@grader("swiglu", points=1)
def check_swiglu(swiglu):
    """Random weights against decoder.MLP (down(silu(gate(x)) * up(x)))."""
    C, I = 8, 12
    config = ref.DecoderConfig(hidden_size=C, intermediate_size=I, num_heads=2)
    mlp = ref.MLP(config)
    x = torch.randn(2, 5, C)
    w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    step(f"calling swiglu(x (2, 5, {C}), w_gate ({I}, {C}), w_up ({I}, {C}), w_down ({C}, {I}))")
    with torch.no_grad():
        got = swiglu(x, w_gate, w_up, w_down)
        gate, up = x @ w_gate.T, x @ w_up.T
        assert_close(
            got,
            mlp(x),
            "swiglu(x, w_gate, w_up, w_down)",
            why_shape="the MLP maps each C-vector back to C",
            diagnosis=diagnose(
                got,
                {
                    "You applied silu to the up projection: it belongs on the *gate* "
                    "projection, which decides how much of up passes.": (gate * F.silu(up))
                    @ w_down.T,
                    "You applied silu to the product of gate and up: silu acts on the gate "
                    "alone, and its output then multiplies up.": F.silu(gate * up) @ w_down.T,
                    "The silu is missing: the gate passes through it before multiplying up.": (
                        gate * up
                    )
                    @ w_down.T,
                },
            ),
            hint="Three bias-free linear maps whose weights are stored (out, in), as in a "
            "PyTorch linear layer: project x with the gate weight and with the up weight, pass "
            "the gate through silu, multiply the two feature by feature, project back down.",
        )


# --- next_token_probs ---------------------------------------------------------------------------


def _reference_probs(logits, temperature=1.0, top_k=None, top_p=None):
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k is not None:
        logits = gen.keep_top_k(logits, min(top_k, logits.shape[-1]))
    if top_p is not None:
        logits = gen.keep_top_p(logits, top_p)
    return logits.softmax(-1)


def _renormalised(logits, keep):
    return logits.masked_fill(~keep, float("-inf")).softmax(-1)


def _exclusive_top_p_keep(logits, temperature, top_k, top_p):
    """Tokens kept by the mistake "drop the token whose cumulative mass reaches top_p"."""
    probs = _reference_probs(logits, temperature, top_k)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep_sorted = sorted_probs.cumsum(-1) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _softmax_then_filter(logits, temperature, top_k, top_p):
    probs = (logits / temperature).softmax(-1)
    keep = _reference_probs(logits, temperature, top_k, top_p) > 0
    return probs * keep


SAMPLING_HINT = (
    "The order is: greedy returns a one-hot row; otherwise divide the logits by the "
    "temperature, then top-k, then top-p, each setting the logits it removes to minus "
    "infinity, and the softmax comes last."
)


@grader("next_token_probs", points=2)
def check_next_token_probs(next_token_probs):
    """Temperature, top-k, top-p and greedy against minillava.generate's filters."""
    logits = torch.randn(3, 20) * 2
    settings = [
        dict(temperature=1.0),
        dict(temperature=0.0),
        dict(temperature=0.5),
        dict(temperature=1.0, top_k=4),
        dict(temperature=2.0, top_p=0.6),
        dict(temperature=0.7, top_k=8, top_p=0.9),
    ]
    for kwargs in settings:
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        what = f"next_token_probs(logits (3, 20), {args})"
        step(f"calling {what}")
        got = next_token_probs(logits.clone(), **kwargs)
        expected = _reference_probs(logits, **kwargs)
        T, k, p = kwargs["temperature"], kwargs.get("top_k"), kwargs.get("top_p")
        greedy, nucleus = T == 0, T > 0 and p is not None
        T = T or 1.0  # the mistakes below assume a temperature; greedy has its own
        assert_close(
            got,
            expected,
            what,
            why_shape="one probability per token of the vocabulary, per row",
            diagnosis=diagnose(
                got,
                {
                    "Temperature 0 means greedy: all the probability on the most likely token, "
                    "a one-hot row, not a softmax.": logits.softmax(-1) if greedy else None,
                    "You took the softmax before filtering and then zeroed the removed tokens: "
                    "the kept probabilities no longer sum to 1.": None
                    if greedy
                    else _softmax_then_filter(logits, T, k, p),
                    "You multiplied the logits by the temperature instead of dividing: a "
                    "temperature below 1 must sharpen the distribution, not flatten it.": None
                    if greedy
                    else _reference_probs(logits * T * T, T, k, p),
                    "The temperature was not applied: the logits must be divided by it before "
                    "the softmax (and before top-p).": None
                    if greedy
                    else _reference_probs(logits, 1.0, k, p),
                    "Your top-p chose its tokens from the probabilities before the temperature; "
                    "the temperature (and top-k) change which tokens make up the nucleus.": (
                        _renormalised(logits / T, _reference_probs(logits, 1.0, k, p) > 0)
                        if nucleus
                        else None
                    ),
                    "You dropped the token that crosses top_p: it is kept, since a token stays "
                    "while the mass of the tokens *before* it is still below top_p.": (
                        _renormalised(logits / T, _exclusive_top_p_keep(logits, T, k, p))
                        if nucleus
                        else None
                    ),
                },
            ),
            hint=SAMPLING_HINT,
        )
        sums = got.sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise GradingFailure(
                f"{what}: rows must sum to 1, got {sums.tolist()}.",
                "Filter the logits and take the softmax last: then only the surviving tokens "
                "share the probability.",
            )


# --- attend_with_cache --------------------------------------------------------------------------


@grader("attend_with_cache", points=2)
def check_attend_with_cache(attend_with_cache):
    """Prefill 3 positions, then 3 one-token steps: outputs == full causal attention."""
    B, H, T, D = 2, 2, 6, 4
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    expected, _ = manual_attention(q, k, v, mask=causal_mask(T))
    step("calling attend_with_cache(q, k, v) on a prefill of 3 positions, no cache")
    result = attend_with_cache(q[:, :, :3], k[:, :, :3], v[:, :, :3], None, None)
    if not isinstance(result, tuple) or len(result) != 3:
        raise GradingFailure(
            "attend_with_cache must return a tuple (out, keys, values): the output and the "
            f"updated cache; yours returned a {type(result).__name__}.",
            "Return three things: the attention output, then all the keys and all the values "
            "so far, cached and new, for the next call.",
        )
    out, keys, values = result
    no_mask = manual_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3])[0]
    assert_close(
        out,
        expected[:, :, :3],
        "the prefill output (3 new positions, empty cache)",
        why_shape="one output per new query: (B, H, T_new, D)",
        diagnosis=diagnose(
            out,
            {
                "The prefill has no causal mask: each of the 3 new positions saw the positions "
                "after it.": no_mask
            },
        ),
        hint="With several new queries, the causal mask applies: new query t may see every "
        "cached key and the new keys up to its own position, the last T_new of T_total.",
    )
    for t in range(3, T):
        step(f"calling attend_with_cache for position {t}, with {t} cached positions")
        out, keys, values = attend_with_cache(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], keys, values
        )
        new_first = torch.cat([k[:, :, t : t + 1], k[:, :, :t]], dim=2)
        assert_close(
            keys,
            k[:, :, : t + 1],
            f"the returned keys after position {t}",
            why_shape="the cache grows by the new positions along the time axis, dimension 2: "
            "(B, H, T_past + 1, D)",
            diagnosis=diagnose(
                keys,
                {
                    "Your cache puts the new keys in front of the cached ones; they go *after* "
                    "the cached ones, in the order of the positions.": new_first,
                    "Your returned keys hold only the new position: the cache must keep the "
                    "earlier ones too.": k[:, :, t : t + 1],
                },
            ),
            hint="Append the new keys after the cached ones, along the time axis (the third "
            "dimension of (B, H, T, D)).",
        )
        assert_close(
            values,
            v[:, :, : t + 1],
            f"the returned values after position {t}",
            hint="Append the new values after the cached ones, along the time axis, exactly as "
            "the keys.",
        )
        scale_free = manual_attention(q[:, :, t : t + 1] * math.sqrt(D), keys, values)[0]
        assert_close(
            out,
            expected[:, :, t : t + 1],
            f"the output at position {t} (one new token, {t} cached)",
            diagnosis=diagnose(
                out,
                {
                    "The new token only looked at itself: it must attend over all the keys, "
                    "cached and new (T_past + 1 of them).": v[:, :, t : t + 1],
                    "The scores were not divided by √D.": scale_free,
                },
            ),
            hint="A single new query is the last position: it may see every cached key and "
            "itself, so nothing is masked.",
        )


# --- generate_with_cache (stretch) --------------------------------------------------------------

CACHE_HINT = (
    "Feed the whole prompt once, keeping the cache the decoder fills. Then, at every step, feed "
    "only the token just chosen, one per row, with that same cache: it grows by one position "
    "per call, and the new token sits right after everything in it."
)


def _learners_line() -> str:
    """Where the learner's code called the model: the nearest frame outside torch and here."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(ref.__file__))
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
    if frame is None:
        return ""
    name = frame.f_code.co_filename
    with contextlib.suppress(ValueError):  # another drive, on Windows
        name = os.path.relpath(name)
    return f" (at {name}, line {frame.f_lineno})"


class _Watched(ref.Decoder):
    """The library's decoder, checking every forward call the learner makes as it comes.

    `prompt_len` is the prompt's length T. Call 0 must be the prefill (T tokens, positions
    0 .. T - 1); call j >= 1 feeds one new token per row at position T + j - 1, with a cache
    that holds T + j - 1 positions (the prompt and the j - 1 new tokens fed before). The first
    call that breaks this raises a GradingFailure at once: a wrong cache often crashes a few
    calls later, far from the mistake.
    """

    def __init__(self, config: ref.DecoderConfig):
        super().__init__(config)
        self.prompt_len = 0
        self.calls = 0
        self.checking = True

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        **kwargs,
    ):
        j, self.calls = self.calls, self.calls + 1
        if self.checking:
            fed = input_ids if input_ids is not None else inputs_embeds
            self._check_call(j, None if fed is None else fed.shape[:2], position_ids)
            self._check_cache(j, past_key_values)
        return super().forward(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )

    def _check_call(self, j: int, fed, position_ids) -> None:
        T, where = self.prompt_len, _learners_line()
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "generate" and frame.f_code.co_filename == gen.__file__:
                raise GradingFailure(
                    "Your function called the library's generate: the loop is the exercise.",
                    "Call the model itself: once on the prompt, then once per new token.",
                )
            frame = frame.f_back
        if fed is None:
            return  # neither input_ids nor inputs_embeds: the decoder says so itself
        n = int(fed[1])
        if j == 0 and n != T:
            raise GradingFailure(
                f"The first forward call fed {n} tokens per row{where}; the prefill feeds the "
                f"whole prompt, its {T} tokens, in one call.",
                "One call on the whole prompt fills the cache for every prompt position at once, "
                "and its last position's logits give the first new token.",
            )
        if j > 0 and n != 1:
            raise _failure_with(
                f"Forward call {j + 1} fed {n} tokens per row{where}; after the prefill, each "
                "call feeds only the token just chosen.",
                diagnosis=(
                    "You fed the whole sequence again, the prompt and every new token so far: "
                    "that is generation without a cache, whose every step redoes the work of "
                    "all the steps before it."
                    if n == T + j
                    else None
                ),
                hint=CACHE_HINT,
            )
        if position_ids is None:
            return  # the decoder counts the positions from the cache's length
        expected = torch.arange(T) if j == 0 else torch.tensor([T + j - 1])
        try:
            got = position_ids.detach().cpu().long().expand(int(fed[0]), n)
        except RuntimeError:
            return  # a shape that does not fit: the decoder raises its own error
        if not torch.equal(got, expected.expand_as(got)):
            shift = int(got[0, 0]) - int(expected[0])
            raise _failure_with(
                f"Forward call {j + 1} passed the positions {got[0].tolist()}{where}; the "
                + (
                    f"prompt's are {expected.tolist()}."
                    if j == 0
                    else f"new token it feeds sits at position {int(expected[0])}: the prompt "
                    f"holds 0 .. {T - 1}, and each new token fed since takes the next one."
                ),
                diagnosis=(
                    None
                    if not bool((got - expected.expand_as(got) == shift).all())
                    else f"Your prompt positions start at {shift}, not 0: the decoder, its "
                    "cache and the library's generate all count from 0."
                    if j == 0
                    else f"Your positions are off by {shift:+d}: RoPE then rotates the new "
                    "query and key for the wrong place, and every score with the cached keys "
                    "is computed at the wrong distance."
                ),
                hint="Positions count from 0 at the first prompt token; the token fed at a step "
                "comes right after every position already in the cache.",
            )

    def _check_cache(self, j: int, cache) -> None:
        if j == 0:
            if cache is not None and getattr(cache, "length", None) != 0:
                raise GradingFailure(
                    f"The prefill was handed a cache that already holds "
                    f"{getattr(cache, 'length', '?')} positions{_learners_line()}.",
                    "Start from no cache, or from a new, empty one.",
                )
            return
        T, where = self.prompt_len, _learners_line()
        held = getattr(cache, "length", None)
        if held == T + j - 1:
            return
        since = f" and the {j - 1} new token{'s' if j > 2 else ''} fed since" if j > 1 else ""
        raise _failure_with(
            f"Forward call {j + 1} was handed "
            + ("no cache" if cache is None else f"a cache of {held} positions")
            + f"{where}; it should get the cache the calls before it filled, holding {T + j - 1} "
            f"positions (the prompt's {T}{since}).",
            diagnosis=(
                "You did not pass the cache back: the new token attended to itself alone, at "
                "position 0, as if there were no prompt."
                if not held
                else "The cache holds more positions than were fed one at a time: tokens went "
                "into it twice."
                if held > T + j - 1
                else None
            ),
            hint=CACHE_HINT,
        )


def _failure_with(message: str, hint: str, diagnosis: str | None = None) -> GradingFailure:
    """A GradingFailure whose message ends with the diagnosis, when there is one."""
    return GradingFailure(f"{message}\n{diagnosis}" if diagnosis else message, hint)


def _random_decoder() -> _Watched:
    """A small decoder whose greedy tokens depend on every position and on the context.

    Its weights are larger than a trained model's init (std 0.5, not 0.02): an untrained model
    at the usual init repeats its last input token whatever the positions, and could not tell
    a wrong cache from a right one.
    """
    config = ref.DecoderConfig(
        vocab_size=48,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_seq_len=160,
        tie_embeddings=False,
    )
    torch.manual_seed(0)
    model = _Watched(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.5)
    return model


def _greedy(model: _Watched, prompt, max_new_tokens, stop=None, pad=0) -> torch.Tensor:
    """The library's greedy generation without a cache: the tokens to match."""
    model.checking = False
    try:
        return gen.generate(
            model,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop_token_ids=() if stop is None else (stop,),
            pad_token_id=pad,
            use_cache=False,
        )
    finally:
        model.checking = True


def _first_step(tokens: torch.Tensor, token: int) -> int:
    """The first step at which `tokens` (n,) holds `token`, or n if never."""
    where = (tokens == token).nonzero()
    return int(where[0]) if len(where) else len(tokens)


def _stop_cases(model: _Watched) -> list[tuple]:
    """(description, prompt, max_new_tokens, stop, pad) for the two stopping rules.

    Two rows, the first stopping at step 1, 2 or 3 while the second goes on (the first's rest is
    padding: an id that appears nowhere in the tokens, so padding cannot pass for a token); and
    a single row that stops at step 3, ending the loop. Prompts are drawn until both fit.
    """
    rng = torch.Generator().manual_seed(1)
    batch = single = None
    for _ in range(50):
        prompt = torch.randint(0, 48, (2, 6), generator=rng)
        free = _greedy(model, prompt, 8)
        for stop in free[0, 1:4].tolist():
            at = _first_step(free[0], stop)
            if batch is None and at > 0 and _first_step(free[1], stop) > at + 1:
                pad = min(set(range(48)) - set(free.flatten().tolist()))
                about = f"2 prompts of 6 tokens, up to 8 new, row 0 stops at step {at}"
                batch = (about, prompt, 8, stop, pad)
        one = prompt[:1, :4]
        free = _greedy(model, one, 10)
        stop = int(free[0, 3])
        if single is None and _first_step(free[0], stop) == 3:
            single = ("1 prompt of 4 tokens, up to 10 new, it stops at step 3", one, 10, stop, 0)
        if batch and single:
            return [batch, single]
    raise RuntimeError("no prompt fits the stopping cases: the grader's model changed")


@grader("generate_with_cache", points=3)
def check_generate_with_cache(generate_with_cache):
    """Stretch: greedy decoding on a small random Decoder that checks every forward call (one
    prefill, then one token per row with the cache passed back, positions right after it), and
    the tokens against the library's generation without a cache, stopping rules included."""
    model = _random_decoder()
    prompts = torch.randint(0, 48, (3, 5), generator=torch.Generator().manual_seed(0))
    cases = [
        ("1 prompt of 5 tokens, 6 new", prompts[:1], 6, None, 0),
        ("3 prompts of 5 tokens, 7 new", prompts, 7, None, 0),
        ("2 prompts of 5 tokens, 1 new (the prefill alone)", prompts[:2], 1, None, 0),
        *_stop_cases(model),
    ]
    for description, prompt, max_new, stop, pad in cases:
        expected = _greedy(model, prompt, max_new, stop, pad)
        free = _greedy(model, prompt, max_new)  # the same without a stop token
        args = "" if stop is None else f", stop_token_id={stop}, pad_token_id={pad}"
        what = f"generate_with_cache(model, prompt {tuple(prompt.shape)}, {max_new}{args})"
        step(f"calling {what}: {description}")
        model.prompt_len, model.calls = prompt.shape[1], 0
        kwargs = {} if stop is None else dict(stop_token_id=stop, pad_token_id=pad)
        got = generate_with_cache(model, prompt.clone(), max_new, **kwargs)
        calls = model.calls
        if calls == 0:
            raise GradingFailure(
                f"{what} never called the model.",
                "Generation runs the model: once on the prompt, then once per new token.",
            )
        got = assert_tensor(got, what)
        stopped = expected.shape[1] < max_new
        unpadded = free[:, : expected.shape[1]]
        # The stop token replaced by padding; without its column if it was the loop's last.
        no_stop = None if stop is None else expected.masked_fill(expected == stop, pad)
        no_stop = no_stop[:, :-1] if stopped else no_stop
        first_stop = min(_first_step(row, stop) for row in free) if stop is not None else 0
        assert_equal(
            got.long() if got.dtype in (torch.int32, torch.int16, torch.uint8) else got,
            expected,
            what,
            why_shape=f"one row per prompt, one column per new token: {expected.shape[1]} "
            + (
                "(generation ends when every row has produced the stop token)"
                if stopped
                else f"(max_new_tokens = {max_new})"
            ),
            diagnosis=diagnose(
                got,
                {
                    "You kept generating after the stop token: a row stops once it has "
                    "produced stop_token_id (kept in the output), and the loop ends when every "
                    "row has.": free if stopped else None,
                    "The stop token is missing from your output: it is kept, and only what "
                    "would come after it is left out.": no_stop,
                    "You ended the loop as soon as one row produced the stop token; it goes on "
                    "until every row has stopped, and a row that has gets padding.": free[
                        :, : first_stop + 1
                    ]
                    if stop is not None and len(free) > 1 and first_stop + 1 < expected.shape[1]
                    else None,
                    "A row that has stopped kept getting real tokens: after its stop token a "
                    "row is filled with pad_token_id until the others stop.": unpadded
                    if stop is not None and not torch.equal(unpadded, expected)
                    else None,
                },
            ),
            hint="Each new token is the most likely one (the argmax) at the last position of "
            "the latest forward call; the prefill's last position gives the first. A row that "
            "produces the stop token keeps it, then gets the padding id.",
        )
        if calls > expected.shape[1] + 1:
            raise GradingFailure(
                f"{what} made {calls} forward calls for {expected.shape[1]} new tokens: the "
                "loop went on after it had every token it returns.",
                "The prefill gives the first token and each step one more; stop the loop when "
                "every row has stopped or max_new_tokens is reached.",
            )
