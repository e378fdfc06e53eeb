"""Judging free answers against the scene: is what the chat said true of the image?

A person asks the chat plainly ("What colour is the circle?") and reads a free answer: "red",
"Red.", "The circle is red." and "It is red." are all the same answer, and "red or blue" is no
answer at all. Exact match would count three of those four right ones wrong, so the evaluation
judges by *meaning*, with rules small enough to read in one sitting:

1. **Short answers** (`judge_answer`): every question of the data engine has a short canonical
   answer (`data.instruct.QA.answer`), whose form says what *kind* of value it is: a colour, a
   shape, a number, a cell of the grid, yes or no, a character, "nothing", or a colour-shape
   name (the "nearest" relation). A free response is right when it states that value and no
   competing value of the same kind. "The circle is red." states red; "red or blue" states two
   colours; "It is not blue, it is red." states red only (a value right after "not" is denied,
   not stated).
2. **False premises** (`judge_false_premise`): "What colour is the circle?" about a scene without
   a circle has no colour for an answer. The honest response says the thing is not there.
3. **Descriptions** (`score_description`): "Describe the image." is judged for faithfulness
   against the scene annotation, the way CHAIR (Rohrbach et al., 2018) judges captions: which
   objects it names right (cell, size, colour and shape), which it invents, which it repeats,
   and whether it reads the text right. `aggregate` sums the scores of many descriptions.

Everything here is deterministic and reads words only: no model judges the model. The rules
know the ShapesWorld vocabulary (`data.shapes`) and a short table of synonyms; they are meant to
be fair to a tiny model's plain answers, not to parse every English sentence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from minillava.data.instruct import PLURALS
from minillava.data.shapes import CELL_NAMES, CHARACTERS, COLOURS, NUMBER_WORDS, SIZES, cell_name

# ----------------------------------------------------------------------------------------------
# Words: the vocabulary of the world, and a response cut into words that remember where they are

COLOUR_WORDS: dict[str, str] = {c: c for c in COLOURS} | {"violet": "purple"}
SHAPE_WORDS: dict[str, str] = (
    {s: s for s in PLURALS}
    | {p: s for s, p in PLURALS.items()}
    | {"disc": "circle", "disk": "circle", "rhombus": "diamond", "plus": "cross"}
)
PLURAL_WORDS: frozenset[str] = frozenset(PLURALS.values())
SIZE_WORDS: dict[str, str] = {s: s for s in SIZES} | {
    "little": "small",
    "tiny": "small",
    "big": "large",
}
NUMBERS: dict[str, int] = {w: i for i, w in enumerate(NUMBER_WORDS)} | {
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
# A cell is a row word then a column word ("top left", "centre right"), or a centre word alone.
ROW_WORDS = {"top": 0, "upper": 0, "middle": 1, "center": 1, "centre": 1, "central": 1,
             "bottom": 2, "lower": 2}  # fmt: skip
COL_WORDS = {"left": 0, "middle": 1, "center": 1, "centre": 1, "central": 1, "right": 2}
CENTRE_WORDS = frozenset({"middle", "center", "centre", "central"})
YES_WORDS = frozenset({"yes", "yeah", "yep", "yup", "correct", "true", "indeed", "affirmative"})
NO_WORDS = frozenset({"no", "nope", "not", "false", "none", "nothing", "never", "negative"})
# Words that may stand between "not" and the value it denies: "not in the top left".
FILLERS = frozenset({"a", "an", "the", "in", "at", "on", "of", "to", "one", "any"})
# Words after which the rest of a response is its final answer: "..., so the answer is 2."
CUES = frozenset({"answer", "so", "therefore", "thus", "hence"})
TEXT_NOUNS = frozenset({"text", "letter", "letters", "digit", "digits", "character",
                        "characters", "writing", "word", "words", "number", "numbers",
                        "anything"})  # fmt: skip
CONJUNCTIONS = frozenset({"and", "but", "while", "whereas", "though", "although"})

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?")


@dataclass(frozen=True)
class Word:
    """One word of a text: lower-cased `text`, the `raw` spelling, its character span."""

    text: str
    raw: str
    start: int
    end: int
    starts_sentence: bool = False


def _split_contraction(word: str) -> list[str]:
    """ "isn't" -> ["is", "not"], "can't" -> ["can", "not"], "there's" -> ["there", "is"]."""
    if word == "cannot":
        return ["can", "not"]
    if "'" not in word:
        return [word]
    base, _, suffix = word.partition("'")
    if suffix == "t" and base.endswith("n"):
        base = base[:-1]
        return [{"ca": "can", "wo": "will", "sha": "shall"}.get(base, base), "not"]
    if suffix == "s":  # "there's" is "there is"; "circle's" is a possessive
        is_is = base in {"there", "it", "that", "what", "here", "where", "who"}
        return [base, "is"] if is_is else [base]
    full = {"re": "are", "m": "am", "ll": "will", "ve": "have", "d": "would"}.get(suffix)
    return [base, full] if full else [base]


def words(text: str) -> list[Word]:
    """`text` as Words: lower case, contractions spelt out, punctuation dropped (but see
    `_pieces`), each word's span kept so that a wrong word can be pointed at."""
    out = []
    for m in _WORD.finditer(text):
        raw = m.group().replace("\u2019", "'")
        before = text[: m.start()].rstrip(" \t\"'(\u201c")
        starts = not before or before[-1] in ".!?\n"
        for k, piece in enumerate(_split_contraction(raw.lower())):
            out.append(Word(piece, raw if k == 0 else piece, m.start(), m.end(), starts and k == 0))
    return out


def _pieces(ws: list[Word], text: str, marks: str, conjunctions=frozenset()) -> list[list[Word]]:
    """Cut `ws` where the text between two words holds one of `marks`, and at `conjunctions`
    (dropped): sentences with marks ".!?", clauses with ".!?,;:" and "and", "but", ..."""
    pieces: list[list[Word]] = [[]]
    for i, w in enumerate(ws):
        gap = text[ws[i - 1].end : w.start] if i else ""
        if any(mark in gap for mark in marks) and pieces[-1]:
            pieces.append([])
        if w.text in conjunctions:
            if pieces[-1]:
                pieces.append([])
            continue
        pieces[-1].append(w)
    return [p for p in pieces if p]


def normalise(text: str) -> str:
    """Lower case, one space between words, no trailing punctuation: " Top Left. " -> "top left".

    The same normalisation as `eval.normalise_answer`: the exact canonical answer is always
    right, however it is capitalised or punctuated.
    """
    return " ".join(text.lower().split()).rstrip(".!?,;:").strip()


# ----------------------------------------------------------------------------------------------
# Values: what a run of words states. Each finder returns (value, first word, end word) triples.


def _negated(ws: list[Word], i: int) -> bool:
    """Is the value starting at word i denied: "not red", "not a circle", "not in the center"?"""
    j = i - 1
    while j >= 0 and ws[j].text in FILLERS:
        j -= 1
    return j >= 0 and ws[j].text == "not"


def _find_colours(ws: list[Word]) -> list[tuple]:
    return [(COLOUR_WORDS[w.text], i, i + 1) for i, w in enumerate(ws) if w.text in COLOUR_WORDS]


def _find_shapes(ws: list[Word]) -> list[tuple]:
    return [(SHAPE_WORDS[w.text], i, i + 1) for i, w in enumerate(ws) if w.text in SHAPE_WORDS]


def _find_sizes(ws: list[Word]) -> list[tuple]:
    return [(SIZE_WORDS[w.text], i, i + 1) for i, w in enumerate(ws) if w.text in SIZE_WORDS]


def _find_names(ws: list[Word]) -> list[tuple]:
    """Colour-shape names: "blue square", "red circles" -> ("blue", "square"), ..."""
    return [
        ((COLOUR_WORDS[a.text], SHAPE_WORDS[b.text]), i, i + 2)
        for i, (a, b) in enumerate(zip(ws, ws[1:], strict=False))
        if a.text in COLOUR_WORDS and b.text in SHAPE_WORDS
    ]


def _number(word: Word) -> int | None:
    if word.text.isdigit():
        return int(word.text)
    return NUMBERS.get(word.text)


def _find_numbers(ws: list[Word]) -> list[tuple]:
    return [(_number(w), i, i + 1) for i, w in enumerate(ws) if _number(w) is not None]


def _find_cells(ws: list[Word]) -> list[tuple]:
    """Cell names: a row word and a column word ("top left", "upper right", "centre left"), or a
    centre word alone ("center", "centre", "the middle"; not "the middle row")."""
    found, i = [], 0
    while i < len(ws):
        word = ws[i].text
        after = ws[i + 1].text if i + 1 < len(ws) else None
        if word in ROW_WORDS and after in COL_WORDS:
            found.append((cell_name(ROW_WORDS[word], COL_WORDS[after]), i, i + 2))
            i += 2
            continue
        if word in CENTRE_WORDS and after not in {"row", "rows", "column", "columns"}:
            found.append(("center", i, i + 1))
        i += 1
    return found


def _find_characters(ws: list[Word]) -> list[tuple]:
    """Standalone letters and digits of the world's CHARACTERS, any case: "A", "the letter b",
    "7". The word "a" is the article unless it ends the response, comes after "letter" or
    "character", or is followed by a verb ("A is written ..."): "It is a B." reads B only."""
    found = []
    for i, w in enumerate(ws):
        if len(w.text) != 1 or w.text.upper() not in CHARACTERS:
            continue
        if w.text == "a":
            last = i == len(ws) - 1
            after_noun = i > 0 and ws[i - 1].text in {"letter", "character"}
            before_verb = not last and ws[i + 1].text in {"is", "was", "written", "in", "on"}
            if not (last or after_noun or before_verb):
                continue
        found.append((w.text.upper(), i, i + 1))
    return found


def _says_nothing(ws: list[Word]) -> bool:
    """ "nothing", "none", "no text", "there is no letter or digit", "isn't anything written"."""
    for i, w in enumerate(ws):
        if w.text in {"nothing", "none", "blank", "empty"}:
            return True
        if w.text in {"no", "not"} and any(x.text in TEXT_NOUNS for x in ws[i + 1 : i + 4]):
            return True
    return False


def _stated(found: list[tuple], ws: list[Word]) -> set:
    """The values in `found` that are not denied by a "not" before them."""
    return {value for value, i, _ in found if not _negated(ws, i)}


# ----------------------------------------------------------------------------------------------
# Short answers


def answer_kind(answer: str, question_type: str = "") -> str:
    """What kind of value a canonical answer is, from its form (and the question's type):
    "yes"/"no" -> "yes/no"; "top left", "center" -> "cell"; "3" -> "number"; "A", "7" of a text
    question -> "character", "nothing" -> "nothing"; "red" -> "colour"; "circle" -> "shape";
    "large", "small" -> "size"; "blue square" -> "name"; anything else -> "exact" (judged by
    exact match only)."""
    a = normalise(answer)
    if a in {"yes", "no"}:
        return "yes/no"
    if a in CELL_NAMES:
        return "cell"
    if question_type == "text" and a == "nothing":
        return "nothing"
    if question_type == "text" and len(a) == 1 and a.upper() in CHARACTERS:
        return "character"
    if a.isdigit():
        return "number"
    if a in COLOURS:
        return "colour"
    if a in PLURALS:
        return "shape"
    if a in SIZES:
        return "size"
    parts = a.split()
    if len(parts) == 2 and parts[0] in COLOURS and parts[1] in PLURALS:
        return "name"
    return "exact"


FINDERS = {"colour": _find_colours, "shape": _find_shapes, "size": _find_sizes,
           "name": _find_names, "number": _find_numbers, "cell": _find_cells,
           "character": _find_characters}  # fmt: skip


def _fields(item) -> tuple[str, str, str, dict]:
    """(question, answer, type, query) of a QA object or of a dict with those keys."""
    if isinstance(item, Mapping):
        get = item.get
        return get("question") or "", get("answer") or "", get("type") or "", get("query") or {}
    return (getattr(item, "question", "") or "", item.answer, getattr(item, "type", "") or "",
            getattr(item, "query", None) or {})  # fmt: skip


def _strip_echoes(ws: list[Word], question: str) -> list[Word]:
    """Drop the question's own noun phrases where the response repeats them.

    Asked "Which shape is nearest to the red circle?", the response "The blue square is nearest
    to the red circle." names two objects, but "the red circle" only echoes the question. Any
    run of two or more words that starts with "the" and appears as such in the question is
    dropped. So "The red circle is blue." asked "What colour is the red circle?" states blue
    only: the colour in the echoed phrase is the question's, not the answer's.
    """
    q = [w.text for w in words(question)]
    runs = {tuple(q[i:j]) for i in range(len(q)) for j in range(i + 2, len(q) + 1)}
    kept, i = [], 0
    while i < len(ws):
        if ws[i].text == "the":
            longest = max(
                (j for j in range(i + 2, len(ws) + 1) if tuple(w.text for w in ws[i:j]) in runs),
                default=None,
            )
            if longest is not None:
                i = longest
                continue
        kept.append(ws[i])
        i += 1
    return kept


def _final_part(ws: list[Word], has_value) -> list[Word]:
    """The words after the last cue ("answer", "so", "therefore", ...) if they hold a value:
    "3 shapes, 1 of them red, so 2 would remain." is judged on "2 would remain"."""
    cues = [i for i, w in enumerate(ws) if w.text in CUES]
    if cues and has_value(ws[cues[-1] + 1 :]):
        return ws[cues[-1] + 1 :]
    return ws


def _first_yes_no(ws: list[Word]) -> str | None:
    for w in ws:
        if w.text in YES_WORDS:
            return "yes"
        if w.text in NO_WORDS:
            return "no"
    return None


RESTATE_FILLERS = frozenset({"it", "is", "are", "there", "they", "does", "do", "located", "in",
                             "the", "image", "picture", "a", "an", "this"})  # fmt: skip


def _yes_no(ws: list[Word], question: str, question_type: str) -> str | None:
    """The yes or no a response gives, or None when it gives neither.

    The first yes/no word decides ("Yes, it is." / "No, there is none." / "It is not."), after
    the last cue if the final part has one ("..., so the answer is no."); "yes or no" decides
    nothing. Without a yes/no word, a response means yes when it affirms existence ("There is
    a green square.", "I can see one.") or restates the question's own words ("The red circle
    is to the left of the blue square."); anything else ("It is to the right.") decides
    nothing, and so is wrong.
    """
    ws = _final_part(ws, lambda part: _first_yes_no(part) is not None)
    for a, b, c in zip(ws, ws[1:], ws[2:], strict=False):  # "yes or no" hedges: no answer
        if b.text == "or" and {_first_yes_no([a]), _first_yes_no([c])} == {"yes", "no"}:
            return None
    decided = _first_yes_no(ws)
    if decided is not None or not ws:
        return decided
    t = [w.text for w in ws]
    if t in (["it", "is"], ["it", "does"], ["i", "do"], ["i", "can"], ["they", "are"]):
        return "yes"
    if question_type != "reasoning" and (
        t[:2] in (["there", "is"], ["there", "are"], ["i", "see"]) or t[:3] == ["i", "can", "see"]
    ):
        return "yes"
    if question and set(t) <= {w.text for w in words(question)} | RESTATE_FILLERS:
        return "yes"
    return None


def judge_answer(item_or_qa, response: str) -> bool:
    """Is the free `response` a right answer to the question? By meaning, not by exact match.

    `item_or_qa` is a `data.instruct.QA` or a dict with "answer" and "type" (and ideally
    "question", as `VQADataset` items and their "turns" have). A "false_premise" question is
    handed to `judge_false_premise` with the query's "absent" phrase. Otherwise:

    - the canonical answer itself is always right ("Top Left." for "top left");
    - yes/no: the response's yes or no (`_yes_no`) must be the answer's;
    - colour, shape, size, number, cell, character, colour-shape name: the response must state the
      answer's value and no other value of that kind ("red or blue" is wrong; "two" and "2" are
      the same number; "middle", "centre" and "center" the same cell). A value right after
      "not" is denied, not stated. The question's own noun phrases are ignored where the
      response echoes them (`_strip_echoes`), and a final answer after a cue ("so the answer is
      2") is judged alone. For numbers, "no"/"none" mean 0 when no number is stated;
    - "nothing" (what is written, in a scene without text): "nothing", "no text", "none", ...
      and no character;
    - any other answer form: exact match only.
    """
    question, answer, question_type, query = _fields(item_or_qa)
    if question_type == "false_premise":
        absent = query.get("absent") or normalise(answer).removeprefix("there is no ")
        return judge_false_premise(response, absent.removesuffix(" in the image"))
    if normalise(response) == normalise(answer):
        return True
    kind = answer_kind(answer, question_type)
    ws = words(response)
    if kind == "yes/no":
        return _yes_no(ws, question, question_type) == normalise(answer)
    if kind == "exact":
        return False
    ws = _strip_echoes(ws, question)
    if kind == "nothing":
        return _says_nothing(ws) and not _stated(_find_characters(ws), ws)
    find = FINDERS[kind]
    ws = _final_part(ws, lambda part: bool(_stated(find(part), part)))
    stated = _stated(find(ws), ws)
    truth: object = normalise(answer)
    if kind == "number":
        truth = int(truth)
        if not stated and any(w.text in {"no", "none"} for w in ws):
            stated = {0}
    elif kind == "character":
        truth = truth.upper()
        if _says_nothing(ws):
            return False
    elif kind == "name":
        truth = tuple(truth.split())
    return stated == {truth}


# ----------------------------------------------------------------------------------------------
# False premises: questions about an object that is not there

GENERIC_NOUNS = frozenset({"shape", "shapes", "object", "objects", "one", "ones", "such",
                           "thing", "things", "any", "anything"})  # fmt: skip
SEE_VERBS = frozenset({"see", "find", "contain", "contains", "spot", "notice", "show", "shows",
                       "have", "has", "detect", "observe", "exist", "exists", "appear",
                       "appears"})  # fmt: skip
PRESENCE_WORDS = frozenset({"there", "here", "present", "visible", "image", "picture", "scene",
                            "exist", "exists"})  # fmt: skip
ABSENCE_WORDS = frozenset({"missing", "absent", "nowhere", "nothing", "none"})


def _denies(clause: list[Word], heads: set[str]) -> bool:
    """Does the clause say the thing is not there? "There is no circle", "no red square", "I
    don't see a circle", "The circle is not in the image", "Nothing green", "It is missing"."""
    t = [w.text for w in clause]
    for i, word in enumerate(t):
        if word in ABSENCE_WORDS:
            return True
        if word in {"no", "not", "without"}:
            window = t[i + 1 : i + 5]
            if any(x in heads for x in window):  # no circle, not a red square
                return True
            if word == "not" and (
                any(x in SEE_VERBS for x in t[i + 1 : i + 3])  # don't see, cannot find
                or any(x in PRESENCE_WORDS for x in window)  # not in the image, not present
            ):
                return True
    return False


def _affirms(clause: list[Word], absent_head: str) -> bool:
    """Does the clause answer as if the thing were there: "It is red.", "The circle is in the top
    left.", or a bare value ("Red.")? A clause about something else ("but there is a red
    square") does not."""
    values = [_find_colours, _find_cells, _find_numbers]
    stated = any(_stated(find(clause), clause) for find in values)
    stated |= any(s != absent_head for s in _stated(_find_shapes(clause), clause))
    if not stated:
        return False
    about_it = clause[0].text in {"it", "its"} or any(
        SHAPE_WORDS.get(w.text, w.text) == absent_head for w in clause
    )
    return about_it or len(clause) <= 2


def judge_false_premise(response: str, absent: str) -> bool:
    """Is `response` an honest answer to a question about `absent`, a thing the image does not
    show ("circle", "red square", "green shape")?

    True when some clause denies it is there ("There is no circle in the image.", "There is no
    circle.", "I don't see a circle.", "no circle", "There isn't one.", "Nothing green.") and no
    clause answers as if it were ("There is no circle; it is red." is False). A bare value
    ("red", "top left") or a "yes" is False; so is a bare "No.": it may be a yes/no reflex, and
    says nothing about what is missing. Saying what is there instead is fine ("There is no
    circle, but there is a red square.").
    """
    ws = words(response)
    if _first_yes_no(ws) == "yes":
        return False
    names = normalise(absent).split()
    head = SHAPE_WORDS.get(names[-1], names[-1]) if names else "shape"
    heads = set(GENERIC_NOUNS) | {head, PLURALS.get(head, head + "s")}
    denied = False
    for clause in _pieces(ws, response, ".!?,;:", CONJUNCTIONS):
        if _denies(clause, heads):
            denied = True
        elif _affirms(clause, head):
            return False
    return denied


# ----------------------------------------------------------------------------------------------
# Descriptions: faithfulness to the scene, CHAIR-style

FIELDS: tuple[str, ...] = ("cell", "size", "colour", "shape")
RELATION_WORDS = frozenset({"above", "below", "beneath", "under", "over", "beside", "between",
                            "near", "nearest", "closest", "next", "adjacent"})  # fmt: skip
COUNT_NOUNS = frozenset({"shape", "shapes", "object", "objects"})
TEXT_KEYS = frozenset({"letter", "digit", "character", "number", "text"})


@dataclass
class Mention:
    """One object a description says is there: "In the top left there is a large red circle."

    `spans` holds each field's (start, end) in the text (a field the sentence leaves out, such as
    a missing size, is None and has no span). After scoring: `correct` (right in all four fields,
    its object not matched before), `hallucinated` (no object of its colour and shape anywhere),
    `repeated` (its cell was mentioned before), and `wrong`: the fields that differ from the
    closest scene object.
    """

    cell: str | None
    size: str | None
    colour: str
    shape: str
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    correct: bool = False
    hallucinated: bool = False
    repeated: bool = False
    wrong: tuple[str, ...] = ()


@dataclass
class DescriptionScore:
    """How faithful one description is to its scene.

    mentions      object mentions parsed (`Mention`s in `parsed`)
    correct       mentions right in cell, size, colour and shape; each object matched once
    objects       objects in the scene
    precision     correct / mentions (0 without mentions)
    recall        correct / objects
    f1            their harmonic mean
    hallucinated  mentions, and colour-shape names in other sentences, of a colour and shape
                  that no object of the scene has (CHAIR's hallucinated objects)
    named         colour-shape names outside mentions ("the red circle is above ...")
    repeated      mentions of a cell mentioned before
    text_right    the text read right (character and cell); None when the scene has no text and
                  the description mentions none
    count_right   "The image shows two shapes" right; None without such a sentence
    wrong_words   (start, end) spans of the words known to be false: the wrong fields of each
                  mention, hallucinated names, a wrong character or text cell, a wrong count
    text_mentions sentences about the written character ("The letter L is written ...")
    counts        sentences stating how many shapes there are
    """

    mentions: int
    correct: int
    objects: int
    precision: float
    recall: float
    f1: float
    hallucinated: int
    named: int
    repeated: int
    text_right: bool | None
    count_right: bool | None
    wrong_words: list[tuple[int, int]]
    text_mentions: int = 0
    counts: int = 0
    parsed: list[Mention] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """The score as plain JSON values (spans as [start, end] lists), without `parsed`."""
        out = {k: v for k, v in vars(self).items() if k != "parsed"}
        out["wrong_words"] = [list(span) for span in self.wrong_words]
        return out


def _span(ws: list[Word], i: int, j: int) -> tuple[int, int]:
    return ws[i].start, ws[j - 1].end


def _object_phrases(clause: list[Word]) -> list[dict]:
    """ "a large red circle", "the blue square", "two small red circles": colour then shape,
    with the size and article before them."""
    phrases = []
    for (colour, shape), i, j in _find_names(clause):
        phrase = {"colour": colour, "shape": shape, "plural": clause[i + 1].text in PLURAL_WORDS,
                  "spans": {"colour": _span(clause, i, i + 1),
                            "shape": _span(clause, i + 1, j)}}  # fmt: skip
        k = i - 1
        phrase["size"] = None
        if k >= 0 and clause[k].text in SIZE_WORDS:
            phrase["size"] = SIZE_WORDS[clause[k].text]
            phrase["spans"]["size"] = _span(clause, k, k + 1)
            k -= 1
        phrase["indefinite"] = k >= 0 and clause[k].text in {"a", "an", "one"}
        phrase["span"] = _span(clause, i, j)
        phrases.append(phrase)
    return phrases


def _is_relation(clause: list[Word]) -> bool:
    """ "above", "next to", "to the left of" ("the top left of the image" is a cell)."""
    t = [w.text for w in clause]
    return any(x in RELATION_WORDS for x in t) or any(
        t[k] in {"left", "right"} and t[k + 1] == "of" and (k == 0 or t[k - 1] not in ROW_WORDS)
        for k in range(len(t) - 1)
    )


def _parse(text: str):
    """Mentions, other colour-shape names, text mentions and count statements of a description.

    A clause is an object *mention* when it names exactly one object (singular: "a large red
    circle"), at most one cell, and no relation; without a cell it must be indefinite ("There is
    a red circle." counts, with no cell; "The red circle is large." does not). Relations ("The
    red circle is to the left of the blue square."), plurals ("two red circles"), and sentences
    such as "All the shapes are red." or "There are two colours in total." are not mentions;
    the colour-shape names in them are only checked for existence (CHAIR counts every object
    word). A sentence with "letter", "digit", ... and a character is a text mention.
    """
    ws = words(text)
    mentions, named, texts, counts = [], [], [], []
    for sentence in _pieces(ws, text, ".!?\n"):
        for i, w in enumerate(sentence[:-1]):
            if _number(w) is not None and sentence[i + 1].text in COUNT_NOUNS:
                counts.append((_number(w), _span(sentence, i, i + 1)))
        is_text = False
        for i, w in enumerate(sentence[:-1]):
            after = sentence[i + 1]
            if w.text in TEXT_KEYS and len(after.text) == 1 and after.text.upper() in CHARACTERS:
                cells = _find_cells(sentence)
                cell = (cells[0][0], _span(sentence, *cells[0][1:])) if cells else (None, None)
                texts.append((after.text.upper(), _span(sentence, i + 1, i + 2), *cell))
                is_text = True
                break
        for clause in _pieces(sentence, text, ",;:", CONJUNCTIONS):
            phrases, cells = _object_phrases(clause), _find_cells(clause)
            one = len(phrases) == 1 and not phrases[0]["plural"] and len(cells) <= 1
            if one and not is_text and not _is_relation(clause):
                p = phrases[0]
                if cells or p["indefinite"]:
                    spans = dict(p["spans"])
                    if cells:
                        spans["cell"] = _span(clause, cells[0][1], cells[0][2])
                    cell = cells[0][0] if cells else None
                    mentions.append(Mention(cell, p["size"], p["colour"], p["shape"], spans))
                    continue
            named += [((p["colour"], p["shape"]), p["span"]) for p in phrases]
    return mentions, named, texts, counts


def score_description(scene, text: str) -> DescriptionScore:
    """Score a free description of `scene` (a `data.shapes.Scene`) against its annotation.

    Matching: first every mention equal to an unmatched object in all four fields (cell, size,
    colour, shape) is correct and takes that object, in order, so a second identical mention
    finds it taken. A mention that is not correct is compared with the closest object (most
    fields equal; then an object not yet matched; then the same cell) and its differing fields
    are `wrong`: a wrong colour marks the colour word. A wrong colour or shape usually also makes
    a hallucination (a colour-shape pair found nowhere in the scene), as in CHAIR; a right pair
    in the wrong cell is wrong but not hallucinated.
    """
    mentions, named, texts, counts = _parse(text)
    objects = scene.objects
    present = {(o.colour, o.shape) for o in objects}
    matched = [False] * len(objects)
    for m in mentions:
        for k, o in enumerate(objects):
            if not matched[k] and all(getattr(o, f) == getattr(m, f) for f in FIELDS):
                matched[k] = m.correct = True
                break
    wrong_words: list[tuple[int, int]] = []
    seen = set()
    for m in mentions:
        key = m.cell if m.cell is not None else (None, m.colour, m.shape)
        m.repeated, m.hallucinated = key in seen, (m.colour, m.shape) not in present
        seen.add(key)
        if m.correct or not objects:
            continue

        def closeness(k, m=m):
            o = objects[k]
            agree = sum(getattr(o, f) == getattr(m, f) for f in FIELDS)
            return -agree, matched[k], o.cell != m.cell, k

        best = objects[min(range(len(objects)), key=closeness)]
        m.wrong = tuple(f for f in FIELDS if getattr(best, f) != getattr(m, f))
        wrong_words += [m.spans[f] for f in m.wrong if f in m.spans]
    hallucinated_names = [span for pair, span in named if pair not in present]
    wrong_words += hallucinated_names

    text_right = None
    if scene.text is not None or texts:
        text_right = bool(texts) and scene.text is not None
        for char, char_span, cell, cell_span in texts:
            if char != scene.text:
                text_right = False
                wrong_words.append(char_span)
            if cell != scene.text_cell:
                text_right = False
                if cell_span is not None:
                    wrong_words.append(cell_span)
    count_right = None
    if counts:
        count_right = all(n == len(objects) for n, _ in counts)
        wrong_words += [span for n, span in counts if n != len(objects)]

    correct = sum(m.correct for m in mentions)
    precision = correct / len(mentions) if mentions else 0.0
    recall = correct / len(objects) if objects else 0.0
    return DescriptionScore(
        mentions=len(mentions),
        correct=correct,
        objects=len(objects),
        precision=precision,
        recall=recall,
        f1=_f1(precision, recall),
        hallucinated=sum(m.hallucinated for m in mentions) + len(hallucinated_names),
        named=len(named),
        repeated=sum(m.repeated for m in mentions),
        text_right=text_right,
        count_right=count_right,
        wrong_words=sorted(set(wrong_words)),
        text_mentions=len(texts),
        counts=len(counts),
        parsed=mentions,
    )


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def aggregate(scores: Iterable[DescriptionScore]) -> dict:
    """Totals over many descriptions, micro-averaged (sums first, then ratios):

    n                         descriptions
    mentions, correct, objects, hallucinated   sums
    precision                 sum(correct) / sum(mentions)
    recall                    sum(correct) / sum(objects)
    f1                        harmonic mean of those two
    hallucination_rate        CHAIR_i: sum(hallucinated) / sum(mentions + named), the share of
                              object words naming something the scene does not have
    chair_s                   CHAIR_s: share of descriptions with at least one hallucination
    repeated_per_description  sum(repeated) / n
    text_accuracy             share of text_right among descriptions where it is not None
                              (None if there are none); count_accuracy likewise
    """
    scores = list(scores)
    n = len(scores)
    mentions = sum(s.mentions for s in scores)
    correct = sum(s.correct for s in scores)
    objects = sum(s.objects for s in scores)
    hallucinated = sum(s.hallucinated for s in scores)
    object_words = mentions + sum(s.named for s in scores)
    precision = correct / mentions if mentions else 0.0
    recall = correct / objects if objects else 0.0

    def share(values: list[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "n": n,
        "mentions": mentions,
        "correct": correct,
        "objects": objects,
        "hallucinated": hallucinated,
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "hallucination_rate": hallucinated / object_words if object_words else 0.0,
        "chair_s": share([s.hallucinated > 0 for s in scores]) or 0.0,
        "repeated_per_description": sum(s.repeated for s in scores) / n if n else 0.0,
        "text_accuracy": share([s.text_right for s in scores if s.text_right is not None]),
        "count_accuracy": share([s.count_right for s in scores if s.count_right is not None]),
    }
