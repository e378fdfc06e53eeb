"""Chapter 8 graders: LLaVA (exercises/ch08_llava.py).

Each check compares the learner's function with minillava.llava (splice_image_tokens, the
feature selection of Llava.encode_images, the freezing of the align stage) on small inputs whose
values make every position recognisable, so a misplaced row is named, not just counted.
"""

import torch

from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_tensor,
    diagnose,
    fmt,
    grader,
    step,
)
from minillava.llava import splice_image_tokens

TITLE = "LLaVA"
MODULE = "ch08_llava"

IMAGE_ID = 7  # the <image> id in the hand-made examples (the real one comes from the tokenizer)


def _reference_splice(
    ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """The library's splice of one row: (T,), (T, C), (P, C) -> (T - 1 + P, C)."""
    out, _, _, _ = splice_image_tokens(ids[None], embeds[None], features[None], IMAGE_ID)
    return out[0]


def _check_splice_case(splice_image, ids: torch.Tensor, C: int, P: int, what: str) -> None:
    T = len(ids)
    pos = int((ids == IMAGE_ID).nonzero())
    # Text rows hold 1, 2, 3, ... (row t is all t + 1), image rows hold -1, -2, ..., -P: every
    # row says where it came from.
    embeds = (torch.arange(T, dtype=torch.float32) + 1)[:, None].expand(T, C).clone()
    features = -(torch.arange(P, dtype=torch.float32) + 1)[:, None].expand(P, C).clone()
    step(f"calling splice_image on {what}: ids {ids.tolist()}, <image> id {IMAGE_ID}, P = {P}")
    got = assert_tensor(splice_image(ids, embeds, features, IMAGE_ID), "splice_image(...)")
    expected = _reference_splice(ids, embeds, features)
    if got.dim() == 2 and got.shape[0] == T + P:
        raise GradingFailure(
            f"splice_image returned {T + P} rows for {T} tokens and P = {P}, expected "
            f"{T - 1 + P}: the <image> placeholder is still in the sequence (rows, first column: "
            f"{fmt(got[:, 0])}).",
            "The P image vectors must REPLACE the placeholder, not be inserted next to it: "
            "cat(token_embeds[:pos], image_features, token_embeds[pos + 1:]).",
        )
    mistakes = {
        "Off by one: you kept the placeholder's row and dropped the token after it. Use "
        "token_embeds[:pos] (stops before the placeholder) and token_embeds[pos + 1:].": torch.cat(
            [embeds[: pos + 1], features, embeds[pos + 2 :]]
        ),
        "Off by one: you dropped the token before the placeholder instead of the placeholder. "
        "Use token_embeds[:pos] and token_embeds[pos + 1:].": torch.cat(
            [embeds[: max(pos - 1, 0)], features, embeds[pos:]]
        )
        if pos > 0
        else None,
        "The image belongs where its <image> token was, not at the end of the text.": torch.cat(
            [embeds[:pos], embeds[pos + 1 :], features]
        ),
        "The image belongs where its <image> token was, not at the start of the text.": torch.cat(
            [features, embeds[:pos], embeds[pos + 1 :]]
        ),
    }
    assert_close(
        got,
        expected,
        f"splice_image on {what} (row values: text token t holds t + 1, image row j holds -(j+1))",
        hint=diagnose(
            got,
            mistakes,
            "Text before the placeholder, then the P image rows in order, then the text after it.",
        ),
        why_shape=f"T - 1 + P = {T} - 1 + {P} = {T - 1 + P} rows, each of width C = {C}",
    )


@grader("splice_image", points=2)
def check_splice_image(splice_image):
    """<image> in the middle, first and last; rows tagged with their origin; gradients flow."""
    _check_splice_case(splice_image, torch.tensor([3, 4, IMAGE_ID, 5, 6]), 2, 3, "a 5-token prompt")
    _check_splice_case(splice_image, torch.tensor([IMAGE_ID, 5, 6]), 3, 4, "<image> first")
    _check_splice_case(splice_image, torch.tensor([3, 4, 5, IMAGE_ID]), 2, 2, "<image> last")
    ids = torch.tensor([9, 3, 8, IMAGE_ID, 5, 6, 2])
    embeds = torch.randn(7, 6, requires_grad=True)
    features = torch.randn(4, 6, requires_grad=True)
    step("splicing random embeddings and checking that gradients reach the image features")
    got = assert_close(
        splice_image(ids, embeds, features, IMAGE_ID),
        _reference_splice(ids, embeds.detach(), features.detach()),
        "splice_image on random embeddings (7 tokens, C = 6, P = 4)",
    )
    if not got.requires_grad:
        raise GradingFailure(
            "The spliced sequence does not require grad: the projector could never learn.",
            "Build it with torch.cat of slices (no .detach(), no torch.tensor(...) copies).",
        )
    got.sum().backward()
    if features.grad is None:
        raise GradingFailure(
            "No gradient reaches the image features: the output requires grad only through the "
            "text embeddings, so the image part was cut from the graph (a .detach(), .data, "
            ".numpy() or torch.tensor(...) copy). In training, the projector would never learn.",
            "Take the image rows as slices of `image_features` itself and join with torch.cat.",
        )
    if not torch.allclose(features.grad, torch.ones_like(features)):
        raise GradingFailure(
            "Each image vector should appear exactly once in the output (its gradient of "
            f"out.sum() should be all ones), got {fmt(features.grad)}."
        )


@grader("build_labels", points=2)
def check_build_labels(build_labels):
    """The docstring's example, then two images with padding, against the library's splice."""
    ids = torch.tensor([20, IMAGE_ID, 21, 30, 31, 0])
    mask = torch.tensor([False, False, False, True, True, False])
    P = 3
    step(f"calling build_labels(ids {ids.tolist()}, mask {mask.int().tolist()}, {IMAGE_ID}, P=3)")
    got = build_labels(ids, mask, IMAGE_ID, P)
    expected = torch.tensor([-100, -100, -100, -100, -100, 30, 31, -100])
    got = assert_tensor(got, "build_labels(...)")
    n = len(ids)
    if got.dim() == 1 and len(got) == n:
        raise GradingFailure(
            f"build_labels returned {n} labels, one per token, expected {n + P - 1}: the "
            f"labels must line up with the SPLICED sequence, where the <image> token is P = {P} "
            "positions.",
            "Each <image> token contributes P labels, all -100.",
        )
    masked_image_id = torch.tensor([-100, IMAGE_ID, IMAGE_ID, IMAGE_ID, -100, 30, 31, -100])
    assert_equal(
        got.long() if got.dtype in (torch.int32, torch.int16) else got,
        expected,
        f"build_labels for ids {ids.tolist()}, answer mask {mask.int().tolist()}, P = {P}",
        hint=diagnose(
            got,
            {
                "The P image positions must be -100 too: you forgot to mask the image positions "
                "(there is no token to predict there).": masked_image_id,
                "You put a label on every token, prompt and padding included: keep the token id "
                "only where answer_mask is True, -100 elsewhere.": torch.tensor(
                    [20, -100, -100, -100, 21, 30, 31, 0]
                ),
                "The mask is the wrong way round: labels go where answer_mask is True.": (
                    torch.tensor([20, -100, -100, -100, 21, -100, -100, 0])
                ),
            },
            "Walk over the tokens: an <image> gives P times -100; any other token gives its id "
            "where answer_mask is True, else -100.",
        ),
        why_shape=f"T + (P - 1) = {n} + {P - 1} = {n + P - 1} labels",
    )
    # Two images in a row, right padding: compare with the library's splice of the labels.
    ids = torch.tensor([11, IMAGE_ID, 12, 13, 40, 41, 14, IMAGE_ID, 15, 42, 43, 0, 0])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[[4, 5, 9, 10]] = True
    P = 4
    C = 2
    step("calling build_labels on a row with two <image> tokens and two padding positions, P = 4")
    got = build_labels(ids, mask, IMAGE_ID, P)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    _, _, expected, _ = splice_image_tokens(
        ids[None], torch.zeros(1, len(ids), C), torch.zeros(2, P, C), IMAGE_ID, labels=labels[None]
    )
    assert_equal(
        assert_tensor(got, "build_labels(...)"),
        expected[0],
        f"build_labels for ids {ids.tolist()} (two images), P = {P}",
        why_shape=f"{len(ids)} tokens + 2 images x (P - 1) = {len(ids) + 2 * (P - 1)} labels",
        hint="Every <image> token, not only the first, becomes P positions of -100.",
    )


@grader("select_patch_features", points=2)
def check_select_patch_features(select_patch_features):
    """Random hidden states (one value range per layer): layer -2 by default, [CLS] dropped."""
    B, N, C, L = 2, 4, 3, 3
    # Layer i's values lie in [i, i + 0.5): the message can say which layer was picked.
    hidden = tuple(i + 0.5 * torch.rand(B, 1 + N, C) for i in range(L + 1))
    step(f"calling select_patch_features on {L + 1} hidden states of shape ({B}, {1 + N}, {C})")
    got = select_patch_features(hidden)
    got = assert_tensor(got, "select_patch_features(hidden_states)")
    if got.shape == (B, 1 + N, C):
        raise GradingFailure(
            f"select_patch_features returned shape {tuple(got.shape)}, expected {(B, N, C)}: "
            "you kept the [CLS] token (position 0).",
            "LLaVA keeps only the N patch tokens: hidden_states[layer][:, 1:].",
        )
    assert_close(
        got,
        hidden[-2][:, 1:],
        "select_patch_features(hidden_states) with the default layer",
        why_shape=f"(B, N, C) = {(B, N, C)}: N patch tokens, [CLS] dropped",
        hint=diagnose(
            got,
            {
                "These are the LAST layer's features: LLaVA-1.5 takes the penultimate one, "
                "hidden_states[-2] (the `layer` argument).": hidden[-1][:, 1:],
                "You dropped the last patch instead of [CLS]: [CLS] is position 0, so slice "
                "[:, 1:].": hidden[-2][:, :-1],
                "These are the embeddings (hidden_states[0]), not a layer's output: use "
                "hidden_states[layer].": hidden[0][:, 1:],
            },
            "hidden_states[layer][:, 1:]: the chosen layer, every patch token, no [CLS].",
        ),
    )
    for layer in (-1, 1):
        step(f"calling select_patch_features(hidden_states, layer={layer})")
        assert_close(
            select_patch_features(hidden, layer),
            hidden[layer][:, 1:],
            f"select_patch_features(hidden_states, layer={layer})",
            hint="Use the `layer` argument; do not hard-code -2.",
        )


def _tiny_llava():
    from minillava.decoder import DecoderConfig
    from minillava.llava import Llava, LlavaConfig
    from minillava.vit import ViTConfig

    vision = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
    )
    text = DecoderConfig(
        vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    return Llava(LlavaConfig(vision=vision, text=text, image_token_id=IMAGE_ID))


def _wrong_parts(model, want: dict[str, bool]) -> list[str]:
    problems = []
    for part, trainable in want.items():
        params = list(getattr(model, part).named_parameters())
        wrong = [name for name, p in params if p.requires_grad != trainable]
        if wrong:
            state = "still require grad" if not trainable else "are frozen"
            problems.append(
                f"{part}: {len(wrong)} of {len(params)} parameter tensors {state} "
                f"(e.g. {part}.{wrong[0]})"
            )
    return problems


@grader("freeze_for_alignment", points=2)
def check_freeze_for_alignment(freeze_for_alignment):
    """A fresh tiny Llava, then one with the projector frozen and the rest mixed: projector only."""
    want = {"vision_tower": False, "projector": True, "language_model": False}
    model = _tiny_llava()
    step("calling freeze_for_alignment on a fresh Llava (every parameter trainable)")
    freeze_for_alignment(model)
    problems = _wrong_parts(model, want)
    if problems:
        hint = "Stage 1 trains the projector only: vision_tower and language_model get "
        hint += "requires_grad_(False)."
        if all(p.requires_grad for p in model.parameters()):
            hint = (
                "Nothing was frozen. model.eval() and torch.no_grad() do not freeze parameters; "
                "set requires_grad_(False) on vision_tower and language_model."
            )
        raise GradingFailure("After freeze_for_alignment: " + "; ".join(problems) + ".", hint)
    model = _tiny_llava()
    model.projector.requires_grad_(False)
    model.language_model.layers[0].requires_grad_(False)  # the rest of the decoder still trains
    step("calling freeze_for_alignment on a Llava whose projector was frozen before")
    freeze_for_alignment(model)
    problems = _wrong_parts(model, want)
    if problems:
        raise GradingFailure(
            "After freeze_for_alignment on a model whose projector was frozen before: "
            + "; ".join(problems)
            + ".",
            "Set the projector's requires_grad explicitly to True: do not assume it already is.",
        )
