"""bench/compare_runs.py: it reads what `minillava eval` writes and counts the goal's types."""

import json

import pytest
from tiny_models import load_bench_script

from minillava.eval import score


@pytest.fixture(scope="module")
def compare():
    return load_bench_script("compare_runs")


def fake_evaluation(text_blind_answer: str, blind_mode: str = "blank") -> dict:
    """An eval.json as `minillava.report.report` writes it: count questions the model gets half
    right (its shortcut "1" fails on the 2), text questions answered "nothing" by both."""
    items = [
        {"question": "q", "answer": "1", "type": "count", "op": "count", "shortcut": "1"},
        {"question": "q", "answer": "2", "type": "count", "op": "count", "shortcut": "1"},
        {"question": "q", "answer": "nothing", "type": "text", "op": "text"},
        {"question": "q", "answer": "nothing", "type": "text", "op": "text"},
    ]
    model = score(items, lambda batch: ["1" if i["type"] == "count" else "nothing" for i in batch])
    blind = score(items, lambda batch: ["3" if i["type"] == "count" else text_blind_answer
                                        for i in batch])  # fmt: skip
    blind.blind, blind.blind_mode = True, blind_mode
    return {"splits": {"test": {"model": model.to_dict(), "blind": blind.to_dict()}}}


def test_summarise_counts_only_the_types_whose_baseline_is_at_most_60_percent(compare):
    # Text's blind baseline is 100%: exempt, though its gain (0) is the smallest.
    run = compare.summarise(fake_evaluation(text_blind_answer="nothing"))
    assert run["accuracy"] == 0.75 and run["blind"] == 0.5 and run["heldout"] is None
    assert run["gain"] == {"count": 0.5, "text": 0.0}
    assert run["weakest_gain"] == ("count", 0.5)
    assert run["where_shortcut_fails"]["count"] == {"accuracy": 0.0, "took_shortcut": 1.0, "n": 1}
    # With a blind baseline of 0% on text, text counts too, at +100: count stays the weakest.
    run = compare.summarise(fake_evaluation(text_blind_answer="A"))
    assert run["weakest_gain"] == ("count", 0.5) and run["gain"]["text"] == 1.0
    with pytest.raises(ValueError, match="no model and blind results for split 'heldout'"):
        compare.summarise(fake_evaluation("A"), split="heldout")


def test_the_gains_can_be_over_the_other_blind_baseline(compare):
    evaluation = fake_evaluation(text_blind_answer="nothing")  # its blind: a grey image
    other = fake_evaluation(text_blind_answer="A", blind_mode="no_image")["splits"]["test"]
    evaluation["splits"]["test"]["blind_no_image"] = other["blind"]  # as report() keeps it
    assert compare.summarise(evaluation)["gain"]["text"] == 0.0
    assert compare.summarise(evaluation, blind_mode="blank")["gain"]["text"] == 0.0
    run = compare.summarise(evaluation, blind_mode="no_image")
    assert run["gain"]["text"] == 1.0 and run["blind_mode"] == "no_image"
    with pytest.raises(ValueError, match=r"x.json: no 'no_image' blind baseline .* \['blank'\]"):
        compare.summarise(fake_evaluation("A"), source="x.json", blind_mode="no_image")


def test_runs_are_found_by_directory_and_tabled_with_mean_and_range(compare, tmp_path, capsys):
    first, second = tmp_path / "run1", tmp_path / "run2"
    (first / "eval").mkdir(parents=True)
    (first / "eval" / "eval.json").write_text(json.dumps(fake_evaluation("nothing")))
    second.mkdir()
    (second / "eval.json").write_text(json.dumps(fake_evaluation("A", blind_mode="no_image")))
    assert compare.eval_json_path(first) == first / "eval" / "eval.json"  # a run directory
    assert compare.eval_json_path(second) == second / "eval.json"  # an evaluation directory
    with pytest.raises(FileNotFoundError, match="no eval.json there"):
        compare.eval_json_path(tmp_path / "missing")

    out = tmp_path / "runs.json"
    assert compare.main([str(first), str(second), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| run | n | test | blind | held-out | count | text | weakest gain |" in table
    assert f"| {first} | 4 | 75.0 | 50.0 |  | 50.0 | 100.0 | count +50.0 | 0.0 (n=1) |" in table
    assert "| 0.0 (no_image) |" in table  # the mode is named where it is not the default
    assert "2 runs: test accuracy mean 75.0%, range 75.0 to 75.0%" in table
    assert set(json.loads(out.read_text())["runs"]) == {str(first), str(second)}


def test_the_chat_table_gives_turns_premises_and_descriptions_with_mean_and_range(compare):
    older = compare.summarise(fake_evaluation("A"))  # an eval.json without the chat figures
    assert older["turns"] is None and older["false_premises"] is None
    runs = {}
    for name, (turn, honest, f1) in {"a": (0.8, 0.9, 0.4), "b": (0.6, 0.7, 0.5)}.items():
        evaluation = fake_evaluation("A")
        evaluation["splits"]["test"].update(
            turns={"per_turn": {"1": turn, "2": turn, "3": turn}},
            false_premises={"honest": honest},
            descriptions={"totals": {"f1": f1, "hallucination_rate": 0.05}},
        )
        runs[name] = compare.summarise(evaluation)
    table = compare.chat_table(runs)
    assert "| turn 2 | 80.0 | 60.0 | 70.0 | 60.0-80.0 |" in table
    assert "| false premises | 90.0 | 70.0 | 80.0 | 70.0-90.0 |" in table
    assert "| description F1 | 0.400 | 0.500 | 0.450 | 0.400-0.500 |" in table
    assert "turn 1" not in compare.chat_table({"old": older})  # not in the file: left out
