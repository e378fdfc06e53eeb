"""Chapter 7 graders: the Bridge (exercises/ch07_bridge.py).

The projector checks copy random weights into minillava.projector's modules and compare outputs;
the parameter count is compared with the modules' own count; nearest tokens with a cosine top-k.
The stretch loads minillava.resampler.PerceiverResampler's weights into the learner's resampler.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from minillava import projector as ref
from minillava import resampler as lib
from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_shape,
    diagnose,
    grader,
    step,
)

TITLE = "The Bridge"
MODULE = "ch07_bridge"

TRANSPOSE = (
    "It looks like you multiplied by the weight as it is stored: a linear layer keeps its weight "
    "as (out, in) = (C_t, C_v), so a patch vector of C_v numbers must meet its transpose."
)
AFFINE = (
    "Every patch vector goes through the same affine map: a product with the transposed weight, "
    "which turns C_v numbers into C_t, then the bias added once per output channel."
)


def _linear_module(vision_dim: int, text_dim: int) -> ref.LinearProjector:
    module = ref.build_projector("linear", vision_dim, text_dim)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()  # non-zero biases, so a missing bias shows
    return module


@grader("linear_projector", points=2)
def check_linear_projector(linear_projector):
    """Square (4 -> 4) then (6 -> 4) weights on (2, 3, C_v) features, against LinearProjector."""
    module = _linear_module(4, 4)
    W, b = module.linear.weight.detach(), module.linear.bias.detach()
    x = torch.randn(2, 3, 4)
    step("calling linear_projector(features (2, 3, 4), weight (4, 4), bias (4,))")
    got = linear_projector(x, W, b)
    assert_close(
        got,
        module(x).detach(),
        "linear_projector(features (2, 3, 4), weight (4, 4), bias (4,))",
        why_shape="every one of the 2 x 3 patch vectors becomes one vector of C_t = 4",
        diagnosis=diagnose(
            got,
            {
                TRANSPOSE: x @ W + b,
                "The bias is missing: the map is W x + b, and yours stops at W x.": x @ W.T,
                "You multiplied by the bias instead of adding it: the bias shifts each output "
                "channel, it does not scale it.": (x @ W.T) * b,
            },
        ),
        hint=AFFINE,
    )
    module = _linear_module(6, 4)
    W, b = module.linear.weight.detach(), module.linear.bias.detach()
    x = torch.randn(2, 3, 6)
    step("calling linear_projector(features (2, 3, 6), weight (4, 6), bias (4,))")
    assert_close(
        linear_projector(x, W, b),
        module(x).detach(),
        "linear_projector(features (2, 3, 6), weight (4, 6), bias (4,))",
        why_shape="C_v = 6 numbers in, C_t = 4 out, for each of the 2 x 3 patches",
        hint="The weight is stored as (out, in) = (4, 6): a patch vector of 6 numbers meets its "
        "transpose, (6, 4), to give 4 numbers.",
    )
    step("calling linear_projector on one image's patches alone")
    assert_close(
        linear_projector(x[1:], W, b),
        module(x[1:]).detach(),
        "linear_projector on the second image's features alone",
        hint="Each patch is projected on its own: the result cannot depend on the other images.",
    )


@grader("mlp_projector", points=2)
def check_mlp_projector(mlp_projector):
    """(2, 5, 6) features through Linear(6 -> 4), GELU, Linear(4 -> 4), against MLPProjector."""
    module = ref.build_projector("mlp2x_gelu", 6, 4)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    weights = [
        t.detach()
        for t in (
            module.linear_1.weight,
            module.linear_1.bias,
            module.linear_2.weight,
            module.linear_2.bias,
        )
    ]
    W1, b1, W2, b2 = weights
    x = torch.randn(2, 5, 6)
    step("calling mlp_projector(features (2, 5, 6), W1 (4, 6), b1 (4,), W2 (4, 4), b2 (4,))")
    got = mlp_projector(x, *weights)
    h = x @ W1.T + b1
    assert_close(
        got,
        module(x).detach(),
        "mlp_projector(features (2, 5, 6), W1 (4, 6), b1, W2 (4, 4), b2)",
        why_shape="C_t = 4 numbers out for each of the 2 x 5 patches",
        diagnosis=diagnose(
            got,
            {
                "The activation is missing: without a GELU between them the two layers collapse "
                "into one linear map (W2 W1 x + ...), and the second layer adds nothing.": h @ W2.T
                + b2,
                "The GELU comes after the second layer: it goes BETWEEN the layers, and only "
                "there, or it clips the negative half of the outputs.": F.gelu(h @ W2.T + b2),
                "GELU, not ReLU: LLaVA-1.5's projector uses the GELU, which lets small negative "
                "values through.": F.relu(h) @ W2.T + b2,
                "That is the tanh approximation of the GELU: use the exact GELU, the one built "
                "on the Gaussian error function.": F.gelu(h, approximate="tanh") @ W2.T + b2,
            },
        ),
        hint="First layer, then the exact GELU, then the second layer; each layer multiplies by "
        "its transposed weight and adds its bias.",
        atol=1e-5,
        rtol=1e-5,
    )


COUNT = (
    "Add up each linear layer: n_in times n_out weights plus n_out biases; the GELU has none. "
    "The MLP's first layer goes from vision_dim to text_dim, its second from text_dim to text_dim."
)


@grader("projector_num_parameters", points=2)
def check_projector_num_parameters(projector_num_parameters):
    """Both kinds at several sizes against build_projector's own count; unknown kinds raise."""
    step('calling projector_num_parameters("linear", 3, 2)')
    got = projector_num_parameters("linear", 3, 2)
    if not isinstance(got, int) or isinstance(got, bool):
        raise GradingFailure(
            f"projector_num_parameters returned a {type(got).__name__}, expected a Python int.",
            "Plain arithmetic on the integer arguments already gives a Python int: no tensor is "
            "needed, and a tensor must be turned back into an int before it is returned.",
        )
    for kind in ("linear", "mlp2x_gelu"):
        for vision_dim, text_dim in ((3, 2), (128, 256), (1024, 4096)):
            module = ref.build_projector(kind, vision_dim, text_dim)
            expected = sum(p.numel() for p in module.parameters())
            step(f"calling projector_num_parameters({kind!r}, {vision_dim}, {text_dim})")
            got = projector_num_parameters(kind, vision_dim, text_dim)
            if got == expected:
                continue
            no_bias = vision_dim * text_dim + (text_dim * text_dim if kind != "linear" else 0)
            both_from_vision = 2 * (vision_dim * text_dim + text_dim)
            message = (
                f"projector_num_parameters({kind!r}, {vision_dim}, {text_dim}) = {got}, but "
                f"build_projector({kind!r}, {vision_dim}, {text_dim}) has {expected} parameters."
            )
            if got == no_bias:
                message += (
                    f"\nYou counted the weights only: count the biases too, {text_dim} per layer "
                    "here (a linear layer has one per output)."
                )
            elif kind != "linear" and got == both_from_vision:
                message += (
                    "\nYou counted the second layer as if it read vision_dim numbers: it maps "
                    "from text_dim to text_dim, the first layer's output."
                )
            raise GradingFailure(message, COUNT)
    step('calling projector_num_parameters("qformer", 8, 8)')
    try:
        projector_num_parameters("qformer", 8, 8)
    except ValueError:
        return
    raise GradingFailure(
        'projector_num_parameters("qformer", 8, 8) should raise ValueError (an unknown kind), '
        "but it returned: a silent count for a bridge that does not exist hides a typo.",
        "After the two known kinds, anything else is an error: raise a ValueError that names the "
        "kind it was given.",
    )


@grader("nearest_text_tokens", points=2)
def check_nearest_text_tokens(nearest_text_tokens):
    """4 vectors against 10 token embeddings of very different lengths: cosine top-3."""
    table = torch.randn(10, 6) * torch.linspace(0.2, 5.0, 10)[:, None]  # long rows at the end
    projected = torch.randn(4, 6)
    projected[0] = 3.0 * table[2]  # row 0 points exactly at (short) token 2
    cosines = F.normalize(projected, dim=-1) @ F.normalize(table, dim=-1).T
    values, ids = cosines.topk(3, dim=-1)
    step("calling nearest_text_tokens(projected (4, 6), token_embeddings (10, 6), k=3)")
    out = nearest_text_tokens(projected, table, 3)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise GradingFailure(
            "nearest_text_tokens should return a pair (similarities, token_ids), got "
            f"{type(out).__name__}.",
            "Taking the k largest values along the vocabulary gives both at once: the values "
            "and where they are, their indices.",
        )
    got_values, got_ids = out
    swapped = (
        isinstance(got_values, torch.Tensor)
        and isinstance(got_ids, torch.Tensor)
        and not got_values.is_floating_point()
        and got_ids.is_floating_point()
    )
    if swapped:
        raise GradingFailure(
            "The pair is the wrong way round: the first item holds integers (token ids) and the "
            "second floats (similarities). Return (similarities, token_ids).",
            "A top-k gives the values first and their indices second: that is already the order "
            "asked for.",
        )
    dots = projected @ table.T
    assert_shape(
        got_ids,
        (4, 3),
        "token_ids",
        why="k = 3 tokens for each of the 4 vectors",
        hint="One row per projected vector and k columns: the best k are taken along the "
        "vocabulary, the last dimension of the (N, V) similarities.",
    )
    assert_equal(
        got_ids.long(),
        ids,
        "token_ids",
        diagnosis=diagnose(
            got_ids.float(),
            {
                "That ranks by raw dot product: long embeddings win whatever their direction, "
                "so the longest rows of the table come first.": dots.topk(3, dim=-1)[1].float(),
                "These are the k LEAST similar tokens, lowest first: the ranking must put the "
                "highest cosine first.": cosines.topk(3, dim=-1, largest=False)[1].float(),
            },
        ),
        hint="Rank by cosine similarity, highest first: normalise both sides to unit length, "
        "compare every vector with every token, keep the k best of each row.",
    )
    assert_close(
        got_values,
        values,
        "similarities",
        diagnosis=diagnose(
            got_values,
            {
                "These are raw dot products, not cosines: the lengths of the vectors are still "
                "in them.": torch.gather(dots, 1, ids),
                "You normalised the token embeddings only: normalise the projected vectors too, "
                "or the values are cosines times each vector's length, not in [-1, 1].": (
                    torch.gather(projected @ F.normalize(table, dim=-1).T, 1, ids)
                ),
            },
        ),
        hint="Each similarity is the cosine between a projected vector and one of its k tokens: "
        "the dot product of the two after both are scaled to unit length.",
    )
    if abs(float(got_values[0, 0]) - 1.0) > 1e-4 or int(got_ids[0, 0]) != 2:
        raise GradingFailure(
            "projected[0] is 3 x the embedding of token 2: token 2 should come first with "
            "similarity 1.0.",
            "Cosine similarity ignores length: a vector and three times that vector have a "
            "cosine of exactly 1.",
        )


# --- stretch: Flamingo's Perceiver Resampler --------------------------------------------------

RESAMPLER_SIZES = dict(
    vision_dim=6,
    text_dim=10,
    hidden_size=8,
    num_latents=3,
    num_layers=2,
    num_heads=2,
    intermediate_size=16,
)
RESAMPLER_CALL = (
    "PerceiverResampler(vision_dim=6, text_dim=10, hidden_size=8, num_latents=3, num_layers=2, "
    "num_heads=2, intermediate_size=16)"
)
RESAMPLER_HINT = (
    "Project the patches to the latents' width, give every image its own copy of the latents, "
    "then in each layer: the normalised latents ask, the normalised patches and the normalised "
    "latents together answer (keys and values), split into heads, softmax over the keys, and the "
    "result is added to the latents; then the feed-forward network on the normalised latents, "
    "added too. A final norm and the output projection close it."
)


def _reference_resampler() -> lib.PerceiverResampler:
    """The library's resampler at RESAMPLER_SIZES, with norms that are not the identity."""
    module = lib.PerceiverResampler(lib.ResamplerConfig(**RESAMPLER_SIZES))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:  # a skipped or misplaced norm must change the numbers
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return module.eval()


def _resample(
    module: lib.PerceiverResampler,
    x: torch.Tensor,
    keys_values: str = "both",
    raw_latents_in_kv: bool = False,
    norm_media: bool = True,
    softmax_dim: int = -1,
    scale: bool = True,
    one_head: bool = False,
    attn_residual: bool = True,
    ff_residual: bool = True,
    final_norm: bool = True,
) -> torch.Tensor:
    """The resampler's forward with the library's weights, or with one known mistake."""
    media = module.input_proj(x)  # (B, P, D)
    latents = module.latents.expand(x.shape[0], -1, -1)  # (B, M, D)
    for layer in module.layers:
        normed = layer.norm_latents(latents)
        patches = layer.norm_media(media) if norm_media else media
        own = latents if raw_latents_in_kv else normed
        kv = {"both": [patches, own], "patches": [patches], "latents": [own]}[keys_values]
        kv = torch.cat(kv, dim=1)  # (B, N, D)
        attn = layer.attn
        heads = 1 if one_head else attn.num_heads
        q, k, v = attn.q_proj(normed), attn.k_proj(kv), attn.v_proj(kv)
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=heads) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1)  # (B, H, M, N)
        if scale:
            scores = scores / math.sqrt(q.shape[-1])
        out = rearrange(scores.softmax(softmax_dim) @ v, "b h t d -> b t (h d)")
        out = attn.out_proj(out)
        latents = latents + out if attn_residual else out
        ff = layer.ff(layer.norm_ff(latents))
        latents = latents + ff if ff_residual else ff
    return module.output_proj(module.norm(latents) if final_norm else latents)


def _resampler_mistakes(module: lib.PerceiverResampler, x: torch.Tensor) -> dict:
    with torch.no_grad():
        return {
            "Your latents attended to themselves only: no patch was among the keys and values, "
            "so the output is the same whatever the image.": _resample(
                module, x, keys_values="latents"
            ),
            "Your keys and values are the patches only: in Flamingo's resampler the latents "
            "also read themselves, their own keys and values appended to the patches'.": (
                _resample(module, x, keys_values="patches")
            ),
            "The latents appended to the keys and values are the raw ones: they must be "
            "normalised, the same normalised latents that ask the queries.": _resample(
                module, x, raw_latents_in_kv=True
            ),
            "The patches went into the keys and values without their LayerNorm.": _resample(
                module, x, norm_media=False
            ),
            "The softmax ran over the latents (the queries) instead of over the keys: each "
            "latent's weights must sum to 1 over everything it reads.": _resample(
                module, x, softmax_dim=-2
            ),
            "The attention scores were not divided by the square root of the head size.": (
                _resample(module, x, scale=False)
            ),
            "That is one attention head over the whole width: the queries, keys and values "
            "must be split into num_heads heads.": _resample(module, x, one_head=True),
            "Both residuals are missing: each layer must add its attention and its "
            "feed-forward output to the latents, not replace them.": _resample(
                module, x, attn_residual=False, ff_residual=False
            ),
            "The attention's residual is missing: its output must be added to the latents, not "
            "replace them.": _resample(module, x, attn_residual=False),
            "The feed-forward network's residual is missing: its output must be added to the "
            "latents, not replace them.": _resample(module, x, ff_residual=False),
            "The final LayerNorm, before the output projection, is missing.": _resample(
                module, x, final_norm=False
            ),
        }


@grader("perceiver_resampler", points=3, uses="PerceiverResampler")
def check_perceiver_resampler(PerceiverResampler):  # noqa: N803 - the learner's class
    """Stretch: the library's weights loaded into yours, (2, 5, 6) patches, then 1 and 12
    patches: M = 3 tokens each time, the library's numbers, and gradients reach the latents."""
    step(f"building {RESAMPLER_CALL}")
    mine = PerceiverResampler(**RESAMPLER_SIZES)
    reference = _reference_resampler()
    step("loading the library's weights (minillava.resampler.PerceiverResampler) into yours")
    try:
        mine.load_state_dict(reference.state_dict())
    except RuntimeError as exc:
        raise GradingFailure(
            "The library's weights do not fit your PerceiverResampler: its parameters are not "
            f"the ones the given constructor makes.\n{str(exc)[:600]}",
            "Keep the constructor as it was given and write only the forward pass.",
        ) from None
    mine.eval()
    M, C_t = RESAMPLER_SIZES["num_latents"], RESAMPLER_SIZES["text_dim"]
    for P in (5, 1, 12):
        x = torch.randn(2, P, RESAMPLER_SIZES["vision_dim"])
        with torch.no_grad():
            expected = reference(x)
        what = f"Your resampler on patch features (2, {P}, 6)"
        step(f"calling your resampler on patch features (2, {P}, 6)")
        got = mine(x)
        got_shape = tuple(got.shape) if isinstance(got, torch.Tensor) else None
        per_patch = None
        if got_shape is not None and len(got_shape) == 3 and got_shape[1] == P != M:
            per_patch = (
                f"Your output has one token per patch ({P}), not one per latent (M = {M}): the "
                "number of tokens a resampler hands on must not depend on the number of patches. "
                "The learned latents are the queries; the patches only answer."
            )
        assert_close(
            got,
            expected,
            what,
            why_shape=f"(B, M, C_text) = (2, {M}, {C_t}): M = {M} tokens per image whatever the "
            f"number of patches ({P} here)",
            diagnosis=per_patch or diagnose(got, _resampler_mistakes(reference, x)),
            hint=RESAMPLER_HINT,
            atol=1e-5,
        )
    step("back-propagating from your resampler's output")
    if not got.requires_grad:
        raise GradingFailure(
            "The output of your resampler does not require grad: no gradient can reach its "
            "weights, and the bridge could never learn.",
            "Compute with the module's own parameters, without detaching anything on the way.",
        )
    got.sum().backward()
    for name in ("latents", "input_proj.weight"):
        grad = mine.get_parameter(name).grad
        if grad is None or not grad.abs().sum() > 0:
            raise GradingFailure(
                f"No gradient reaches {name}: the learned latents and the input projection "
                "would never train.",
                "Use the parameter itself (broadcast or expanded over the batch), not a copy of "
                "its values.",
            )
