"""bench/probe_text.py: the tokens it probes are the text cell's, and its probes can tell."""

import dataclasses

import pytest
import torch
from tiny_models import load_bench_script, tiny_llava_config

from minillava.data.shapes import ShapesWorld, WorldConfig
from minillava.llava import Llava
from minillava.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def probe():
    return load_bench_script("probe_text")


def grid_llava(image_size: int, patch_size: int) -> Llava:
    config = tiny_llava_config(get_tokenizer())
    vision = dataclasses.replace(config.vision, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(0)
    return Llava(dataclasses.replace(config, vision=vision, vision_feature_layer=0)).eval()


def test_text_cell_tokens_are_the_tokens_of_the_cell_that_shows_the_character(probe):
    model = grid_llava(48, 16)  # 3 x 3 patches: one a cell
    world = ShapesWorld("train", 200, WorldConfig(image_size=48, text_prob=0.5))
    features, tokens, labels = probe.text_cell_tokens(model, world, n=5, batch=2)
    assert features.shape == (5, 32) and tokens.shape == (5, 32) and labels.shape == (5,)
    shown = [i for i in range(len(world)) if world.scene(i).text is not None][:5]
    chars = world.config.characters
    assert labels.tolist() == [chars.index(world.scene(i).text) for i in shown]
    first = world.scene(shown[0])
    cell = first.text_row * 3 + first.text_col
    with torch.no_grad():
        patch = model.vision_tower.patch_features(world[shown[0]].pixel_values[None], layer=0)
        assert torch.allclose(features[0], patch[0, cell])
        assert torch.allclose(tokens[0], model.projector(patch)[0, cell])
    with pytest.raises(ValueError, match="3x3 image tokens"):
        probe.text_cell_tokens(grid_llava(16, 8), world, n=1)  # 2 x 2 patches


def test_fit_probe_reads_what_the_features_say_and_nothing_else(probe):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=generator)
    centres = torch.randn(4, 8, generator=generator) * 3
    x = centres[labels] + torch.randn(600, 8, generator=generator)
    readable = probe.fit_probe(x[:500], labels[:500], x[500:], labels[500:], 4, steps=300)
    assert readable > 0.9
    shuffled = labels[torch.randperm(600, generator=generator)]  # labels the features never saw
    unreadable = probe.fit_probe(x[:500], shuffled[:500], x[500:], shuffled[500:], 4, steps=300)
    assert unreadable < 0.5


def test_reading_items_ask_to_read_the_character_each_image_shows(probe):
    world = ShapesWorld("test", 300, WorldConfig(image_size=48, text_prob=0.5))
    items = probe.reading_items(world, n=6)
    shown = [i for i in range(len(world)) if world.scene(i).text is not None][:6]
    assert [item["answer"] for item in items] == [world.scene(i).text for i in shown]
    assert all(torch.equal(item["pixel_values"], world[i].pixel_values)
               for item, i in zip(items, shown, strict=True))  # fmt: skip
    assert all("where" not in item["question"].lower() for item in items)
    with pytest.raises(ValueError, match="show a character"):
        probe.reading_items(ShapesWorld("test", 4, WorldConfig(text_prob=0.0)), n=1)


def test_read_characters_scores_the_answers_and_names_the_misreads(probe, monkeypatch):
    items = [{"question": "q", "answer": a, "pixel_values": None} for a in ("A", "B", "B", "7")]
    said = iter(["A", "8", "8", "7"])
    monkeypatch.setattr(
        probe, "model_answerer", lambda model, tokenizer: lambda part: [next(said) for _ in part]
    )
    reading = probe.read_characters(None, None, items, batch=3)
    assert reading["n"] == 4 and reading["accuracy"] == 0.5
    assert reading["misreads"] == [["b", "8", 2]]


def test_main_reads_without_probes_and_writes_the_figures(probe, tmp_path, capsys):
    import json

    from minillava.checkpoint import save_checkpoint

    model = grid_llava(48, 16)
    world = dataclasses.asdict(WorldConfig(image_size=48, text_prob=0.5))
    save_checkpoint(tmp_path / "llava.pt", model=model, step=1,
                    config={"tokenizer": "shapesworld", "world": world},
                    model_config=dataclasses.asdict(model.config))  # fmt: skip
    out = tmp_path / "probe.json"
    args = ["--checkpoint", str(tmp_path / "llava.pt"), "--read", "4", "--train", "0", "--val", "0"]
    assert probe.main(args + ["--threads", "1", "--out", str(out)]) == 0
    assert "the model reads" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["val_accuracy"] == {} and record["model_reads_test"]["n"] == 4
    with pytest.raises(SystemExit):  # probes need both sets
        probe.main(["--checkpoint", str(tmp_path / "llava.pt"), "--train", "0"])
