"""Chapter 8: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.llava) agrees with solutions/ch08_llava.py, so the chapter, the
notebook and the reference cannot drift apart.
"""

import torch

from minillava.data.collate import collate_conversations
from minillava.decoder import DecoderConfig
from minillava.llava import Llava, LlavaConfig, splice_image_tokens
from minillava.tokenizer import get_tokenizer
from minillava.vit import ViTConfig
from solutions import ch08_llava as solution

# --- splice_image ---------------------------------------------------------------------------


def _pos(ids, image_token_id):
    return int((ids == image_token_id).nonzero())


def inserted_after_placeholder(input_ids, token_embeds, image_features, image_token_id):
    pos = _pos(input_ids, image_token_id)
    return torch.cat([token_embeds[: pos + 1], image_features, token_embeds[pos + 1 :]])


def off_by_one(input_ids, token_embeds, image_features, image_token_id):
    pos = _pos(input_ids, image_token_id)
    return torch.cat([token_embeds[: pos + 1], image_features, token_embeds[pos + 2 :]])


def image_at_end(input_ids, token_embeds, image_features, image_token_id):
    pos = _pos(input_ids, image_token_id)
    return torch.cat([token_embeds[:pos], token_embeds[pos + 1 :], image_features])


def detached(input_ids, token_embeds, image_features, image_token_id):
    return solution.splice_image(
        input_ids, token_embeds.detach(), image_features.detach(), image_token_id
    )


def image_detached(input_ids, token_embeds, image_features, image_token_id):
    # Still requires grad through the text embeddings: only the gradient check can tell.
    return solution.splice_image(input_ids, token_embeds, image_features.detach(), image_token_id)


def test_splice_image_rejects(rejects):
    rejects(
        "ch08.splice_image",
        inserted_after_placeholder,
        mentions=["placeholder is still in the sequence"],
        hint_mentions=["REPLACE the placeholder"],
    )
    rejects(
        "ch08.splice_image",
        off_by_one,
        mentions=["off by one", "kept the placeholder's row"],
        hint_mentions=["starts just after it"],
    )
    rejects("ch08.splice_image", image_at_end, mentions=["not at the end"])
    rejects(
        "ch08.splice_image",
        detached,
        mentions=["does not require grad", "cut from the autograd graph"],
        hint_mentions=["no detaching"],
    )
    rejects(
        "ch08.splice_image",
        image_detached,
        mentions=["no gradient reaches the image"],
        hint_mentions=["image features tensor itself"],
    )


# --- build_labels ---------------------------------------------------------------------------


def forgets_image_positions(input_ids, answer_mask, image_token_id, num_image_tokens, ignore=-100):
    labels = []
    for token, keep in zip(input_ids.tolist(), answer_mask.tolist(), strict=True):
        if token == image_token_id:
            labels += [token] * num_image_tokens
        else:
            labels.append(token if keep else ignore)
    return torch.tensor(labels)


def one_label_per_token(input_ids, answer_mask, image_token_id, num_image_tokens, ignore=-100):
    return torch.where(answer_mask, input_ids, torch.full_like(input_ids, ignore))


def ignores_answer_mask(input_ids, answer_mask, image_token_id, num_image_tokens, ignore=-100):
    everything = torch.ones_like(answer_mask)
    return solution.build_labels(input_ids, everything, image_token_id, num_image_tokens, ignore)


def only_first_image(input_ids, answer_mask, image_token_id, num_image_tokens, ignore=-100):
    labels, seen = [], False
    for token, keep in zip(input_ids.tolist(), answer_mask.tolist(), strict=True):
        if token == image_token_id and not seen:
            labels += [ignore] * num_image_tokens
            seen = True
        else:
            labels.append(token if keep and token != image_token_id else ignore)
    return torch.tensor(labels)


def drops_the_last_answers_first_token(input_ids, answer_mask, image_token_id, num_image_tokens):
    labels = solution.build_labels(input_ids, answer_mask, image_token_id, num_image_tokens)
    if len(labels) > 10:  # the two-image case only: its 19 labels used to be shown cut at 6
        labels = labels.clone()
        labels[-3] = -100
    return labels


def test_build_labels_rejects(rejects):
    rejects(
        "ch08.build_labels",
        forgets_image_positions,
        mentions=["forgot to mask the image positions"],
        hint_mentions=["P times -100"],
    )
    rejects(
        "ch08.build_labels",
        one_label_per_token,
        mentions=["SPLICED sequence", "P = 3"],
        hint_mentions=["P labels, all -100"],
    )
    rejects(
        "ch08.build_labels",
        ignores_answer_mask,
        mentions=["prompt and padding", "only the answer"],
        hint_mentions=["where answer_mask is True"],
    )
    rejects(
        "ch08.build_labels",
        only_first_image,
        mentions=["two images", "3 positions (P - 1) short", "only one of the two"],
        hint_mentions=["Every <image>"],
    )
    # A difference late in a long row: the index, and both rows in full up to it.
    rejects(
        "ch08.build_labels",
        drops_the_last_answers_first_token,
        mentions=["wrong at index (16,)", "42,   43, -100, -100]", "42, -100, -100, -100]"],
    )


# --- select_patch_features ------------------------------------------------------------------


def keeps_cls(hidden_states, layer=-2):
    return hidden_states[layer]


def last_layer(hidden_states, layer=-2):
    return hidden_states[-1][:, 1:]


def drops_last_patch(hidden_states, layer=-2):
    return hidden_states[layer][:, :-1]


def hard_coded_layer(hidden_states, layer=-2):
    return hidden_states[-2][:, 1:]


def test_select_patch_features_rejects(rejects):
    rejects(
        "ch08.select_patch_features",
        keeps_cls,
        mentions=["kept the [CLS] token"],
        hint_mentions=["position 0"],
    )
    rejects("ch08.select_patch_features", last_layer, mentions=["LAST layer", "penultimate"])
    rejects("ch08.select_patch_features", drops_last_patch, mentions=["dropped the last patch"])
    rejects(
        "ch08.select_patch_features",
        hard_coded_layer,
        mentions=["layer=-1", "whatever the layer argument says", "hard-coded"],
        hint_mentions=["do not hard-code"],
    )


# --- freeze_for_alignment -------------------------------------------------------------------


def only_eval(model):
    model.eval()


def freezes_vision_only(model):
    model.vision_tower.requires_grad_(False)


def assumes_projector_trainable(model):
    model.vision_tower.requires_grad_(False)
    model.language_model.requires_grad_(False)


def test_freeze_for_alignment_rejects(rejects):
    rejects(
        "ch08.freeze_for_alignment",
        only_eval,
        mentions=["Nothing was frozen", "evaluation mode", "does not freeze"],
        hint_mentions=["requires-grad flag"],
    )
    rejects(
        "ch08.freeze_for_alignment",
        freezes_vision_only,
        mentions=["language_model:", "still require grad"],
        hint_mentions=["language model"],
    )
    rejects(
        "ch08.freeze_for_alignment",
        assumes_projector_trainable,
        mentions=["projector:", "are frozen", "explicitly"],
        hint_mentions=["do not assume"],
    )


# --- splice_batch (stretch) -----------------------------------------------------------------


def _splice_batch(
    input_ids,
    token_embeds,
    image_features,
    image_token_id,
    attention_mask,
    labels,
    ignore_index=-100,
    side="right",
    restart=False,
    image_label=False,
    keep_padding=False,
    padding_labels=False,
    keep_placeholder=False,
    check_count=True,
):
    """The solution with one switch flipped: each wrong version below is one bug."""
    import torch.nn.functional as F

    real = attention_mask.bool()
    if check_count and int(((input_ids == image_token_id) & real).sum()) != len(image_features):
        raise ValueError("the <image> tokens and the images differ in number")
    P = image_features.shape[1]
    rows, rows_labels, next_image = [], [], 0
    for b in range(input_ids.shape[0]):
        keep = torch.ones_like(real[b]) if keep_padding else real[b]
        ids, embeds = input_ids[b][keep], token_embeds[b][keep]
        targets = labels[b] if padding_labels else labels[b][keep]
        if restart:
            next_image = 0
        pieces, label_pieces, start = [], [], 0
        for pos in (ids == image_token_id).nonzero().flatten().tolist():
            if keep_placeholder:
                pieces += [embeds[start : pos + 1], image_features[next_image]]
            else:
                pieces += [embeds[start:pos], image_features[next_image]]
            fill = targets[pos] if image_label else ignore_index
            label_pieces += [targets[start:pos], targets.new_full((P,), int(fill))]
            next_image += 1
            start = pos + 1
        rows.append(torch.cat(pieces + [embeds[start:]]))
        rows_labels.append(torch.cat(label_pieces + [targets[start:]]))
    length = max(len(r) for r in rows)
    out, mask, out_labels = [], [], []
    for row, row_labels in zip(rows, rows_labels, strict=True):
        n = length - len(row)
        before, after = (n, 0) if side == "left" else (0, n)
        out.append(F.pad(row, (0, 0, before, after)))
        mask.append(F.pad(input_ids.new_ones(len(row)), (before, after)))
        row_labels = row_labels[:length]
        out_labels.append(
            F.pad(row_labels, (before, length - len(row_labels) - before), value=ignore_index)
        )
    return torch.stack(out), torch.stack(mask), torch.stack(out_labels)


def padded_on_the_left(*args):
    return _splice_batch(*args, side="left")


def each_row_restarts_at_image_0(*args):
    return _splice_batch(*args, restart=True)


def labels_on_image_positions(*args):
    return _splice_batch(*args, image_label=True)


def padding_keeps_its_labels(*args):
    return _splice_batch(*args, padding_labels=True)


def padding_kept_in_the_rows(*args):
    return _splice_batch(*args, keep_padding=True)


def placeholder_kept(*args):
    return _splice_batch(*args, keep_placeholder=True)


def no_count_check(*args):
    return _splice_batch(*args, check_count=False)


def one_image_per_row(input_ids, token_embeds, image_features, image_token_id, mask, labels):
    # Row b takes image b: right only when every row holds exactly one image.
    rows = [
        solution.splice_image(input_ids[b], token_embeds[b], image_features[b], image_token_id)
        for b in range(len(input_ids))
    ]
    return torch.stack(rows), mask, labels


def detached_images(input_ids, token_embeds, image_features, *args):
    return solution.splice_batch(input_ids, token_embeds, image_features.detach(), *args)


def test_splice_batch_rejects(rejects):
    name = "ch08.splice_batch"
    rejects(name, padded_on_the_left, mentions=["attention mask", "padded on the left"])
    rejects(
        name,
        each_row_restarts_at_image_0,
        mentions=["row 2 are wrong", "starts again at image 0", "image 1"],
        hint_mentions=["next unused image"],
    )
    rejects(
        name,
        labels_on_image_positions,
        mentions=["labels", "<image> token's own label"],
        hint_mentions=["ignore label"],
    )
    rejects(name, padding_keeps_its_labels, mentions=["padding positions carry a label"])
    rejects(name, padding_kept_in_the_rows, mentions=["still hold the input's padding"])
    rejects(name, placeholder_kept, mentions=["shape (3, 11, 2)", "placeholders are still there"])
    rejects(name, no_count_check, mentions=["raised IndexError", "expected a ValueError"])
    rejects(name, one_image_per_row, mentions=["raised ValueError", "1, 0 and 2 <image> tokens"])
    rejects(name, detached_images, mentions=["no gradient reaches the image features"])


def test_splice_batch_names_every_position():
    """A wrong row is shown position by position: where each vector came from."""
    from minillava import grading

    result = grading.run_check("ch08.splice_batch", each_row_restarts_at_image_0)
    assert "expected [i1.0 i1.1 i1.2 t1 i2.0 i2.1 i2.2 t3 t4]" in result.message
    assert "got      [i0.0 i0.1 i0.2 t1 i1.0 i1.1 i1.2 t3 t4]" in result.message


# --- no drift: the library does what the solutions do ---------------------------------------


def _tiny_llava(image_token_id: int, vocab_size: int) -> Llava:
    vision = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32
    )
    text = DecoderConfig(
        vocab_size=vocab_size, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    return Llava(LlavaConfig(vision=vision, text=text, image_token_id=image_token_id))


def test_library_splice_and_labels_match_solution():
    tok = get_tokenizer()
    model = _tiny_llava(tok.image_id, tok.vocab_size)
    samples = [
        {
            "pixel_values": torch.randn(3, 16, 16),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the circle?"},
                {"from": "gpt", "value": "red"},
            ][: 2 if i else 2],
        }
        for i in range(2)
    ]
    samples[1]["conversations"] = [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "A small red circle and a large blue square."},
    ]
    batch = collate_conversations(samples, tok)
    with torch.no_grad():
        embeds, mask, labels, _ = model.embed_multimodal(
            batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]
        )
        features = model.encode_images(batch["pixel_values"])
        token_embeds = model.language_model.embed_tokens(batch["input_ids"])
    P = model.config.num_image_tokens
    for b in range(2):
        real = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][real]
        ours = solution.splice_image(ids, token_embeds[b][real], features[b], tok.image_id)
        n = len(ours)
        torch.testing.assert_close(embeds[b, :n], ours)
        answer_mask = batch["labels"][b] != -100
        ours_labels = solution.build_labels(batch["input_ids"][b], answer_mask, tok.image_id, P)
        torch.testing.assert_close(labels[b], ours_labels)
        assert mask[b, :n].all() and not mask[b, n:].any()


def test_library_features_and_freezing_match_solution():
    model = _tiny_llava(image_token_id=3, vocab_size=32)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        hidden = model.vision_tower(pixels).hidden_states
        ours = model.projector(solution.select_patch_features(hidden))
        torch.testing.assert_close(model.encode_images(pixels), ours)
    library = _tiny_llava(image_token_id=3, vocab_size=32)
    library.freeze_vision()
    library.freeze_language()
    solution.freeze_for_alignment(model)
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in library.parameters()
    ]
    assert library.parameter_summary()["projector"]["trainable"] == model.count_parameters(True)


def test_solution_splice_matches_library_on_random_rows():
    for pos in range(4):
        ids = torch.tensor([5, 6, 8, 9])
        ids[pos] = 2
        embeds, features = torch.randn(4, 3), torch.randn(5, 3)
        expected, *_ = splice_image_tokens(ids[None], embeds[None], features[None], 2)
        torch.testing.assert_close(solution.splice_image(ids, embeds, features, 2), expected[0])


def test_solution_splice_batch_matches_library():
    """Real conversations with 0, 1 and 2 images a row, through the collator and the tokenizer."""
    tok = get_tokenizer()
    turns = [
        ("<image>\nWhat colour is the circle?", "red"),
        ("Say hello.", "Hello."),
        ("<image>\nand\n<image>\nWhich one has more shapes?", "The second one."),
        ("<image>\nDescribe the image.", "A small red circle and a large blue square."),
    ]
    samples = [
        {
            "pixel_values": torch.randn(human.count("<image>"), 3, 16, 16)
            if "<image>" in human
            else None,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
        }
        for human, gpt in turns
    ]
    batch = collate_conversations(samples, tok)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n_images = int((ids == tok.image_id).sum())
    assert n_images == 4
    torch.manual_seed(0)
    embeds, features = torch.randn(*ids.shape, 8), torch.randn(n_images, 5, 8)
    expected = splice_image_tokens(
        ids, embeds, features, tok.image_id, attention_mask=mask, labels=labels
    )
    ours = solution.splice_batch(ids, embeds, features, tok.image_id, mask, labels)
    for mine, library in zip(ours, expected[:3], strict=True):
        torch.testing.assert_close(mine, library)
    # Labels copied from the ids (padding and <image> included) give the same output labels.
    ours = solution.splice_batch(ids, embeds, features, tok.image_id, mask, ids.clone())
    library = splice_image_tokens(
        ids, embeds, features, tok.image_id, attention_mask=mask, labels=ids.clone()
    )
    torch.testing.assert_close(ours[2], library[2])


def test_the_graders_tags_name_every_position():
    from minillava.graders import ch08 as grader

    ids = torch.tensor([[3, grader.IMAGE_ID, 4], [5, 6, 0]])
    embeds, features = grader._tagged(ids, 1, 2)
    out, *_ = splice_image_tokens(
        ids, embeds, features, grader.IMAGE_ID, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]])
    )
    assert grader._tags(out[0], 0) == ["t0", "i0.0", "i0.1", "t2"]
    assert grader._tags(out[1], 1) == ["t0", "t1", "pad", "pad"]
