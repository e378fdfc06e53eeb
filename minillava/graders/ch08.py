"""Chapter 8 graders: LLaVA (exercises/ch08_llava.py).

Each check compares the learner's function with minillava.llava (splice_image_tokens, the
feature selection of Llava.encode_images, the freezing of the align stage) on small inputs whose
values make every position recognisable, so a misplaced row is named, not just counted. The
stretch, splice_batch, is splice_image_tokens itself: whole batches, any number of images a row.
"""

import torch

from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_shape,
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
            "The P image vectors must REPLACE the placeholder, not sit next to it: the text "
            "before the <image> token, then the image, then the text after it, and nothing of "
            "the placeholder's own row.",
        )
    mistakes = {
        "Off by one: you kept the placeholder's row and dropped the token after it.": torch.cat(
            [embeds[: pos + 1], features, embeds[pos + 2 :]]
        ),
        "Off by one: you dropped the token before the placeholder instead of the "
        "placeholder.": torch.cat([embeds[: max(pos - 1, 0)], features, embeds[pos:]])
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
        diagnosis=diagnose(got, mistakes),
        hint="Text before the placeholder, then the P image rows in order, then the text after "
        "it. The text before stops just before the placeholder; the text after starts just "
        "after it.",
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
            "The spliced sequence does not require grad: it was cut from the autograd graph "
            "(detached, or copied into a new tensor), so the projector could never learn.",
            "Build it by joining pieces of the inputs themselves, so autograd can follow them "
            "back: no detaching, no copying values into a new tensor.",
        )
    got.sum().backward()
    if features.grad is None:
        raise GradingFailure(
            "No gradient reaches the image features: the output requires grad only through the "
            "text embeddings, so the image part was cut from the graph (detached, or copied "
            "through numpy or into a new tensor). In training, the projector would never learn.",
            "Take the image rows from the image features tensor itself, and join the pieces with "
            "a concatenation.",
        )
    if not torch.allclose(features.grad, torch.ones_like(features)):
        raise GradingFailure(
            "Each image vector should appear exactly once in the output (the gradient of the "
            f"output's sum with respect to it should be all ones), got {fmt(features.grad)}.",
            "The P image vectors go in once each, in order, where the placeholder was.",
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
            "Each <image> token contributes P labels, all -100; every other token one.",
        )
    masked_image_id = torch.tensor([-100, IMAGE_ID, IMAGE_ID, IMAGE_ID, -100, 30, 31, -100])
    assert_equal(
        got.long() if got.dtype in (torch.int32, torch.int16) else got,
        expected,
        f"build_labels for ids {ids.tolist()}, answer mask {mask.int().tolist()}, P = {P}",
        diagnosis=diagnose(
            got,
            {
                "The P image positions must be -100 too: you forgot to mask the image positions "
                "(there is no token to predict there).": masked_image_id,
                "You put a label on every token, prompt and padding included: only the "
                "answer is scored.": torch.tensor([20, -100, -100, -100, 21, 30, 31, 0]),
                "The mask is the wrong way round: labels go where answer_mask is True.": (
                    torch.tensor([20, -100, -100, -100, 21, -100, -100, 0])
                ),
            },
        ),
        hint="Walk over the tokens: an <image> gives P times -100; any other token gives its id "
        "where answer_mask is True, else -100.",
        why_shape=f"T + (P - 1) = {n} + {P - 1} = {n + P - 1} labels",
    )
    # Two images in a row, right padding: compare with the library's splice of the labels.
    ids = torch.tensor([11, IMAGE_ID, 12, 13, 40, 41, 14, IMAGE_ID, 15, 42, 43, 0, 0])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[[4, 5, 9, 10]] = True
    P = 4
    C = 2
    step("calling build_labels on a row with two <image> tokens and two padding positions, P = 4")
    got = assert_tensor(build_labels(ids, mask, IMAGE_ID, P), "build_labels(...)")
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    _, _, expected, _ = splice_image_tokens(
        ids[None], torch.zeros(1, len(ids), C), torch.zeros(2, P, C), IMAGE_ID, labels=labels[None]
    )
    one_short = got.dim() == 1 and len(got) == len(ids) + (P - 1)
    assert_equal(
        got,
        expected[0],
        f"build_labels for ids {ids.tolist()} (two images), P = {P}",
        why_shape=f"{len(ids)} tokens + 2 images x (P - 1) = {len(ids) + 2 * (P - 1)} labels",
        diagnosis=f"Your labels are {P - 1} positions (P - 1) short: only one of the two "
        "<image> tokens became P positions, the other is still one."
        if one_short
        else None,
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
            "Position 0 of every hidden state is [CLS]; LLaVA keeps only the N patch tokens "
            "after it.",
        )
    assert_close(
        got,
        hidden[-2][:, 1:],
        "select_patch_features(hidden_states) with the default layer",
        why_shape=f"(B, N, C) = {(B, N, C)}: N patch tokens, [CLS] dropped",
        diagnosis=diagnose(
            got,
            {
                "These are the LAST layer's features: LLaVA-1.5 takes the penultimate one, the "
                "default of the layer argument.": hidden[-1][:, 1:],
                "You dropped the last patch instead of [CLS]: [CLS] is position 0, the first "
                "token of every hidden state.": hidden[-2][:, :-1],
                "These are the embeddings (hidden state 0), not a layer's output: pick the "
                "hidden state the layer argument names.": hidden[0][:, 1:],
            },
        ),
        hint="The hidden state the layer argument names, every patch token, no [CLS].",
    )
    for layer in (-1, 1):
        step(f"calling select_patch_features(hidden_states, layer={layer})")
        got = select_patch_features(hidden, layer)
        assert_close(
            got,
            hidden[layer][:, 1:],
            f"select_patch_features(hidden_states, layer={layer})",
            diagnosis=diagnose(
                got,
                {
                    f"These are layer -2's features, whatever the layer argument says ({layer} "
                    "here): the layer is hard-coded.": hidden[-2][:, 1:],
                },
            ),
            hint="Read the hidden state that the layer argument names; do not hard-code -2.",
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
        message = "After freeze_for_alignment: " + "; ".join(problems) + "."
        if all(p.requires_grad for p in model.parameters()):
            message += (
                "\nNothing was frozen. Switching the model to evaluation mode (model.eval()) or "
                "running under no-grad does not freeze parameters: each parameter carries its "
                "own requires-grad flag."
            )
        hint = (
            "Stage 1 trains the projector only: switch off the requires-grad flag of every "
            "parameter of the vision tower and of the language model; one call on a module "
            "sets it for all its parameters."
        )
        raise GradingFailure(message, hint)
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
            + ".\nThe projector must be made trainable explicitly, whatever it was before.",
            "Switch the projector's requires-grad flag on too: do not assume it already is.",
        )


# --- stretch: a whole batch, any number of images per row -------------------------------------

PAD_ID = 0
SPLICE_BATCH_HINT = (
    "Work row by row: keep the row's real tokens (the attention mask says which), cut it at each "
    "of its <image> tokens and put the next unused image in the placeholder's place, and cut the "
    "labels the same way, with the ignore label on the P image positions. Then pad every row on "
    "the right to the longest: zero vectors, mask 0, ignore labels."
)
TAGS = (
    "each position is named by where its vector came from: tK is the token at position K of the "
    "input row, iN.J patch J of image N, pad a zero vector"
)


def _tagged(ids: torch.Tensor, n_images: int, P: int):
    """Embeddings that say where they came from: text (b, t) is [b + 1, t + 1], image n's patch
    p is [-(n + 1), -(p + 1)], so a misplaced vector is named, not just counted."""
    B, T = ids.shape
    rows = torch.arange(B, dtype=torch.float32)[:, None].expand(B, T) + 1
    cols = torch.arange(T, dtype=torch.float32)[None, :].expand(B, T) + 1
    embeds = torch.stack([rows, cols], dim=-1)  # (B, T, 2)
    images = torch.arange(n_images, dtype=torch.float32)[:, None].expand(n_images, P) + 1
    patches = torch.arange(P, dtype=torch.float32)[None, :].expand(n_images, P) + 1
    features = -torch.stack([images, patches], dim=-1)  # (N_img, P, 2)
    return embeds, features


def _tag(vector: torch.Tensor, row: int) -> str:
    a, b = (float(v) for v in vector[:2])
    if not all(abs(v - round(v)) < 1e-4 for v in (a, b)):
        return "?"
    a, b = round(a), round(b)
    if a == 0 and b == 0:
        return "pad"
    if a > 0 and b > 0:
        return f"t{b - 1}" if a - 1 == row else f"row{a - 1}.t{b - 1}"
    if a < 0 and b < 0:
        return f"i{-a - 1}.{-b - 1}"
    return "?"


def _tags(row_embeds: torch.Tensor, row: int) -> list[str]:
    return [_tag(v, row) for v in row_embeds]


def _images_in(tags: list[str]) -> list[int]:
    """The images a row holds, in order (one entry per image, however many of its patches)."""
    found = []
    for tag in tags:
        if tag.startswith("i") and tag.endswith(".0"):
            found.append(int(tag[1:].split(".")[0]))
    return found


def _row_diagnosis(b: int, ids: torch.Tensor, expected: list[str], got: list[str]) -> str | None:
    """Name the mistake in one row of the spliced embeddings, from its tags."""
    if "?" in got:
        return (
            f"Some positions of row {b} hold vectors that are neither a token's nor an image "
            "patch's: a splice only moves vectors, it never changes them."
        )
    placeholders = [f"t{t}" for t in (ids == IMAGE_ID).nonzero().flatten().tolist()]
    kept = [tag for tag in placeholders if tag in got]
    if kept:
        return (
            f"The <image> placeholder of row {b} is still there ({kept[0]}): each image replaces "
            "its placeholder, whose own vector is dropped."
        )
    if any(tag.startswith("row") for tag in got):
        return f"Row {b} holds text from another row: each row keeps its own tokens."
    want, have = _images_in(expected), _images_in(got)
    if want != have:
        if not want:
            return (
                f"Row {b} has no <image> token, yet it received image(s) {have}: a row without "
                "an image takes none."
            )
        if have == list(range(len(have))):
            return (
                f"Row {b} starts again at image 0: images are consumed in the order of their "
                f"<image> tokens over the whole batch, row 0 first, so row {b}'s first image is "
                f"image {want[0]}."
            )
        if sorted(have) == sorted(want):
            return (
                f"Row {b}'s images are in the wrong order, {have} for {want}: the first <image> "
                "of a row takes the first of its images."
            )
        return (
            f"Row {b} holds image(s) {have}, expected {want}: images are consumed in the order "
            "of their <image> tokens, row 0 first, a row without <image> taking none."
        )
    if got and got[0] == "pad" and expected[0] != "pad":
        return f"Row {b} starts with padding: the rows are padded on the right."
    return None


def _labels_diagnosis(got: torch.Tensor, image: torch.Tensor, padding: torch.Tensor) -> str | None:
    """Name the mistake in the labels: a label on an image position, or on the padding."""
    ignore = -100
    if (got[image] != ignore).any():
        if (got[image] == IMAGE_ID).all():
            return (
                "The image positions carry the <image> token's own label: each <image> becomes "
                "P positions labelled -100, whatever the token's label was (there is no token to "
                "predict at a patch)."
            )
        return "Some image positions carry a label: every image position must be -100."
    if (got[padding] != ignore).any():
        return (
            "Some padding positions carry a label: padding is never scored, whatever the "
            "incoming labels held there."
        )
    return None


def _call_splice_batch(splice_batch, ids, embeds, features, mask, labels, what: str):
    step(f"calling splice_batch on {what}")
    out = splice_batch(ids, embeds, features, IMAGE_ID, mask, labels)
    if not (isinstance(out, tuple | list) and len(out) == 3):
        raise GradingFailure(
            "splice_batch should return three tensors (inputs_embeds, attention_mask, labels), "
            f"got {type(out).__name__}"
            + (f" of {len(out)} items." if isinstance(out, tuple | list) else "."),
            "Return the spliced embeddings, the new attention mask and the new labels, in that "
            "order.",
        )
    names = ("embeddings", "attention mask", "labels")
    return [
        assert_tensor(t, f"splice_batch (its {name}, item {i + 1} of 3)")
        for i, (t, name) in enumerate(zip(out, names, strict=True))
    ]


def _check_mask_and_labels_types(got_mask, got_labels, shape):
    assert_shape(got_mask, shape, "The attention mask", why="one entry per spliced position")
    assert_shape(got_labels, shape, "The labels", why="one label per spliced position")
    if got_labels.dtype != torch.long:
        raise GradingFailure(
            f"The labels have dtype {got_labels.dtype}, expected torch.int64: cross-entropy takes "
            "its targets as integer class indices of 64 bits.",
            "Build the labels from the incoming labels and the ignore label, which are int64 "
            "already.",
        )


def _check_tagged_batch(splice_batch, ids, mask, labels, P: int, what: str) -> None:
    B, T = ids.shape
    real = mask.bool()
    per_row = ((ids == IMAGE_ID) & real).sum(-1).tolist()
    embeds, features = _tagged(ids, sum(per_row), P)
    expected_embeds, expected_mask, expected_labels, _ = splice_image_tokens(
        ids, embeds, features, IMAGE_ID, attention_mask=mask, labels=labels
    )
    left_mask = splice_image_tokens(
        ids, embeds, features, IMAGE_ID, attention_mask=mask, labels=labels, padding_side="left"
    )[1]
    lengths = [int(r.sum()) + n * (P - 1) for r, n in zip(real, per_row, strict=True)]
    longest = max(lengths)
    got_embeds, got_mask, got_labels = _call_splice_batch(
        splice_batch, ids, embeds, features, mask, labels, what
    )
    shape_diagnosis = None
    if got_embeds.dim() == 3 and got_embeds.shape[1] != longest:
        if got_embeds.shape[1] == max(T + n * (P - 1) for n in per_row):
            shape_diagnosis = (
                "Your rows still hold the input's padding: the longest spliced row counts its "
                "real tokens only."
            )
        elif got_embeds.shape[1] == max(n + size for n, size in zip(per_row, lengths, strict=True)):
            shape_diagnosis = (
                "Your rows are one position longer for each image: the <image> placeholders "
                "are still there, where each image must replace its placeholder."
            )
        elif got_embeds.shape[1] == T:
            shape_diagnosis = (
                f"Your rows kept the input's length T = {T}: splicing makes them longer, by "
                "P - 1 for each image."
            )
    assert_shape(
        got_embeds,
        (B, longest, 2),
        "The embeddings splice_batch returned",
        why=f"the rows are {lengths} positions long once spliced (real tokens + (P - 1) per "
        f"image, P = {P}), padded to the longest, {longest}",
        diagnosis=shape_diagnosis,
        hint=SPLICE_BATCH_HINT,
    )
    _check_mask_and_labels_types(got_mask, got_labels, (B, longest))
    ones = torch.ones_like(expected_mask)
    assert_equal(
        got_mask.long(),
        expected_mask,
        f"The attention mask for {what}",
        diagnosis=diagnose(
            got_mask.float(),
            {
                "Your rows are padded on the left: for training they are padded on the right, "
                "so that each row starts at position 0.": left_mask.float(),
                "Your mask marks every position as real: the padding after a shorter row must "
                "be 0.": ones.float(),
            },
        ),
        hint="Each row is real (1), text and image alike, up to its spliced length, then padding "
        "(0) up to the longest row.",
    )
    for b in range(B):
        if torch.allclose(got_embeds[b].float(), expected_embeds[b]):
            continue
        want, have = _tags(expected_embeds[b], b), _tags(got_embeds[b].detach(), b)
        diagnosis = _row_diagnosis(b, ids[b][real[b]], want, have)
        if diagnosis is None and want != have:
            pads = [i for i, tag in enumerate(want) if tag == "pad" and have[i] != "pad"]
            if pads:
                diagnosis = f"The padding positions of row {b} must hold zero vectors."
        message = (
            f"The embeddings of row {b} are wrong (ids {ids[b].tolist()}, mask "
            f"{mask[b].tolist()}, P = {P}); {TAGS}.\n"
            f"  expected [{' '.join(want)}]\n  got      [{' '.join(have)}]"
        )
        raise GradingFailure(f"{message}\n{diagnosis}" if diagnosis else message, SPLICE_BATCH_HINT)
    image = expected_embeds[..., 0] < 0
    padding = expected_mask == 0
    assert_equal(
        got_labels,
        expected_labels,
        f"The labels for {what}",
        diagnosis=_labels_diagnosis(got_labels, image, padding),
        hint="The labels follow the same cut as the embeddings: a text position keeps its "
        "token's label, an image position and a padding position get the ignore label.",
    )


@grader("splice_batch", points=3)
def check_splice_batch(splice_batch):
    """Stretch: rows with 1, 0 and 2 images, then labels that are the ids themselves, random
    batches, a batch with no image at all, against splice_image_tokens; gradients; a miscount."""
    P = 3
    ids = torch.tensor(
        [
            [3, IMAGE_ID, 4, 5, 30, 31],
            [3, 4, 5, 32, 33, PAD_ID],
            [IMAGE_ID, 4, IMAGE_ID, 5, 34, PAD_ID],
        ]
    )
    mask = (torch.arange(6) < torch.tensor([6, 5, 5])[:, None]).long()
    labels = torch.full_like(ids, -100)  # as the collator makes them: the answers only
    labels[0, 4:6], labels[1, 3:5], labels[2, 4] = ids[0, 4:6], ids[1, 3:5], ids[2, 4]
    _check_tagged_batch(
        splice_batch, ids, mask, labels, P, "3 rows with 1, 0 and 2 <image> tokens, P = 3"
    )
    # Labels copied from the ids (every token scored, padding and <image> included): the
    # output must still ignore the image positions and the padding.
    ids = torch.tensor([[IMAGE_ID, IMAGE_ID, 3, 4], [3, IMAGE_ID, 5, PAD_ID]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    _check_tagged_batch(
        splice_batch,
        ids,
        mask,
        ids.clone(),
        4,
        "2 rows, labels copied from the ids (the <image> token and the padding included), P = 4",
    )
    for trial in range(2):
        B, C, P = 4, 5, 3
        rows, per_row = [], []
        for _ in range(B):
            n = int(torch.randint(0, 3, ()))
            text = torch.randint(8, 40, (int(torch.randint(2, 7, ())),)).tolist()
            for _ in range(n):
                text.insert(int(torch.randint(0, len(text) + 1, ())), IMAGE_ID)
            rows.append(text)
            per_row.append(n)
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [PAD_ID] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        labels = torch.where(torch.rand(B, T) < 0.5, ids, torch.full_like(ids, -100))
        embeds = torch.randn(B, T, C, requires_grad=True)
        features = torch.randn(sum(per_row), P, C, requires_grad=True)
        expected = splice_image_tokens(
            ids, embeds.detach(), features.detach(), IMAGE_ID, attention_mask=mask, labels=labels
        )
        what = f"a random batch of {B} rows with {per_row} images, C = {C}, P = {P}"
        got_embeds, got_mask, got_labels = _call_splice_batch(
            splice_batch, ids, embeds, features, mask, labels, what
        )
        assert_close(
            got_embeds,
            expected[0],
            f"The embeddings for {what}",
            hint=SPLICE_BATCH_HINT,
        )
        _check_mask_and_labels_types(got_mask, got_labels, expected[1].shape)
        assert_equal(got_mask.long(), expected[1], f"The attention mask for {what}")
        assert_equal(got_labels, expected[2], f"The labels for {what}")
        if trial == 0:
            step("back-propagating from the spliced embeddings")
            if not got_embeds.requires_grad:
                raise GradingFailure(
                    "The spliced embeddings do not require grad: they were cut from the autograd "
                    "graph, so neither the projector nor the embeddings could learn.",
                    "Join pieces of the inputs themselves, and pad them, without detaching or "
                    "copying values into a new tensor.",
                )
            got_embeds.sum().backward()
            if features.grad is None:
                raise GradingFailure(
                    "No gradient reaches the image features: the image part was cut from the "
                    "graph (detached, or copied into a new tensor), so the projector would never "
                    "learn.",
                    "Take the image vectors from the image features tensor itself, and join the "
                    "pieces with a concatenation.",
                )
            if not torch.allclose(features.grad, torch.ones_like(features)):
                raise GradingFailure(
                    "Each image vector should appear exactly once in the output (the gradient "
                    "of the output's sum with respect to the image features should be all "
                    f"ones), got {fmt(features.grad)}.",
                    "Each image goes in once, in the place of its own <image> token.",
                )
    ids = torch.tensor([[3, 4, 5], [6, 8, PAD_ID]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    embeds, features = _tagged(ids, 0, 3)
    what = "a batch without any image (image features of shape (0, 3, 2))"
    got_embeds, got_mask, got_labels = _call_splice_batch(
        splice_batch, ids, embeds, features, mask, ids.clone(), what
    )
    expected = splice_image_tokens(
        ids, embeds, features, IMAGE_ID, attention_mask=mask, labels=ids.clone()
    )
    no_image = "With no <image> token, every row is its own text, padded on the right."
    assert_close(got_embeds, expected[0], f"The embeddings for {what}", hint=no_image)
    _check_mask_and_labels_types(got_mask, got_labels, expected[1].shape)
    assert_equal(got_mask.long(), expected[1], f"The attention mask for {what}", hint=no_image)
    assert_equal(got_labels, expected[2], f"The labels for {what}", hint=no_image)
    step("calling splice_batch with 3 <image> tokens in the batch but only 2 images")
    ids = torch.tensor([[IMAGE_ID, 3, IMAGE_ID], [4, IMAGE_ID, 5]])
    embeds, features = _tagged(ids, 2, 3)
    try:
        splice_batch(ids, embeds, features, IMAGE_ID, torch.ones_like(ids), ids.clone())
    except ValueError:
        return
    except (IndexError, RuntimeError) as exc:
        raise GradingFailure(
            "With 3 <image> tokens and 2 images, splice_batch raised "
            f"{type(exc).__name__}: {exc}; expected a ValueError that says the counts differ.",
            "Count the <image> tokens among the real positions first, compare with the number "
            "of images, and raise a ValueError naming both when they differ.",
        ) from None
    raise GradingFailure(
        "With 3 <image> tokens and 2 images, splice_batch returned without complaint: a "
        "silent wrong answer is the worst kind.",
        "Count the <image> tokens among the real positions first, compare with the number of "
        "images, and raise a ValueError naming both when they differ.",
    )
