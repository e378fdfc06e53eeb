"""Chapter 9 graders: visual instruction tuning (exercises/ch09_instruct.py).

LoRA checks compare with minillava.lora.LoRALinear on random layers (square ones too, where a
transposed update has the right shape and only its values betray it); the label check renders
real conversations with the course tokenizer and compares with Tokenizer.render's mask.
"""

import torch
from torch import nn

from minillava.decoder import Decoder, DecoderConfig
from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_shape,
    assert_tensor,
    diagnose,
    grader,
    step,
)
from minillava.lora import LoRALinear, apply_lora

TITLE = "Visual instruction tuning"
MODULE = "ch09_instruct"


def _factors(result, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise GradingFailure(
            f"{what} should return a tuple (lora_A, lora_B), got {type(result).__name__}."
        )
    return assert_tensor(result[0], f"{what}[0] (lora_A)"), assert_tensor(
        result[1], f"{what}[1] (lora_B)"
    )


@grader("init_lora_factors", points=2)
def check_init_lora_factors(init_lora_factors):
    """Shapes (r, in) and (out, r); B A = 0 at the start; A random, so gradients reach B."""
    in_f, out_f, r = 12, 10, 4
    step(f"calling init_lora_factors({in_f}, {out_f}, rank={r})")
    A, B = _factors(init_lora_factors(in_f, out_f, r), "init_lora_factors(12, 10, 4)")
    assert_shape(A, (r, in_f), "lora_A", why="A maps the input (in = 12) down to r = 4 numbers")
    assert_shape(B, (out_f, r), "lora_B", why="B maps r = 4 numbers up to the output (out = 10)")
    if not torch.all(B == 0):
        if torch.all(A == 0):
            raise GradingFailure(
                "A is zero and B is random: B A = 0, but the convention is the other way round.",
                "LoRA starts with A random and B zero (the paper, peft and minillava.lora).",
            )
        raise GradingFailure(
            "B is not zero, so B A ≠ 0: the adapted layer does not start equal to the "
            "pretrained one (fine-tuning would begin by damaging the model).",
            "Initialise lora_B with torch.zeros(out_features, rank).",
        )
    if torch.all(A == 0) or float(A.float().std()) < 1e-4:
        raise GradingFailure(
            "A and B are both zero: then the gradient of B (which goes through x Aᵀ) and the "
            "gradient of A (which goes through B) are zero too, and the adapter never learns.",
            "Make A random: torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5)) or torch.randn "
            "scaled down (e.g. * 0.01 or / sqrt(in)).",
        )
    if float(A.abs().max()) > 10:
        raise GradingFailure(
            f"A's entries reach {float(A.abs().max()):.3g}: far too large for an init.",
            "Use nn.Linear's init (kaiming_uniform_ with a=sqrt(5)) or small Gaussian values.",
        )
    step("checking that B A = 0 and that a gradient reaches B")
    A = A.detach().clone().float().requires_grad_(True)
    B = B.detach().clone().float().requires_grad_(True)
    x = torch.randn(3, in_f)
    update = x @ A.T @ B.T
    assert_close(update, torch.zeros(3, out_f), "x Aᵀ Bᵀ at initialisation")
    update.square().add(update).sum().backward()
    if B.grad is None or float(B.grad.abs().max()) == 0:
        raise GradingFailure("No gradient reaches B at initialisation: is A all zeros?")


def _reference_lora(x, weight, bias, A, B, alpha):
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    layer = LoRALinear(base, rank=A.shape[0], alpha=alpha)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        return layer(x)


@grader("lora_forward", points=2)
def check_lora_forward(lora_forward):
    """Random layer, batch (2, 3, in), against minillava.lora.LoRALinear; no bias; B = 0."""
    in_f, out_f, r, alpha = 6, 5, 2, 16.0
    x = torch.randn(2, 3, in_f)
    W, b = torch.randn(out_f, in_f), torch.randn(out_f)
    A, B = torch.randn(r, in_f), torch.randn(out_f, r)
    step(
        f"calling lora_forward on x (2, 3, {in_f}) with a ({out_f}, {in_f}) layer, r={r}, alpha=16"
    )
    got = lora_forward(x, W, b, A, B, alpha)
    base = x @ W.T + b
    delta = x @ A.T @ B.T
    assert_close(
        got,
        _reference_lora(x, W, b, A, B, alpha),
        f"lora_forward(x, W, b, A, B, alpha=16) with rank {r}",
        why_shape=f"(..., out) = (2, 3, {out_f}): same leading dimensions as x",
        hint=diagnose(
            got,
            {
                "The update is not scaled: multiply x Aᵀ Bᵀ by alpha / r.": base + delta,
                "Scale by alpha / r, not by alpha alone (r = lora_A.shape[0]).": base
                + alpha * delta,
                "Scale by alpha / r, not r / alpha.": base + (r / alpha) * delta,
                "The pretrained layer is missing: add x Wᵀ + b.": (alpha / r) * delta,
                "The bias is missing: y = x Wᵀ + b + (alpha / r) x Aᵀ Bᵀ.": base
                - b
                + (alpha / r) * delta,
            },
            "y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ, with r = lora_A.shape[0].",
        ),
    )
    step("calling lora_forward with bias=None and alpha=8, rank 3")
    A3, B3 = torch.randn(3, in_f), torch.randn(out_f, 3)
    assert_close(
        lora_forward(x, W, None, A3, B3, 8.0),
        _reference_lora(x, W, None, A3, B3, 8.0),
        "lora_forward(x, W, None, A, B, alpha=8) with rank 3",
        hint="bias may be None (layers without bias, like the decoder's projections).",
    )
    step("calling lora_forward with B = 0 (an adapter fresh from init)")
    assert_close(
        lora_forward(x, W, b, A, torch.zeros(out_f, r), alpha),
        x @ W.T + b,
        "lora_forward with B = 0 (should equal the pretrained layer)",
    )


@grader("merge_lora_weight", points=2)
def check_merge_lora_weight(merge_lora_weight):
    """(6, 4) and square (5, 5) layers against LoRALinear.merge; merged outputs == LoRA outputs."""
    for out_f, in_f, r, alpha in ((6, 4, 2, 16.0), (5, 5, 3, 6.0)):
        W, A, B = torch.randn(out_f, in_f), torch.randn(r, in_f), torch.randn(out_f, r)
        step(f"calling merge_lora_weight with W ({out_f}, {in_f}), rank {r}, alpha={alpha:g}")
        got = merge_lora_weight(W, A, B, alpha)
        base = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            base.weight.copy_(W)
        layer = LoRALinear(base, rank=r, alpha=alpha)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.merge()
        scale = alpha / r
        assert_close(
            got,
            layer.base.weight.detach(),
            f"merge_lora_weight(W ({out_f}, {in_f}), A, B, alpha={alpha:g}) with rank {r}",
            why_shape=f"W' replaces W, so it has W's shape (out, in) = ({out_f}, {in_f}); B A "
            "is (out, r) @ (r, in)",
            hint=diagnose(got, _merge_mistakes(W, A, B, alpha), "W' = W + (alpha / r) · B @ A."),
        )
        x = torch.randn(3, in_f)
        with torch.no_grad():
            lora_out = x @ W.T + scale * (x @ A.T @ B.T)
        assert_close(x @ got.T, lora_out, "x @ W'ᵀ (the merged layer) against the LoRA layer")


def _merge_mistakes(W, A, B, alpha) -> dict:
    scale = alpha / A.shape[0]
    mistakes = {
        "The update is not scaled: W' = W + (alpha / r) B A.": W + B @ A,
        "Scale by alpha / r, not by alpha alone.": W + alpha * (B @ A),
        "You returned the update only: add it to W.": scale * (B @ A),
    }
    if W.shape[0] == W.shape[1]:  # a transposed update only fits a square layer
        transposed = "The update is transposed: use B @ A (out, in), not A.T @ B.T (in, out), "
        transposed += "which has the right shape only when the layer is square."
        mistakes[transposed] = W + scale * (A.T @ B.T)
    return mistakes


def _render(tok, conversation):
    ids, mask = tok.render(conversation)
    ids = torch.tensor(ids)
    labels = torch.where(torch.tensor(mask), ids, torch.full_like(ids, -100))
    return ids, labels


def _wrong_labels(ids, assistant_id, eot_id, include_role=False, with_eot=True, last_only=False):
    labels = torch.full_like(ids, -100)
    starts = (ids == assistant_id).nonzero().flatten().tolist()
    for start in starts[-1:] if last_only else starts:
        t = start if include_role else start + 1
        while t < len(ids):
            is_eot = int(ids[t]) == eot_id
            if not is_eot or with_eot:
                labels[t] = ids[t]
            if is_eot:
                break
            t += 1
    return labels


@grader("assistant_labels", points=2)
def check_assistant_labels(assistant_labels):
    """A 3-turn conversation, one cut inside its last answer, and a padded one, vs render."""
    from minillava.tokenizer import get_tokenizer

    tok = get_tokenizer()
    conversation = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many shapes are there?"},
        {"from": "gpt", "value": "3"},
        {"from": "human", "value": "Describe the image."},
        {"from": "gpt", "value": "A red circle, a blue square and a green cross."},
    ]
    ids, expected = _render(tok, conversation)
    step("calling assistant_labels on a 3-turn conversation rendered by tokenizer.render")
    got = assistant_labels(ids, tok.assistant_id, tok.eot_id)
    got = assert_tensor(got, "assistant_labels(ids, assistant_id, eot_id)")
    a, e = tok.assistant_id, tok.eot_id
    assert_equal(
        got.long() if got.dtype in (torch.int32, torch.int16) else got,
        expected,
        "assistant_labels on a 3-turn conversation (3 answers: 'red', '3', a sentence)",
        why_shape="one label per input token",
        hint=diagnose(
            got,
            {
                "Only the last answer is labelled: every assistant turn is scored.": _wrong_labels(
                    ids, a, e, last_only=True
                ),
                "The <|assistant|> token itself is labelled: it is part of the prompt (the "
                "model is told the assistant speaks now), start after it.": _wrong_labels(
                    ids, a, e, include_role=True
                ),
                "The <|endoftext|> that closes each answer must be labelled too: that is how "
                "the model learns to stop.": _wrong_labels(ids, a, e, with_eot=False),
                "Everything is labelled: only the answers are scored, the system line and the "
                "user's turns get -100.": ids,
            },
            "Labels: the id inside each answer (after <|assistant|>, up to and including "
            "<|endoftext|>), -100 everywhere else.",
        ),
    )
    cut = len(ids) - 6  # inside the last answer: no <|endoftext|> at the end
    step("calling assistant_labels on the same conversation cut inside its last answer")
    assert_equal(
        assistant_labels(ids[:cut], tok.assistant_id, tok.eot_id),
        expected[:cut],
        "assistant_labels on a conversation cut inside its last answer",
        hint="A cut answer (no closing <|endoftext|>) is still an answer: label it to the end.",
    )
    padded = torch.cat([ids, torch.full((4,), tok.pad_id)])
    step("calling assistant_labels on the conversation followed by 4 padding tokens")
    assert_equal(
        assistant_labels(padded, tok.assistant_id, tok.eot_id),
        torch.cat([expected, torch.full((4,), -100)]),
        "assistant_labels on a right-padded conversation",
        hint="After an answer's <|endoftext|>, nothing is scored until the next <|assistant|>.",
    )


def _tiny_decoder() -> Decoder:
    config = DecoderConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
    )
    return Decoder(config)  # tie_embeddings=True: embed_tokens and lm_head share one tensor


def _as_pair(result, what: str) -> tuple[int, int]:
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise GradingFailure(f"{what} should return a tuple (trainable, total), got {result!r}.")
    try:
        return int(result[0]), int(result[1])
    except (TypeError, ValueError, RuntimeError):
        raise GradingFailure(f"{what} should return two ints, got {result!r}.") from None


@grader("count_parameters", points=2)
def check_count_parameters(count_parameters):
    """A tied-embedding decoder, half frozen, then with LoRA adapters: r (in + out) per layer."""
    model = _tiny_decoder()
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    state_total = sum(v.numel() for v in model.state_dict().values())
    step("calling count_parameters on a small decoder with its first layer frozen")
    got = _as_pair(count_parameters(model), "count_parameters(model)")
    if got != (trainable, total):
        hints = {
            (total, trainable): "The order is (trainable, total).",
            (total, total): "Only parameters with requires_grad=True are trainable.",
            (state_total - (total - trainable), state_total): "You counted the state_dict: "
            "it lists the tied embedding twice (embed_tokens and lm_head) and includes buffers.",
            (sum(p.requires_grad for p in params), len(params)): "You counted tensors; count "
            "their elements with p.numel().",
        }
        raise GradingFailure(
            f"count_parameters(model) returned {got}, expected (trainable, total) = "
            f"{(trainable, total)}.",
            hints.get(
                got, "Sum p.numel() over model.parameters(), and over those that require grad."
            ),
        )
    for p in model.parameters():
        p.requires_grad_(True)
    wrapped = apply_lora(model, ("q_proj", "v_proj"), rank=2)
    lora = sum(2 * (m.in_features + m.out_features) for m in _linear_layers(model, wrapped))
    step("calling count_parameters after apply_lora(model, ('q_proj', 'v_proj'), rank=2)")
    got = _as_pair(count_parameters(model), "count_parameters(LoRA model)")
    expected = (lora, total + lora)
    if got != expected:
        raise GradingFailure(
            f"With LoRA adapters on {len(wrapped)} layers: got {got}, expected {expected} "
            "(r (in + out) = 2 (16 + 16) trainable numbers per adapted layer, everything else "
            "frozen).",
            "Count what requires grad; LoRA's base weights are frozen.",
        )


def _linear_layers(model: nn.Module, names: list[str]) -> list[nn.Linear]:
    return [model.get_submodule(name).base for name in names]


# --- instruction_samples: data a person writes, checked against the scene ----------------------

SAMPLE_SCENES = (0, 1, 2)  # the scenes exercises/ch09_instruct.py names; they must agree
MIN_KINDS = 3  # kinds of question over the three samples
MIN_FACTS = 2  # facts the grader can check, in each sample's answers

# The first rule that matches names a question's kind ("Is there a red circle?" is existence,
# though it names a colour).
QUESTION_KINDS = (
    ("counting", ("how many", "number of")),
    ("existence", ("is there", "are there", "do you see a", "can you see a")),
    ("text", ("letter", "digit", "written", "text", "character")),
    ("colour", ("colour", "color")),
    ("shape", ("shape",)),
    ("position", ("where", "which cell", "what is in the", "what is at")),
    ("description", ("describe", "what do you see", "what is in this", "tell me about")),
    ("reasoning", ("why", "which", "compare", "larger", "bigger", "smaller", "more", "if ")),
)


def question_kind(question: str) -> str:
    """The kind of one human turn, from its words (`<image>` and case ignored); "other" if none."""
    text = question.replace("<image>", " ").lower()
    for kind, cues in QUESTION_KINDS:
        if any(cue in text for cue in cues):
            return kind
    return "other"


def _annotation(scene) -> str:
    from minillava.data.shapes import cell_phrase, object_phrase

    lines = [f"{object_phrase(o)} {cell_phrase(o.row, o.col)}" for o in scene.objects]
    if scene.text is not None:
        lines.append(f"the {scene.text_kind} {scene.text} in the {scene.text_cell}")
    return "; ".join(lines)


def _what_is_wrong(score, text: str) -> str:
    """The false words of one answer, quoted, and why each is false."""
    reasons, explained = [], set()
    for m in score.parsed:
        stated = " ".join(x for x in (m.size, m.colour, m.shape) if x)
        fields = [f for f in m.wrong if f in m.spans]
        if m.repeated:
            reasons.append(f"the {stated}: named twice for the same place")
        elif m.hallucinated or fields:
            wrong = ", ".join(f"{f} {text[slice(*m.spans[f])]!r}" for f in fields)
            absent = f"no {m.colour} {m.shape} in the scene (hallucinated)"
            reasons.append(
                f"'{text[m.spans['colour'][0] : m.spans['shape'][1]]}': "
                + "; ".join(
                    x
                    for x in (f"wrong {wrong}" if wrong else "", absent if m.hallucinated else "")
                    if x
                )
            )
        explained |= {m.spans[f] for f in fields}
    if score.count_right is False:
        reasons.append(f"the number of shapes (there are {score.objects})")
    others = ", ".join(repr(text[a:b]) for a, b in score.wrong_words if (a, b) not in explained)
    if score.text_right is False and score.text_mentions:
        reasons.append(f"the written character or its place: {others}")
    elif not reasons:  # a colour-shape name outside a mention ("the red circle is above ...")
        reasons = [f"{others}, not in the scene (hallucinated)"]
    return "; ".join(reasons)


@grader("instruction_samples", points=3)
def check_instruction_samples(instruction_samples):
    """Format (LlavaJsonDataset's own check), one <image> first, two rounds each, three kinds of
    question, and every fact the answers state true to the scene annotation (minillava.judge)."""
    from minillava.data.llava_json import check_record
    from minillava.data.shapes import ShapesWorld
    from minillava.judge import score_description

    step("calling instruction_samples()")
    samples = instruction_samples()
    if not isinstance(samples, list) or len(samples) != len(SAMPLE_SCENES):
        got = len(samples) if isinstance(samples, list) else type(samples).__name__
        raise GradingFailure(
            f"instruction_samples() should return a list of {len(SAMPLE_SCENES)} records, one "
            f"per scene of SAMPLE_SCENES, got {got}."
        )
    world = ShapesWorld("train", max(SAMPLE_SCENES) + 1)
    kinds = set()
    for k, (record, index) in enumerate(zip(samples, SAMPLE_SCENES, strict=True)):
        where = f"sample {k} (scene {index})"
        step(f"checking the format of {where}")
        problem = check_record(record)
        if problem is None and "image" not in record:
            problem = "no 'image' field: a visual instruction sample names its image"
        if problem is not None:
            raise GradingFailure(
                f"{where}: {problem}.",
                "The format is LLaVA's: see data/llava_json.py and chapter 9, section 1.",
            )
        expected_image = f"train_{index:06d}.png"
        if record["image"] != expected_image:
            raise GradingFailure(
                f"{where}: 'image' is {record['image']!r}; this scene's file is "
                f"{expected_image!r} (the name `minillava data export` gives it)."
            )
        turns = record["conversations"]
        if len(turns) < 4:
            raise GradingFailure(
                f"{where} has {len(turns) // 2} round(s) of question and answer; write at least "
                "two: LLaVA's data are conversations, and a later question must be answerable "
                "from the image as well as the first."
            )
        kinds |= {question_kind(t["value"]) for t in turns[0::2]}

        step(f"checking every answer of {where} against the scene annotation")
        scene, facts = world.scene(index), 0
        for j, turn in enumerate(turns[1::2]):
            score = score_description(scene, turn["value"])
            facts += score.mentions + score.named + score.text_mentions + score.counts
            if score.wrong_words:
                raise GradingFailure(
                    f"{where}, answer {j + 1} ({turn['value']!r}) says what the image does not "
                    f"show: {_what_is_wrong(score, turn['value'])}.",
                    f"The scene holds: {_annotation(scene)}. A sample that states one false "
                    "fact teaches the model to invent (chapter 9, section 1).",
                )
        if facts < MIN_FACTS:
            raise GradingFailure(
                f"{where}: the grader found {facts} fact(s) it can check in the answers; write "
                f"at least {MIN_FACTS}.",
                "Name what an answer talks about: 'There is a small green circle in the center.' "
                "can be checked; 'Green.' or 'It is green.' cannot.",
            )
    kinds.discard("other")
    if len(kinds) < MIN_KINDS:
        raise GradingFailure(
            f"the three samples ask {len(kinds)} kind(s) of question ({', '.join(sorted(kinds))}); "
            f"ask at least {MIN_KINDS}.",
            "Kinds: " + ", ".join(kind for kind, _ in QUESTION_KINDS) + ". Variety is what makes "
            "an instruction set teach more than one skill.",
        )
