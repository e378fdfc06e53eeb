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
        mentions=["placeholder is still in the sequence", "replace"],
    )
    rejects("ch08.splice_image", off_by_one, mentions=["off by one", "token_embeds[pos + 1:]"])
    rejects("ch08.splice_image", image_at_end, mentions=["not at the end"])
    rejects("ch08.splice_image", detached, mentions=["does not require grad"])
    rejects("ch08.splice_image", image_detached, mentions=["no gradient reaches the image"])


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
    )
    rejects("ch08.build_labels", one_label_per_token, mentions=["SPLICED sequence", "P = 3"])
    rejects("ch08.build_labels", ignores_answer_mask, mentions=["prompt and padding"])
    rejects("ch08.build_labels", only_first_image, mentions=["two images", "Every <image>"])
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
    rejects("ch08.select_patch_features", keeps_cls, mentions=["kept the [CLS] token"])
    rejects("ch08.select_patch_features", last_layer, mentions=["LAST layer", "penultimate"])
    rejects("ch08.select_patch_features", drops_last_patch, mentions=["dropped the last patch"])
    rejects("ch08.select_patch_features", hard_coded_layer, mentions=["do not hard-code"])


# --- freeze_for_alignment -------------------------------------------------------------------


def only_eval(model):
    model.eval()


def freezes_vision_only(model):
    model.vision_tower.requires_grad_(False)


def assumes_projector_trainable(model):
    model.vision_tower.requires_grad_(False)
    model.language_model.requires_grad_(False)


def test_freeze_for_alignment_rejects(rejects):
    rejects("ch08.freeze_for_alignment", only_eval, mentions=["model.eval()", "Nothing was frozen"])
    rejects(
        "ch08.freeze_for_alignment",
        freezes_vision_only,
        mentions=["language_model:", "still require grad"],
    )
    rejects(
        "ch08.freeze_for_alignment",
        assumes_projector_trainable,
        mentions=["projector:", "are frozen", "explicitly"],
    )


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
