"""bench/probe_pair.py: it asks pair questions, and scores the bare and the explained answers."""

import dataclasses
import json

import pytest
import torch
from tiny_models import load_bench_script, tiny_llava_config

from minillava.data.instruct import VQADataset
from minillava.data.shapes import WorldConfig
from minillava.llava import Llava
from minillava.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def probe():
    return load_bench_script("probe_pair")


def test_pair_items_are_the_pair_questions_in_order_with_their_working(probe):
    dataset = VQADataset("test", 60, WorldConfig(image_size=32), types=("relation",))
    items = probe.pair_items(dataset, 5)
    pairs = [i for i in range(60) if dataset.qa(i)[1].query["op"] == "relation"][:5]
    assert [item["index"] for item in items] == pairs
    for item in items:
        qa = dataset.qa(item["index"])[1]
        assert (item["question"], item["answer"], item["working"]) == (
            qa.question, qa.answer, qa.explanation)  # fmt: skip
        assert " is " in item["working"] and item["answer"] in ("yes", "no")
    with pytest.raises(ValueError, match="pair questions in 60 scenes"):
        probe.pair_items(dataset, 60)  # not every relation question is a pair question


def test_score_pairs_reads_the_yes_no_after_the_working(probe):
    items = [{"answer": "no", "working": "the square is bottom, the cross is middle"},
             {"answer": "yes", "working": "the circle is left, the cross is right"}]  # fmt: skip
    bare = ["No", "no"]
    explained = [
        "the square is bottom, the cross is middle, so no",  # both right
        "the circle is right, the cross is right, so yes",  # the wrong working, the right yes/no
    ]
    figures = probe.score_pairs(items, bare, explained)
    assert figures == {"n": 2, "yes_share": 0.5, "bare": 0.5, "working": 0.5, "final": 1.0}
    # An answer in the reasoning form has no ", so ": all of it is read, and it is not a yes/no.
    reasoning = ["There are 0 crosses. So the answer is no.", "yes"]
    assert probe.score_pairs(items, bare, reasoning)["final"] == 0.5


def test_main_asks_both_ways_and_writes_the_figures(probe, tmp_path, capsys):
    from minillava.checkpoint import save_checkpoint

    config = tiny_llava_config(get_tokenizer())
    torch.manual_seed(0)
    model = Llava(config).eval()
    world = dataclasses.asdict(WorldConfig(image_size=config.vision.image_size))
    save_checkpoint(tmp_path / "llava.pt", model=model, step=1,
                    config={"tokenizer": "shapesworld", "world": world},
                    model_config=dataclasses.asdict(model.config))  # fmt: skip
    out = tmp_path / "pair.json"
    args = ["--checkpoint", str(tmp_path / "llava.pt"), "--n", "3", "--threads", "1"]
    assert probe.main(args + ["--out", str(out)]) == 0
    assert "3 test pair questions" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["n"] == 3 and 0.0 <= record["final"] <= 1.0
    with pytest.raises(SystemExit):
        probe.main(["--checkpoint", str(tmp_path / "llava.pt"), "--n", "0"])
