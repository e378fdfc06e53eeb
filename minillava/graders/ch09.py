"""Chapter 9 graders: visual instruction tuning (exercises/ch09_instruct.py).

LoRA checks compare with minillava.lora.LoRALinear on random layers (square ones too, where a
transposed update has the right shape and only its values betray it); the label check renders
real conversations with the course tokenizer and compares with Tokenizer.render's mask. A
failure says what is wrong (and, where a known mistake reproduces the learner's result, which
one); the hint, shown on request, says where to look, in words.
"""

import copy

import torch
from torch import nn

from minillava import lora
from minillava.decoder import Decoder, DecoderConfig
from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_shape,
    assert_tensor,
    diagnose,
    fail,
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
    layout = (
        "Both factors are laid out like a linear layer's weight, (out, in): A takes the input "
        "down to the rank, B takes the rank back up to the output."
    )
    assert_shape(
        A, (r, in_f), "lora_A", why="A maps the input (in = 12) down to r = 4 numbers", hint=layout
    )
    assert_shape(
        B, (out_f, r), "lora_B", why="B maps r = 4 numbers up to the output (out = 10)", hint=layout
    )
    if not torch.all(B == 0):
        if torch.all(A == 0):
            raise GradingFailure(
                "A is zero and B is random: B A = 0, but the convention is the other way round.",
                "LoRA starts with A random and B zero (the paper, peft and minillava.lora): swap "
                "which of the two factors you fill with random values.",
            )
        raise GradingFailure(
            "B is not zero, so B A ≠ 0: the adapted layer does not start equal to the "
            "pretrained one (fine-tuning would begin by damaging the model).",
            "B is the factor that starts at zero, every entry of it: then B A is zero whatever "
            "A holds. A is the one that stays random.",
        )
    if torch.all(A == 0) or float(A.float().std()) < 1e-4:
        raise GradingFailure(
            "A and B are both zero: then the gradient of B (which goes through x Aᵀ) and the "
            "gradient of A (which goes through B) are zero too, and the adapter never learns.",
            "Give A random values: the initialisation a linear layer gives its own weight "
            "(Kaiming uniform), or small Gaussian values, scaled down by the input size.",
        )
    if float(A.abs().max()) > 10:
        raise GradingFailure(
            f"A's entries reach {float(A.abs().max()):.3g}: far too large for an init.",
            "Scale A like a linear layer's own weight at initialisation (Kaiming uniform), or "
            "use small Gaussian values: entries well below 1.",
        )
    step("checking that B A = 0 and that a gradient reaches B")
    A = A.detach().clone().float().requires_grad_(True)
    B = B.detach().clone().float().requires_grad_(True)
    x = torch.randn(3, in_f)
    update = x @ A.T @ B.T
    assert_close(update, torch.zeros(3, out_f), "x Aᵀ Bᵀ at initialisation")
    update.square().add(update).sum().backward()
    if B.grad is None or float(B.grad.abs().max()) == 0:
        raise GradingFailure(
            "No gradient reaches B at initialisation: the gradient of B flows through x Aᵀ, "
            "which is zero here.",
            "A must hold random values, so that x Aᵀ is not zero.",
        )


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
        diagnosis=diagnose(
            got,
            {
                "The update is not scaled: x Aᵀ Bᵀ was added without its factor alpha / r, so "
                "its size would change with the rank.": base + delta,
                "The update is scaled by alpha alone, not by alpha / r: it is r times too large "
                "(here the rank is 2).": base + alpha * delta,
                "The update is scaled by r / alpha, the factor upside down: it should be "
                "alpha / r.": base + (r / alpha) * delta,
                "The pretrained layer is missing: your output is the low-rank update alone, "
                "without x Wᵀ + b.": (alpha / r) * delta,
                "The bias is missing: the pretrained layer's b was not added.": base
                - b
                + (alpha / r) * delta,
            },
        ),
        hint="Two terms: the pretrained layer's output (the input times the weight transposed, "
        "plus the bias) and the low-rank update, the input through A then through B, scaled "
        "by alpha over the rank; the rank is the number of rows of lora_A.",
    )
    step("calling lora_forward with bias=None and alpha=8, rank 3")
    A3, B3 = torch.randn(3, in_f), torch.randn(out_f, 3)
    assert_close(
        lora_forward(x, W, None, A3, B3, 8.0),
        _reference_lora(x, W, None, A3, B3, 8.0),
        "lora_forward(x, W, None, A, B, alpha=8) with rank 3",
        hint="The bias may be None: the decoder's projections have none. Add it only when there "
        "is one; and read the rank from lora_A, here 3.",
    )
    step("calling lora_forward with B = 0 (an adapter fresh from init)")
    assert_close(
        lora_forward(x, W, b, A, torch.zeros(out_f, r), alpha),
        x @ W.T + b,
        "lora_forward with B = 0 (should equal the pretrained layer)",
        hint="With B all zero the update vanishes, and the layer must give exactly what the "
        "pretrained layer gives.",
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
            "is (out, r) times (r, in)",
            diagnosis=diagnose(got, _merge_mistakes(W, A, B, alpha)),
            hint="The merged weight is the pretrained weight plus the update, scaled by alpha "
            "over the rank; the update is B times A, in that order, which has the weight's "
            "shape (out, in).",
        )
        x = torch.randn(3, in_f)
        with torch.no_grad():
            lora_out = x @ W.T + scale * (x @ A.T @ B.T)
        assert_close(x @ got.T, lora_out, "x @ W'ᵀ (the merged layer) against the LoRA layer")


def _merge_mistakes(W, A, B, alpha) -> dict:
    scale = alpha / A.shape[0]
    mistakes = {
        "The update is not scaled: B A was added without its factor alpha / r.": W + B @ A,
        "The update is scaled by alpha alone, not by alpha / r: it is r times too large.": W
        + alpha * (B @ A),
        "You returned the update only, without the pretrained weight W that it corrects.": scale
        * (B @ A),
    }
    if W.shape[0] == W.shape[1]:  # a transposed update only fits a square layer
        transposed = (
            "The update is transposed: you added Aᵀ Bᵀ, shape (in, out), where B A, shape "
            "(out, in), belongs. The two shapes agree only when the layer is square, so there "
            "the mistake passes silently."
        )
        mistakes[transposed] = W + scale * (A.T @ B.T)
    return mistakes


def _render(tok, conversation):
    ids, mask = tok.render(conversation)
    ids = torch.tensor(ids)
    labels = torch.where(torch.tensor(mask), ids, torch.full_like(ids, -100))
    return ids, labels


def _wrong_labels(
    ids, assistant_id, eot_id, include_role=False, with_eot=True, last_only=False, to_end=False
):
    """Labels as a known mistake writes them (the flags switch one step off each)."""
    labels = torch.full_like(ids, -100)
    if to_end:  # from the first answer on, everything: the answers never end
        first = int((ids == assistant_id).nonzero().flatten()[0])
        labels[first + 1 :] = ids[first + 1 :]
        return labels
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
        diagnosis=diagnose(
            got,
            {
                "Only the last answer is labelled: every assistant turn is scored.": _wrong_labels(
                    ids, a, e, last_only=True
                ),
                "Everything after the first <|assistant|> is labelled: an answer ends with its "
                "<|endoftext|>, and the user's next turn must not be scored.": _wrong_labels(
                    ids, a, e, to_end=True
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
        ),
        hint="Walk the ids once, remembering whether you are inside an answer: an answer starts "
        "after each <|assistant|> and ends with the <|endoftext|> that closes it, which is "
        "labelled too. Everything else gets the ignore index.",
    )
    cut = len(ids) - 6  # inside the last answer: no <|endoftext|> at the end
    step("calling assistant_labels on the same conversation cut inside its last answer")
    assert_equal(
        assistant_labels(ids[:cut], tok.assistant_id, tok.eot_id),
        expected[:cut],
        "assistant_labels on a conversation cut inside its last answer",
        hint="A cut answer, with no closing <|endoftext|>, is still an answer: label its tokens "
        "up to the end of the input, as you pass them.",
    )
    padded = torch.cat([ids, torch.full((4,), tok.pad_id)])
    step("calling assistant_labels on the conversation followed by 4 padding tokens")
    assert_equal(
        assistant_labels(padded, tok.assistant_id, tok.eot_id),
        torch.cat([expected, torch.full((4,), -100)]),
        "assistant_labels on a right-padded conversation",
        hint="After an answer's <|endoftext|>, nothing is scored until the next <|assistant|>: "
        "padding included.",
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
        diagnoses = {
            (total, trainable): "The two numbers are swapped: the order is (trainable, total).",
            (total, total): "You counted every parameter as trainable: the frozen ones (those "
            "that do not require gradients) are not.",
            (state_total - (total - trainable), state_total): "You counted the state_dict: "
            "it lists the tied embedding twice (embed_tokens and lm_head) and includes buffers.",
            (sum(p.requires_grad for p in params), len(params)): "You counted tensors, not "
            "numbers: a (16, 16) weight is 256 parameters, not one.",
        }
        message = (
            f"count_parameters(model) returned {got}, expected (trainable, total) = "
            f"{(trainable, total)}."
        )
        fail(
            message + (f"\n{diagnoses[got]}" if got in diagnoses else ""),
            "Go over the model's parameters, each once (a tied tensor is one set of numbers), "
            "adding up their numbers of elements; the trainable count adds only those that "
            "require gradients.",
        )
    for p in model.parameters():
        p.requires_grad_(True)
    wrapped = apply_lora(model, ("q_proj", "v_proj"), rank=2)
    lora = sum(2 * (m.in_features + m.out_features) for m in _linear_layers(model, wrapped))
    step("calling count_parameters after apply_lora(model, ('q_proj', 'v_proj'), rank=2)")
    got = _as_pair(count_parameters(model), "count_parameters(LoRA model)")
    expected = (lora, total + lora)
    if got != expected:
        diagnoses = {
            (total + lora, total + lora): "You counted the frozen base weights as trainable: "
            "apply_lora froze them.",
            (lora, total): "The total left out the adapters: they are parameters of the model too.",
        }
        message = (
            f"With LoRA adapters on {len(wrapped)} layers: got {got}, expected {expected} "
            "(r (in + out) = 2 (16 + 16) trainable numbers per adapted layer, everything else "
            "frozen)."
        )
        fail(
            message + (f"\n{diagnoses[got]}" if got in diagnoses else ""),
            "Count what requires gradients: after apply_lora only the adapters' A and B do; "
            "the total counts every parameter, the adapters included.",
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
            f"per scene of SAMPLE_SCENES, got {got}.",
            "Return a list with one record (a dict) per scene, in the order of SAMPLE_SCENES.",
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
                f"{expected_image!r} (the name minillava data export gives it).",
                "Each sample names its own scene's image file, as the export writes it: the "
                "split, an underscore, the scene's index in six digits, then the extension.",
            )
        turns = record["conversations"]
        if len(turns) < 4:
            raise GradingFailure(
                f"{where} has {len(turns) // 2} round(s) of question and answer; write at least "
                "two: LLaVA's data are conversations, and a later question must be answerable "
                "from the image as well as the first.",
                "Add a second question about the same image, and its answer: the turns "
                "alternate human and gpt, and only the first human turn holds the image.",
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


# --- merge_lora (stretch): the whole model, not one matrix ------------------------------------


class _Block(nn.Module):
    """A residual block with a square layer, a widening one and a narrowing one without bias."""

    def __init__(self, width: int = 6, hidden: int = 10):
        super().__init__()
        self.mix = nn.Linear(width, width)  # square: a transposed update fits it
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., width) -> (..., width)
        return x + self.down(torch.tanh(self.up(torch.tanh(self.mix(x)))))


class _Net(nn.Module):
    """Two blocks in a ModuleList (so the layers sit two levels down) and a head LoRA skips."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., 6) -> (..., 4)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _adapted(model: nn.Module, targets, rank: int, alpha: float) -> list[str]:
    """apply_lora with dropout, then random adapters (B = 0 would hide every merging mistake)."""
    names = apply_lora(model, targets, rank=rank, alpha=alpha, dropout=0.1)
    with torch.no_grad():
        for name in names:
            model.get_submodule(name).lora_B.normal_()
    return names


def _lora_left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear) or "lora" in n]


def _check_layer(model: nn.Module, name: str, W, b, A, B, alpha) -> None:
    """One adapted layer after merge_lora: a plain nn.Linear with W + (alpha / r) B A and b."""
    layer = model.get_submodule(name)
    scale = alpha / A.shape[0]
    merged = W + scale * (B @ A)
    if isinstance(layer, LoRALinear) or hasattr(layer, "lora_A"):
        inside = isinstance(getattr(layer, "base", None), nn.Linear) and torch.allclose(
            layer.base.weight.detach().to(merged.dtype), merged, atol=1e-6
        )
        fail(
            f"After merge_lora, {name} is still a {type(layer).__name__}."
            + (
                "\nThe merged layer was put inside the LoRA wrapper, as its base, instead of "
                "in the wrapper's place: the wrapper is still there and adds its update a "
                "second time."
                if inside
                else ""
            ),
            "Replace the whole LoRA layer, in the module that holds it, by the new plain "
            "linear layer: set it on its parent under its own last name.",
        )
    if type(layer) is not nn.Linear:
        fail(
            f"After merge_lora, {name} is a {type(layer).__name__}, expected a plain nn.Linear.",
            "Each LoRA layer becomes an ordinary linear layer, nothing around it.",
        )
    out_f, in_f = W.shape
    mistakes = {
        "The update is not scaled: B A was added without its factor alpha / r.": W + B @ A,
        "The update is scaled by alpha alone, not by alpha / r: it is r times too large.": W
        + alpha * (B @ A),
        "The update was not added: the weight is still the pretrained W.": W,
        "You kept the update only, without the pretrained weight W that it corrects.": scale
        * (B @ A),
    }
    if out_f == in_f:
        mistakes[
            "The update is transposed: you added Aᵀ Bᵀ, shape (in, out), where B A, shape "
            "(out, in), belongs. On this square layer the shapes agree, so nothing failed."
        ] = W + scale * (A.T @ B.T)
    assert_close(
        layer.weight,
        merged,
        f"the weight of the merged {name} ({out_f}, {in_f})",
        why_shape=f"it replaces the pretrained layer: (out, in) = ({out_f}, {in_f})",
        diagnosis=diagnose(layer.weight, mistakes),
        hint="Each merged weight is what merge_lora_weight returns for that layer: its base "
        "layer's weight, its two factors and its alpha (the rank is the number of rows of A).",
    )
    if layer.weight.dtype != W.dtype:
        fail(
            f"The weight of the merged {name} is {layer.weight.dtype}; the model's weights are "
            f"{W.dtype}. A model in half precision merged into float32 layers doubles in size, "
            "and its first matrix product with a mismatched input fails.",
            "Create the new layer with the dtype (and the device) of the weight it replaces.",
        )
    if b is None and layer.bias is not None:
        fail(
            f"{name} had no bias, and the merged layer has one: a new linear layer gets a "
            "random bias unless it is told not to have one, and it is added to every output.",
            "Give the new layer a bias exactly when the layer it replaces has one.",
        )
    if b is not None:
        if layer.bias is None:
            fail(
                f"The bias of {name} is missing: the merged layer has none, and the pretrained "
                "layer's b is no longer added.",
                "LoRA changes the weight only: the bias goes over to the merged layer as it was.",
            )
        assert_close(
            layer.bias,
            b,
            f"the bias of the merged {name}",
            diagnosis="It is not the pretrained layer's bias: it looks like the new layer kept "
            "the random bias it was created with.",
            hint="LoRA changes the weight only: copy the bias over as it was.",
        )


@grader("merge_lora", points=3)
def check_merge_lora(merge_lora):
    """Stretch: every LoRA layer of two adapted models becomes a plain nn.Linear, same outputs.

    A two-level model in float64 (square, widening and bias-free layers, one left alone) and a
    Decoder, each wrapped by apply_lora with dropout and given random adapters: every LoRALinear
    must become a plain nn.Linear with W + (alpha / r) B A, its bias and its dtype, in its own
    parent; the outputs, the state_dict names and the parameter count are the model's before
    LoRA; the same object is returned; the Decoder agrees with minillava.lora.merge_lora. The
    adapters' own tensors must be left as they were (the grader's guard compares them).
    """
    model = _Net().double()
    names_before = list(model.state_dict())
    count_before = sum(p.numel() for p in model.parameters())
    rank, alpha = 2, 6.0
    names = _adapted(model, ("mix", "up", "down"), rank, alpha)
    layers = {name: model.get_submodule(name) for name in names}
    saved = {
        name: (
            m.base.weight.detach().clone(),
            None if m.base.bias is None else m.base.bias.detach().clone(),
            m.lora_A.detach().clone(),
            m.lora_B.detach().clone(),
        )
        for name, m in layers.items()
    }
    x = torch.randn(5, 6, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    step(
        "calling merge_lora on a float64 model whose blocks.0/1.mix (6, 6), up (10, 6) and "
        "down (6, 10, no bias) were wrapped by apply_lora(rank=2, alpha=6, dropout=0.1)"
    )
    got = merge_lora(model)
    if got is None:
        fail(
            "merge_lora returned None; it should return the model it was given, merged.",
            "Change the model in place, then return it (so that a call can be chained).",
        )
    if got is not model:
        fail(
            f"merge_lora returned a different {type(got).__name__} object: the model it was "
            "given still holds its LoRA layers.",
            "Replace the layers inside the model you were handed, and return that same model.",
        )
    dotted = [
        (parent or "the model", key)
        for parent, module in model.named_modules()
        for key in module._modules
        if "." in key
    ]
    if dotted:
        parent, key = dotted[0]
        fail(
            f"A module was registered on {parent} under the dotted name {key!r}: setting an "
            "attribute with a full dotted name does not reach into the submodules, it adds a "
            "new module beside them, and the LoRA layer is still in place.",
            "Split each dotted name into the parent's path and the last part; find the parent "
            "module, and replace the child there.",
        )
    for name in names:
        step(f"checking {name} after merge_lora")
        try:
            model.get_submodule(name)
        except AttributeError:
            fail(
                f"After merge_lora the model has no module {name!r} any more.",
                "Each LoRA layer is replaced under the same name, in the same parent.",
            )
        _check_layer(model, name, *saved[name], alpha)
    left = _lora_left(model)
    if left:
        fail(
            f"LoRA modules are left in the model after merge_lora: {left}.",
            "Replace every LoRA layer, not only some; collect them all first, then replace.",
        )
    if set(model.state_dict()) != set(names_before):
        missing = sorted(set(names_before) - set(model.state_dict()))
        extra = sorted(set(model.state_dict()) - set(names_before))
        fail(
            f"The merged model's state_dict names differ from the model's before apply_lora: "
            f"missing {missing}, extra {extra}.",
            "Replace each LoRA layer under its own name, and keep nothing else beside it.",
        )
    count = sum(p.numel() for p in model.parameters())
    if count != count_before:
        fail(
            f"The merged model has {count} parameters; before apply_lora it had "
            f"{count_before}. Merging should leave exactly the original layers' numbers.",
            "Nothing of the adapters stays: only the merged weights and the biases.",
        )
    step("running the merged model on the same input")
    with torch.no_grad():
        assert_close(
            model(x),
            expected,
            "the merged model's output (against the LoRA model's, in eval mode)",
            hint="Every layer that LoRA wrapped must compute what its LoRA layer computed.",
        )

    step("calling merge_lora on a Decoder adapted on q_proj, v_proj and gate_proj (rank 4)")
    decoder = _tiny_decoder()
    names_before = list(decoder.state_dict())
    _adapted(decoder, ("q_proj", "v_proj", "gate_proj"), 4, 8.0)
    ids = torch.randint(0, decoder.config.vocab_size, (2, 7))
    decoder.eval()
    with torch.no_grad():
        expected = decoder(ids).logits
    reference = lora.merge_lora(copy.deepcopy(decoder))
    merged = merge_lora(decoder)
    if merged is not decoder or _lora_left(decoder):
        fail(
            "On a Decoder, merge_lora left LoRA modules in place "
            f"({_lora_left(decoder)[:3]}) or returned another object.",
            "Find the LoRA layers wherever they sit, however deep, and replace each in its "
            "own parent.",
        )
    assert list(reference.state_dict()) == names_before  # the library's merge, for comparison
    if set(decoder.state_dict()) != set(names_before):
        fail(
            "On a Decoder, the merged state_dict names differ from the decoder's own: "
            f"{sorted(set(decoder.state_dict()) ^ set(names_before))[:4]}.",
            "Replace each LoRA layer under its own name.",
        )
    for key, value in reference.state_dict().items():
        assert_close(
            decoder.state_dict()[key],
            value,
            f"{key} of the merged Decoder (against minillava.lora.merge_lora)",
        )
    with torch.no_grad():
        assert_close(
            decoder(ids).logits,
            expected,
            "the merged Decoder's logits (against the LoRA decoder's, in eval mode)",
            atol=1e-5,
        )
