"""Batch collation for instruction tuning (conversations + images) and LM pretraining (text)."""

import pytest
import torch

from minillava.data.collate import IGNORE_INDEX, collate_conversations, collate_text
from minillava.tokenizer import EOT, get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("shapesworld")


def conversation(question: str, *answers: str, image: bool = True) -> list[dict]:
    turns = []
    for i, answer in enumerate(answers):
        prefix = "<image>\n" if (image and i == 0) else ""
        turns += [
            {"from": "human", "value": prefix + question},
            {"from": "gpt", "value": answer},
        ]
    return turns


def image(value: float) -> torch.Tensor:
    return torch.full((3, 8, 8), value)


@pytest.fixture
def samples():
    return [
        {"pixel_values": image(0.0), "conversations": conversation("What colour?", "Red.")},
        {
            "pixel_values": None,
            "conversations": conversation(
                "How many shapes are there?", "There are two shapes.", "A circle.", image=False
            ),
        },
        {"pixel_values": image(2.0), "conversations": conversation("Shape?", "A square.")},
    ]


def rows_of(tok, samples):
    return [tok.render(s["conversations"]) for s in samples]


@pytest.mark.parametrize("side", ["right", "left"])
def test_conversation_batch_shapes_padding_and_labels(tok, samples, side):
    batch = collate_conversations(samples, tok, padding_side=side)
    rendered = rows_of(tok, samples)
    lengths = [len(ids) for ids, _ in rendered]
    B, T = len(samples), max(lengths)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (B, T) and batch[key].dtype == torch.long, key
    for b, (ids, mask) in enumerate(rendered):
        n, pad = lengths[b], T - lengths[b]
        real = slice(0, n) if side == "right" else slice(pad, T)
        padding = slice(n, T) if side == "right" else slice(0, pad)
        assert batch["input_ids"][b, real].tolist() == ids
        assert (batch["input_ids"][b, padding] == tok.pad_id).all()
        assert batch["attention_mask"][b, real].eq(1).all()
        assert batch["attention_mask"][b, padding].eq(0).all()
        labels = batch["labels"][b, real].tolist()
        assert labels == [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask, strict=True)]
        assert (batch["labels"][b, padding] == IGNORE_INDEX).all()
        # the trained-on tokens decode to the answers, nothing else
        answers = [t["value"] + EOT for t in samples[b]["conversations"] if t["from"] == "gpt"]
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "".join(answers)
    assert pad_is_on_the(side, batch["attention_mask"])


def pad_is_on_the(side: str, attention_mask: torch.Tensor) -> bool:
    shortest = attention_mask.sum(1).argmin()
    column = 0 if side == "left" else -1
    return attention_mask[shortest, column].item() == 0


def test_pixel_values_stacked_in_order_of_samples_with_images(tok, samples):
    batch = collate_conversations(samples, tok)
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 2.0]
    no_images = [dict(s, pixel_values=None) for s in samples[1:2]]
    assert collate_conversations(no_images, tok)["pixel_values"] is None


def test_image_token_count_mismatch_names_the_sample(tok, samples):
    samples[2]["pixel_values"] = None  # conversation still has <image>
    with pytest.raises(ValueError, match=r"sample 2: .*1 <image> token\(s\) but 0 image"):
        collate_conversations(samples, tok)
    samples[2]["pixel_values"] = image(1.0)
    samples[1]["pixel_values"] = image(1.0)  # image without an <image> token
    with pytest.raises(ValueError, match=r"sample 1: .*0 <image> token\(s\) but 1 image"):
        collate_conversations(samples, tok)


def test_two_images_in_one_sample(tok):
    turns = [
        {"from": "human", "value": "<image>\n<image>\nSame colour?"},
        {"from": "gpt", "value": "Yes."},
    ]
    batch = collate_conversations(
        [{"pixel_values": torch.stack([image(1.0), image(3.0)]), "conversations": turns}], tok
    )
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0]


def test_truncation_keeps_the_beginning(tok, samples):
    full = collate_conversations(samples, tok)
    rendered = rows_of(tok, samples)
    # cut just after the question of the first sample: its answer is lost, its image kept
    max_len = rendered[0][0].index(tok.assistant_id) + 1
    assert max_len < max(len(ids) for ids, _ in rendered)
    cut = collate_conversations(samples, tok, max_len=max_len)
    assert cut["input_ids"].shape[1] == max_len
    for b, (ids, _) in enumerate(rendered):
        n = min(len(ids), max_len)
        assert cut["input_ids"][b, :n].tolist() == full["input_ids"][b, :n].tolist()
        assert cut["labels"][b, :n].tolist() == full["labels"][b, :n].tolist()
    assert (cut["labels"][0] == IGNORE_INDEX).all()  # nothing left to train on in sample 0


def test_truncation_that_would_drop_an_image_token_is_an_error(tok, samples):
    image_position = rows_of(tok, samples)[0][0].index(tok.image_id)
    with pytest.raises(ValueError, match="sample 0: truncating to max_len"):
        collate_conversations(samples, tok, max_len=image_position)


def test_bad_arguments(tok, samples):
    with pytest.raises(ValueError, match="padding_side"):
        collate_conversations(samples, tok, padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        collate_conversations([], tok)
    with pytest.raises(ValueError, match="sample 0 has no 'conversations'"):
        collate_conversations([{"pixel_values": None}], tok)
    samples[2]["pixel_values"] = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        collate_conversations(samples, tok)
    samples[2]["pixel_values"] = torch.zeros(8, 8)
    with pytest.raises(ValueError, match=r"sample 2: 'pixel_values' must be a tensor \(3, H, W\)"):
        collate_conversations(samples, tok)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_text(tok, side):
    texts = ["A red circle.", "There are two shapes: a blue square and a green triangle.", ""]
    batch = collate_text(texts, tok, max_len=None, padding_side=side)
    rows = [tok.encode(t) + [tok.eot_id] for t in texts]
    T = max(len(r) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, T)
    for b, row in enumerate(rows):
        real = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
        assert batch["input_ids"][b, real].tolist() == row
        assert batch["labels"][b, real].tolist() == row  # every real token is a target
        assert batch["attention_mask"][b].sum() == len(row)
    is_pad = batch["attention_mask"] == 0
    assert (batch["labels"][is_pad] == IGNORE_INDEX).all()
    assert (batch["input_ids"][is_pad] == tok.pad_id).all()


def test_collate_text_truncates(tok):
    batch = collate_text(["a red circle " * 50, "x"], tok, max_len=16)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == tok.encode("a red circle " * 50)[:16]
    with pytest.raises(ValueError, match="text 1 must be a str"):
        collate_text(["ok", None], tok, max_len=8)
