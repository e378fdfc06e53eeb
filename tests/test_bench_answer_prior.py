"""bench/answer_prior.py: the best blind guess, a table of answer counts by question."""

import json
from collections import Counter

import pytest
from tiny_models import load_bench_script

from minillava.eval import score


@pytest.fixture(scope="module")
def prior_script():
    return load_bench_script("answer_prior")


def test_question_form_masks_the_names_and_keeps_the_form(prior_script):
    form = prior_script.question_form
    assert (
        form("Is the blue square to the left of the small yellow circle?")
        == "Is the <colour> <shape> to the left of the <size> <colour> <shape>?"
    )
    assert form("How many crosses are there?") == "How many <shapes> are there?"
    # Cells, relation words and numbers are the form, not a name.
    assert form("What is in the top left?") == "What is in the top left?"
    # A name inside another word is not masked ("redo" is not "red").
    assert form("Can you redo it?") == "Can you redo it?"


def test_answer_uses_the_question_when_seen_often_enough_else_its_form(prior_script):
    prior = prior_script.AnswerPrior(min_count=3)
    for answer in ("yes", "yes", "yes"):
        prior.add("Is there a red circle?", answer)
    for answer in ("no", "no", "no", "no"):
        prior.add("Is there a blue circle?", answer)
    assert prior.answer("Is there a red circle?") == "yes"  # seen 3 times: its own answers
    # Seen once ("yes"): below min_count, so its form's answers decide (4 "no" of 8).
    prior.add("Is there a green circle?", "Yes.")  # answers are normalised like the eval's
    assert prior.by_question["Is there a green circle?"] == Counter({"yes": 1})
    assert prior.answer("Is there a green circle?") == "yes"  # form: 4 yes, 4 no: first seen
    prior.add("Is there a purple circle?", "no")
    assert prior.answer("Is there a green circle?") == "no"  # form: 4 yes, 5 no
    assert prior.answer("Is there a yellow circle?") == "no"  # never seen: by its form
    assert prior.answer("What is written in the image?") == ""  # neither seen


def test_fit_prior_is_at_least_the_best_constant_answer_on_what_it_counted(prior_script):
    # Answering each question by its own majority can never do worse, on the questions it
    # was counted on, than one answer for a whole type: a check that could fail if the
    # table were keyed or looked up wrongly.
    items = prior_script.question_items("train", 400)
    prior = prior_script.fit_prior(400, min_count=1)
    result = prior_script.score_prior(prior, items, "train")
    for kind, accuracy in result.per_type.items():
        answers = Counter(item["answer"] for item in items if item["type"] == kind)
        constant = answers.most_common(1)[0][1] / sum(answers.values())
        assert accuracy >= constant, kind
    assert result.blind and result.blind_mode == "answer prior"
    # On questions it did not count, colour and shape are not guessable from the question.
    unseen = prior_script.score_prior(prior_script.fit_prior(2000), prior_script.question_items())
    assert unseen.per_type["colour"] < 0.5 and unseen.per_type["shape"] < 0.5
    with pytest.raises(ValueError, match="n must be >= 1"):
        prior_script.fit_prior(0)


def test_question_items_are_the_evaluations_questions(prior_script):
    from minillava.eval import vqa_items

    ours = prior_script.question_items("test", 16)
    theirs = vqa_items("test", 16, image_size=48)
    for a, b in zip(ours, theirs, strict=True):
        assert (a["question"], a["answer"], a["type"], a["op"]) == (
            b["question"], b["answer"], b["type"], b["op"]
        )  # fmt: skip


def fake_eval_json(tmp_path):
    """An eval.json whose model is right on everything and whose blind baseline answers "no"."""
    items = [
        {"question": "Is there a red circle?", "answer": "no", "type": "existence",
         "op": "exists"},
        {"question": "Is there a blue circle?", "answer": "yes", "type": "existence",
         "op": "exists"},
        {"question": "What colour is the circle?", "answer": "red", "type": "colour",
         "op": "colour_of"},
    ]  # fmt: skip
    model = score(items, lambda batch: [item["answer"] for item in batch])
    blind = score(items, lambda batch: ["no" for _ in batch])
    blind.blind, blind.blind_mode = True, "blank"
    evaluation = {"splits": {"test": {"model": model.to_dict(), "blind": blind.to_dict()}}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(evaluation))
    return path, items


def test_the_prior_is_scored_on_the_questions_of_an_eval_json(prior_script, tmp_path):
    path, items = fake_eval_json(tmp_path)
    read, figures = prior_script.items_of_eval(path)
    assert [item["question"] for item in read] == [item["question"] for item in items]
    assert figures["model"]["accuracy"] == 1.0
    prior = prior_script.AnswerPrior(min_count=1)
    prior.add("Is there a red circle?", "no")
    prior.add("Is there a blue circle?", "no")
    prior.add("What colour is the circle?", "blue")
    result = prior_script.score_prior(prior, read)
    assert result.per_type == {"colour": 0.0, "existence": 0.5}
    table = prior_script.comparison_table(result, figures)
    existence = next(line for line in table.splitlines() if line.startswith("| existence"))
    # model 100%, blind 50% (+50), prior 50% (+50), and a prior of 50% counts for the goal.
    assert existence.split(" | ")[2:] == ["100.0%", "50.0%", "+50.0", "50.0%", "+50.0", "counts |"]
    with pytest.raises(ValueError, match="no model records for split 'heldout'"):
        prior_script.items_of_eval(path, "heldout")


def test_main_writes_the_prior_for_an_eval_json(prior_script, tmp_path, capsys):
    path, _ = fake_eval_json(tmp_path)
    out = tmp_path / "prior.json"
    assert prior_script.main(["--train", "200", "--eval", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the 3 of" in printed and "gain over prior" in printed
    record = json.loads(out.read_text())
    assert record["prior"]["n"] == 3 and set(record["prior"]["per_type"]) == {"colour", "existence"}
    assert record["command"].startswith("python bench/answer_prior.py --train 200")
    # Without --eval: the split's own first questions.
    assert prior_script.main(["--train", "200", "--n", "16"]) == 0
    assert "(16 questions" in capsys.readouterr().out
