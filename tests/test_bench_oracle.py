"""bench/oracle_vqa.py: the relation forms it tells apart, and the questions it restricts to."""

import random

import pytest
from tiny_models import load_bench_script

from minillava.data.instruct import ask_relation
from minillava.data.shapes import ShapesWorld, WorldConfig
from minillava.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def oracle():
    return load_bench_script("oracle_vqa")


def test_every_relation_query_has_a_form(oracle):
    # The script names a relation question's form by its query's op: a new op must get one.
    world, rng = ShapesWorld("train", 300, WorldConfig(image_size=48)), random.Random(0)
    ops = {ask_relation(world.scene(i), rng, world.config).query["op"] for i in range(300)}
    assert ops == set(oracle.FORM_OF_OP)


def test_make_batch_asks_only_the_forms_and_scenes_allowed(oracle):
    tokenizer = get_tokenizer()
    decoder = oracle.Decoder(
        oracle.DecoderConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
            intermediate_size=32, max_seq_len=512,
        )
    )  # fmt: skip
    oracle_cells, scenes = oracle.OracleCells(16), []

    def cells(scene):  # the oracle tokens, and a record of the scenes they were built from
        scenes.append(scene)
        return oracle_cells(scene)

    world, rng = ShapesWorld("val", 200, WorldConfig(image_size=48)), random.Random(0)
    options = {"relation_forms": ("pair",), "objects": (2,)}
    x, y, mask, asked = oracle.make_batch(
        world, range(24), ("relation",), 1, rng, tokenizer, decoder, cells, options
    )
    assert asked == [["relation:pair"]] * 24  # scenes that cannot give one were swapped
    assert [len(scene.objects) for scene in scenes] == [2] * 24
    assert x.shape[:2] == y.shape == mask.shape and x.shape[0] == 24

    _, _, _, asked = oracle.make_batch(
        world, range(48), ("relation", "colour"), 1, rng, tokenizer, decoder, cells
    )
    kinds = {kind for row in asked for kind in row}
    assert "colour" in kinds and kinds <= {"colour", "relation:pair", "relation:any",
                                           "relation:nearest"}  # fmt: skip
