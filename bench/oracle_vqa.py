"""How fast can the decoder learn ShapesWorld VQA if its image tokens were perfect?

The `instruct` stage of `make train` plateaus near 50% test accuracy. Is that the eyes (ViT +
projector) or the brain (the decoder)? This script takes the eyes out of the question: each of the
9 grid cells becomes one "oracle" image token, the sum of learned embeddings of what is really in
the cell (colour, shape, size, written character, and the cell's position), built from the scene
annotation. The decoder (the cpu preset's size by default, random init) is trained on exactly the
instruct stage's VQA conversations with those tokens in place of the projected image, and its
accuracy per question type is measured on validation images (teacher-forced: an answer counts if
every one of its tokens is the argmax).

    python bench/oracle_vqa.py                          # all types, 1000 steps (~15 min, 1 core)
    python bench/oracle_vqa.py --types colour --steps 200
    python bench/oracle_vqa.py --hidden-size 256 --steps 200
    # "Is A left of B?" alone, in two-object scenes, after 300 steps of the look-ups:
    python bench/oracle_vqa.py --types relation --relation-forms pair --objects 2 \
        --warm-types colour,position,shape --warm-steps 300 --questions 1 --eval-questions 1
    # the same, answered with its working first ("the circle is left, the cross is right, so yes"):
    python bench/oracle_vqa.py ... --pair-answer restate_axis
    # half of them so, asked "Explain your answer." instead; scored on the plain yes/no:
    python bench/oracle_vqa.py ... --pair-answer restate_axis --explain-share 0.5
    # the bare yes/no, with both cells read out of layer 2 at the answer position (a probe loss):
    python bench/oracle_vqa.py ... --pointer-weight 1.0 --pointer-layer 2
    # or at the image tokens: each of the 9 says whether it holds A, B or neither:
    python bench/oracle_vqa.py ... --pointer-weight 1.0 --pointer-layer 1 --pointer-at image

If the decoder cannot learn the mixture from perfect tokens within the steps a CPU budget allows,
no change to the vision side can make `make train` reach the accuracy goal within that budget.
Results: docs/results.md, "What limits the accuracy".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from minillava.data.instruct import (  # noqa: E402
    EXPLAIN_SUFFIX,
    QA,
    QUESTION_TYPES,
    RELATIONS,
    compared_places,
    noun_phrase,
    select,
    with_working,
)
from minillava.data.shapes import (  # noqa: E402
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    ShapesWorld,
    WorldConfig,
)
from minillava.decoder import Decoder, DecoderConfig  # noqa: E402
from minillava.stages import vqa_turns  # noqa: E402
from minillava.tokenizer import get_tokenizer  # noqa: E402

GRID = 9  # ShapesWorld's 3 x 3 cells: one oracle token each


class OracleCells(nn.Module):
    """Scene annotation -> (9, C): per cell, embeddings of its contents plus its position."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.colours, self.shapes, self.sizes = list(COLOURS), list(SHAPES), list(SIZES)
        # The last row of each table means "nothing here" (an empty cell).
        self.colour = nn.Embedding(len(self.colours) + 1, hidden_size)
        self.shape = nn.Embedding(len(self.shapes) + 1, hidden_size)
        self.size = nn.Embedding(len(self.sizes) + 1, hidden_size)
        self.char = nn.Embedding(128, hidden_size)  # ASCII code of a written letter/digit; 0: none
        self.position = nn.Embedding(GRID, hidden_size)
        for table in self.parameters():
            nn.init.normal_(table, std=0.02)  # the decoder's token embeddings' scale

    def forward(self, scene: Scene) -> torch.Tensor:
        colour = torch.full((GRID,), len(self.colours))
        shape = torch.full((GRID,), len(self.shapes))
        size = torch.full((GRID,), len(self.sizes))
        char = torch.zeros(GRID, dtype=torch.long)
        for obj in scene.objects:
            cell = obj.row * 3 + obj.col
            colour[cell] = self.colours.index(obj.colour)
            shape[cell] = self.shapes.index(obj.shape)
            size[cell] = self.sizes.index(obj.size)
        if scene.text is not None:
            char[scene.text_row * 3 + scene.text_col] = ord(scene.text)
        cells = self.colour(colour) + self.shape(shape) + self.size(size) + self.char(char)
        return cells + self.position(torch.arange(GRID))  # (9, C)


# Relation questions come in three forms (data.instruct.ask_relation), told apart by the op of
# the query they run; the script can train on some of them only, and reports each apart
# ("relation:pair" ...).
FORM_OF_OP = {"relation": "pair", "any_relation": "any", "nearest": "nearest"}
RELATION_FORMS = tuple(FORM_OF_OP.values())


# "Is A left of B?" answered with its working first, the yes/no last (`--pair-answer`): which
# part of the question is hard to learn? "cells" and "axis" write the two look-ups (A's cell
# then B's, or only the row or column the relation compares); the "restate" forms name each
# shape before its place, so that the look-up sits next to the words it looks up.
PAIR_ANSWERS = ("plain", "cells", "axis", "restate", "restate_axis")
# `--explain-share P` asks a share P of the pair questions with " Explain your answer." in place of
# the short-answer instruction and answers those with their working, the others with the bare
# yes/no: does learning the worked answer teach the bare one? (As "Distilling step-by-step",
# Hsieh et al. 2023, trains a label and a rationale as two tasks told apart by their prompt.)
# The question and the image come first in both, so the image tokens are computed the same way.


def worked_answer(scene: Scene, qa: QA, form: str) -> QA:
    """`qa` (a pair relation question) with its answer written as `form` ends in the yes/no."""
    if form == "plain" or qa.query.get("op") != "relation":
        return qa
    a, b = select(scene, qa.query["a"])[0], select(scene, qa.query["b"])[0]
    a_axis, b_axis = compared_places(a, b, qa.query["relation"])
    a_name, b_name = noun_phrase(qa.query["a"]), noun_phrase(qa.query["b"])
    working = {
        "cells": f"{a.cell} and {b.cell}",  # "top left and bottom right, so yes"
        "axis": f"{a_axis} and {b_axis}",  # "left and right, so yes"
        "restate": f"{a_name} is {a.cell}, {b_name} is {b.cell}",
        "restate_axis": qa.explanation,  # data.instruct.relation_working: what instruct trains on
    }[form]
    return QA(qa.question, with_working(working, qa.answer), qa.type, qa.query)


# `--pointer-weight W` adds a probe loss to the bare "Is A left of B?": at the position that
# answers it, two linear heads on layer `--pointer-layer`'s output name A's cell and B's cell
# (9-way each). The working's look-ups ("the square is bottom, ...") supervise, in words, what
# the answer position must gather; the probe supervises the same in the residual stream, where
# the bare answer needs it, and the heads are thrown away after training ("deep supervision",
# Lee et al. 2015; probes as in Alain & Bengio 2016, here trained with the model).
# `--pointer-at image` puts the probe at the 9 image tokens instead, one 3-way head each
# ("holds A", "holds B", neither): the image tokens follow the question and can read it, so
# this supervises which named shape is which where the cells are, before anything is compared.


def pointer_targets(scene: Scene, qa: QA) -> tuple[int, int]:
    """(A's cell, B's cell) as 0-8 for a pair question, (-1, -1) for any other question."""
    if qa.query.get("op") != "relation":
        return -1, -1
    a, b = select(scene, qa.query["a"])[0], select(scene, qa.query["b"])[0]
    return a.row * 3 + a.col, b.row * 3 + b.col


# `--pair-question given_axis` writes both places into the question itself: "Is the square,
# bottom, above the cross, middle?". Nothing is left to look up in the image: how fast is the
# comparison alone learnt?
PAIR_QUESTIONS = ("asked", "given_axis")


def given_axis_question(scene: Scene, qa: QA) -> str:
    a, b = select(scene, qa.query["a"])[0], select(scene, qa.query["b"])[0]
    a_place, b_place = compared_places(a, b, qa.query["relation"])
    a_name, b_name = noun_phrase(qa.query["a"]), noun_phrase(qa.query["b"])
    words = RELATIONS[qa.query["relation"]][0]
    return f"Is {a_name}, {a_place}, {words} {b_name}, {b_place}?"


def make_batch(world, indices, types, questions, rng, tokenizer, decoder, cells, options=None):
    """(inputs_embeds (B, T, C), labels (B, T), attention_mask (B, T), types per row, pointers).

    `pointers` (B, 4): the position that answers the row's first question (the one before its
    first scored token), A's cell and B's cell when that question is a bare pair question (-1
    otherwise), and the position of the first image token.

    `options` may restrict the scenes (`objects`: the object counts allowed) and the relation
    questions (`relation_forms`); a scene that cannot give an allowed question is swapped for
    another of `world`, drawn with `rng`. A relation question's type reads "relation:FORM".
    `options["pair_answer"]` (one of PAIR_ANSWERS) writes pair answers with their working;
    with `options["explain_share"]` = P, only a share P of them, asked to explain instead (one
    question a row: the instruction follows the first question only).
    """
    objects = (options or {}).get("objects")
    forms = (options or {}).get("relation_forms", RELATION_FORMS)
    pair_answer = (options or {}).get("pair_answer", "plain")
    pair_question = (options or {}).get("pair_question", "asked")
    explain_share = (options or {}).get("explain_share")
    # Exactly the instruct stage's VQA conversations, restricted to `types`.
    weights = {t: float(t in types) for t in QUESTION_TYPES}
    rows, labels, asked, pointers = [], [], [], []
    for i in indices:
        for _attempt in range(1000):
            scene = world.scene(i)  # the annotation only: no pixels are drawn
            if objects is None or len(scene.objects) in objects:
                turns, asked_here = vqa_turns(
                    scene, rng, world.config, questions, weights, explain_share=explain_share
                )
                row_types = [
                    f"relation:{FORM_OF_OP[qa.query['op']]}" if qa.type == "relation" else qa.type
                    for qa in asked_here
                ]
                if all(k.split(":")[-1] in forms for k in row_types if k.startswith("relation")):
                    break
            i = rng.randrange(len(world))  # e.g. one object: no "Is A left of B?" to ask
        else:
            raise RuntimeError(f"no scene of {world.split!r} gives {types} with {options}")
        pointer = (-1, -1)
        for k, qa in enumerate(asked_here):  # answers are turns 1, 3, ..., spaced (space_answers)
            form = pair_answer
            if explain_share is not None:  # vqa_turns asked some to explain: only they are worked
                form = pair_answer if turns[2 * k]["value"].endswith(EXPLAIN_SUFFIX) else "plain"
            turns[2 * k + 1]["value"] = " " + worked_answer(scene, qa, form).answer
            if k == 0 and form == "plain":
                pointer = pointer_targets(scene, qa)
            if k == 0 and pair_question == "given_axis" and qa.query.get("op") == "relation":
                turns[0]["value"] = turns[0]["value"].replace(
                    qa.question, given_axis_question(scene, qa), 1
                )
        ids, scored = tokenizer.render(turns)
        at = ids.index(tokenizer.image_id)
        embed = decoder.embed_tokens
        rows.append(
            torch.cat(
                [embed(torch.tensor(ids[:at])), cells(scene), embed(torch.tensor(ids[at + 1 :]))]
            )
        )
        label = [t if s else -100 for t, s in zip(ids, scored, strict=True)]
        label = label[:at] + [-100] * GRID + label[at + 1 :]
        labels.append(torch.tensor(label))
        asked.append(row_types)
        first_scored = next(t for t, v in enumerate(label) if v != -100)
        pointers.append((first_scored - 1, *pointer, at))
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, rows[0].shape[-1])
    y = torch.full((len(rows), T), -100)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (row, label) in enumerate(zip(rows, labels, strict=True)):
        x[b, : len(row)], y[b, : len(label)], mask[b, : len(row)] = row, label, 1
    return x, y, mask, asked, torch.tensor(pointers)


@torch.no_grad()
def accuracy(
    decoder, cells, world, tokenizer, types, n_images=240, questions=2, options=None
) -> dict[str, float]:
    """Teacher-forced exact match per type on `n_images` validation images, `questions` each
    (1: every question before the image, the eval's format; 2: the second one after it).
    Relation is also reported by form ("relation:pair", ...); "overall" counts each answer once.
    With a worked pair answer, "relation:pair/work" scores the working (every token before the
    yes/no) and "relation:pair/final" the yes/no alone, given the true working."""
    decoder.eval()
    rng, right, total = random.Random(123), {}, {}
    worked = (options or {}).get("pair_answer", "plain") != "plain"
    worked = worked and (options or {}).get("explain_share") in (None, 1.0)
    for start in range(0, n_images, 48):
        indices = range(start, min(start + 48, n_images))
        x, y, mask, asked, _ = make_batch(
            world, indices, types, questions, rng, tokenizer, decoder, cells, options
        )
        predicted = decoder(inputs_embeds=x, attention_mask=mask).logits[:, :-1].argmax(-1)
        target = y[:, 1:]
        for b, row_types in enumerate(asked):
            positions = (target[b] != -100).nonzero().flatten().tolist()
            answers: list[list[int]] = []  # consecutive scored positions = one answer (+ EOT)
            for p in positions:
                if answers and p == answers[-1][-1] + 1:
                    answers[-1].append(p)
                else:
                    answers.append([p])
            for kind, answer in zip(row_types, answers, strict=True):
                hits = predicted[b, answer] == target[b, answer]  # the last one: <|endoftext|>
                whole = bool(hits.all())
                scores = {kind: whole, kind.split(":")[0]: whole}
                if kind == "relation:pair" and worked:  # hits[-2]: the yes/no
                    scores |= {
                        f"{kind}/work": bool(hits[:-2].all()),
                        f"{kind}/final": bool(hits[-2]),
                    }
                for key, ok in scores.items():  # "relation:pair" counts for relation too
                    right[key] = right.get(key, 0) + ok
                    total[key] = total.get(key, 0) + 1
    decoder.train()
    result = {kind: right[kind] / total[kind] for kind in sorted(total)}
    plain = [kind for kind in total if ":" not in kind]
    result["overall"] = sum(right[k] for k in plain) / sum(total[k] for k in plain)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(QUESTION_TYPES), help="comma-separated")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--questions", type=int, default=8, help="per image, as in instruct")
    parser.add_argument(
        "--eval-questions", type=int, default=2, help="per validation image (1: the eval's format)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--relation-forms",
        default=",".join(RELATION_FORMS),
        help="which relation questions to ask (comma-separated; e.g. pair: 'Is A left of B?')",
    )
    parser.add_argument(
        "--objects", default="", help="only scenes with these object counts (e.g. 2 or 2,3)"
    )
    parser.add_argument(
        "--warm-types",
        default="",
        help="train on these types first (e.g. colour,position,shape: the look-ups), then --types",
    )
    parser.add_argument("--warm-steps", type=int, default=0, help="steps of --warm-types")
    parser.add_argument(
        "--pair-answer",
        default="plain",
        choices=PAIR_ANSWERS,
        help="pair relation answers: the yes/no (plain) or with its working first",
    )
    parser.add_argument(
        "--explain-share",
        type=float,
        default=None,
        help="ask this share of the pair questions to explain, with the --pair-answer working; "
        "the others get the bare yes/no (scored apart: 'explained:relation:pair')",
    )
    parser.add_argument(
        "--pointer-weight",
        type=float,
        default=0.0,
        help="weight of the probe loss naming A's and B's cells at a bare pair answer (0: off)",
    )
    parser.add_argument(
        "--pointer-layer",
        default="2",
        help="the probe reads this layer's output (1-N); one a place, comma-separated, or one",
    )
    parser.add_argument(
        "--pointer-at",
        default="answer",
        help="where the probe is: at the answering position (A's cell, B's cell), at each image "
        "token (A, B or neither), or both: answer | image | answer,image",
    )
    parser.add_argument(
        "--pair-question",
        default="asked",
        choices=PAIR_QUESTIONS,
        help="pair questions as the eval asks them, or with both places written in (given_axis)",
    )
    parser.add_argument(
        "--given-axis-until",
        type=int,
        default=0,
        help="train on given_axis pair questions before this step, then as --pair-question says "
        "(a curriculum: the comparison of written places first); evaluated as --pair-question",
    )
    parser.add_argument("--val-images", type=int, default=240)
    parser.add_argument("--out", type=Path, default=Path("bench/results/oracle_vqa.json"))
    args = parser.parse_args(argv)
    types = tuple(args.types.split(","))
    warm_types = tuple(args.warm_types.split(",")) if args.warm_types else types
    for flag, chosen in (("--types", types), ("--warm-types", warm_types)):
        unknown = [t for t in chosen if t not in QUESTION_TYPES]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; expected some of {QUESTION_TYPES}")
    forms = tuple(args.relation_forms.split(","))
    if not set(forms) <= set(RELATION_FORMS) or not forms:
        parser.error(f"--relation-forms: expected some of {RELATION_FORMS}, got {forms}")
    try:
        objects = tuple(int(k) for k in args.objects.split(",")) if args.objects else None
    except ValueError:
        parser.error(f"--objects: expected counts like 2 or 2,3, got {args.objects!r}")
    options = {
        "relation_forms": forms,
        "objects": objects,
        "pair_answer": args.pair_answer,
        "pair_question": args.pair_question,
    }
    if args.explain_share is not None:
        if not 0.0 <= args.explain_share <= 1.0:
            parser.error(f"--explain-share: expected a share in [0, 1], got {args.explain_share}")
        if args.pair_answer == "plain" or args.questions != 1 or args.eval_questions != 1:
            parser.error("--explain-share needs a --pair-answer other than plain and one question")
        options["explain_share"] = args.explain_share

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = get_tokenizer()
    width = args.hidden_size
    decoder = Decoder(
        DecoderConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=width,
            num_layers=args.layers,
            num_heads=max(2, width // 32),
            intermediate_size=3 * width,
            max_seq_len=512,
        )
    )
    cells = OracleCells(width)
    params = list(decoder.parameters()) + list(cells.parameters())
    places = args.pointer_at.split(",")
    try:
        layers = [int(k) for k in args.pointer_layer.split(",")]
    except ValueError:
        parser.error(f"--pointer-layer: expected layer numbers, got {args.pointer_layer!r}")
    layers = layers * len(places) if len(layers) == 1 else layers
    if not set(places) <= {"answer", "image"} or len(layers) != len(places):
        parser.error(f"--pointer-at {args.pointer_at} with --pointer-layer {args.pointer_layer}")
    if not all(1 <= k <= args.layers for k in layers):
        parser.error(f"--pointer-layer: expected 1 to {args.layers}, got {args.pointer_layer}")
    read: dict[int, torch.Tensor] = {}  # layer number -> its output in the last forward
    probes: dict[str, tuple[int, nn.Linear]] = {}  # place -> (layer, head)
    if args.pointer_weight > 0:  # (built only then: runs without it draw the same numbers)
        for place, layer in zip(places, layers, strict=True):
            # A's cell logits, then B's; or, at an image token: neither, A, B
            probes[place] = (layer, nn.Linear(width, 2 * GRID if place == "answer" else 3))
            params += list(probes[place][1].parameters())
        for layer in set(layers):
            decoder.layers[layer - 1].register_forward_hook(
                lambda _module, _inputs, output, layer=layer: read.__setitem__(layer, output)
            )
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    config = WorldConfig(image_size=48)
    train, val = ShapesWorld("train", 20_000, config), ShapesWorld("val", 500, config)

    rng, history, start = random.Random(args.seed), [], time.time()
    place_loss: dict[str, float] = {}  # each probe's loss at the last step that had one
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            # With --explain-share: scored on the bare yes/no, then on the explained answers.
            shares = (None,) if args.explain_share is None else (0.0, 1.0)
            acc = {}
            for share in shares:
                scored = accuracy(
                    decoder,
                    cells,
                    val,
                    tokenizer,
                    types,
                    args.val_images,
                    args.eval_questions,
                    {**options, "explain_share": share},
                )
                if share == 1.0:
                    scored = {f"explained:{k}": v for k, v in scored.items() if ":" in k}
                acc |= scored
            history.append({"step": step, "seconds": round(time.time() - start), **acc})
            probe_loss = sum(place_loss.values())  # the places' losses summed
            if place_loss:  # of the step before: the probe's loss, when it is on
                history[-1]["pointer_loss"] = round(probe_loss, 4)
                if len(place_loss) > 1:
                    history[-1] |= {f"pointer_loss:{k}": round(v, 4) for k, v in place_loss.items()}
            per_type = " ".join(f"{k} {v:.2f}" for k, v in acc.items() if k != "overall")
            if place_loss:
                per_type += f"  pointer loss {probe_loss:.3f}"
            print(f"step {step:5d}  overall {acc['overall']:.3f}  {per_type}", flush=True)
        if step == args.steps:
            break
        # Warm-up over 20 steps, then cosine down to 10% (the training loop's schedule).
        warm = min(1.0, (step + 1) / 20)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * cosine
        indices = [rng.randrange(len(train)) for _ in range(args.batch_size)]
        step_types = warm_types if step < args.warm_steps else types
        step_options = options
        if step < args.given_axis_until:
            step_options = {**options, "pair_question": "given_axis"}
        x, y, mask, _, pointers = make_batch(
            train, indices, step_types, args.questions, rng, tokenizer, decoder, cells, step_options
        )
        loss = decoder(inputs_embeds=x, attention_mask=mask, labels=y).loss
        asked_pair = pointers[:, 1] >= 0
        if probes and bool(asked_pair.any()):
            rows = asked_pair.nonzero().flatten()
            for place, (layer, head) in probes.items():
                hidden = read[layer]
                if place == "answer":
                    at = hidden[rows, pointers[rows, 0]]  # (P, C): the answering positions
                    logits = head(at).view(-1, 2, GRID)  # (P, 2, 9)
                    targets = pointers[rows, 1:3]  # (P, 2)
                else:
                    cells_at = pointers[rows, 3:4] + torch.arange(GRID)  # (P, 9): image tokens
                    logits = head(hidden[rows[:, None], cells_at])  # (P, 9, 3)
                    targets = torch.zeros(len(rows), GRID, dtype=torch.long)
                    targets[torch.arange(len(rows)), pointers[rows, 1]] = 1  # holds A
                    targets[torch.arange(len(rows)), pointers[rows, 2]] = 2  # holds B
                probe = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
                loss = loss + args.pointer_weight * probe
                place_loss[place] = probe.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "history": history,
    }
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
