"""Chapter 9: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.lora, Tokenizer.render, Llava.count_parameters) agrees with
solutions/ch09_instruct.py, so the chapter, the notebook and the reference cannot drift apart.
"""

import torch
from torch import nn

from minillava.data.collate import collate_conversations
from minillava.decoder import Decoder, DecoderConfig
from minillava.lora import LoRALinear, apply_lora, lora_parameters, merge_lora
from minillava.tokenizer import get_tokenizer
from solutions import ch09_instruct as solution

# --- init_lora_factors ----------------------------------------------------------------------


def both_random(in_features, out_features, rank):
    return torch.randn(rank, in_features) * 0.01, torch.randn(out_features, rank) * 0.01


def both_zero(in_features, out_features, rank):
    return torch.zeros(rank, in_features), torch.zeros(out_features, rank)


def swapped_roles(in_features, out_features, rank):
    return torch.zeros(rank, in_features), torch.randn(out_features, rank)


def transposed_shapes(in_features, out_features, rank):
    return torch.randn(in_features, rank), torch.zeros(rank, out_features)


def test_init_lora_factors_rejects(rejects):
    rejects("ch09.init_lora_factors", both_random, mentions=["B is not zero", "pretrained"])
    rejects("ch09.init_lora_factors", both_zero, mentions=["both zero", "never learns"])
    rejects("ch09.init_lora_factors", swapped_roles, mentions=["other way round"])
    rejects("ch09.init_lora_factors", transposed_shapes, mentions=["lora_A has shape (12, 4)"])


# --- lora_forward ---------------------------------------------------------------------------


def _base(x, weight, bias):
    out = x @ weight.T
    return out + bias if bias is not None else out


def no_scaling(x, weight, bias, lora_A, lora_B, alpha):
    return _base(x, weight, bias) + x @ lora_A.T @ lora_B.T


def alpha_only(x, weight, bias, lora_A, lora_B, alpha):
    return _base(x, weight, bias) + alpha * (x @ lora_A.T @ lora_B.T)


def update_only(x, weight, bias, lora_A, lora_B, alpha):
    return (alpha / lora_A.shape[0]) * (x @ lora_A.T @ lora_B.T)


def ignores_none_bias(x, weight, bias, lora_A, lora_B, alpha):
    return x @ weight.T + bias + (alpha / lora_A.shape[0]) * (x @ lora_A.T @ lora_B.T)


def test_lora_forward_rejects(rejects):
    rejects("ch09.lora_forward", no_scaling, mentions=["not scaled", "alpha / r"])
    rejects("ch09.lora_forward", alpha_only, mentions=["not by alpha alone"])
    rejects("ch09.lora_forward", update_only, mentions=["pretrained layer is missing"])
    rejects("ch09.lora_forward", ignores_none_bias, mentions=["Your code raised", "bias=None"])


# --- merge_lora_weight ----------------------------------------------------------------------


def transposed_update(weight, lora_A, lora_B, alpha):
    update = lora_A.T @ lora_B.T
    if update.shape != weight.shape:  # "fix" the shape error with a transpose, as learners do
        update = update.T
        return weight + (alpha / lora_A.shape[0]) * update
    return weight + (alpha / lora_A.shape[0]) * update


def merge_unscaled(weight, lora_A, lora_B, alpha):
    return weight + lora_B @ lora_A


def merge_transposed_shape(weight, lora_A, lora_B, alpha):
    return weight.T + (alpha / lora_A.shape[0]) * (lora_A.T @ lora_B.T)


def test_merge_lora_weight_rejects(rejects):
    rejects("ch09.merge_lora_weight", transposed_update, mentions=["transposed", "square"])
    rejects("ch09.merge_lora_weight", merge_unscaled, mentions=["not scaled"])
    rejects(
        "ch09.merge_lora_weight",
        merge_transposed_shape,
        mentions=["shape (4, 6), expected (6, 4)", "transposed"],
    )


# --- assistant_labels -----------------------------------------------------------------------


def last_answer_only(input_ids, assistant_id, eot_id, ignore_index=-100):
    labels = torch.full_like(input_ids, ignore_index)
    start = int((input_ids == assistant_id).nonzero().flatten()[-1]) + 1
    for t in range(start, len(input_ids)):
        labels[t] = input_ids[t]
        if int(input_ids[t]) == eot_id:
            break
    return labels


def labels_role_token(input_ids, assistant_id, eot_id, ignore_index=-100):
    labels = torch.full_like(input_ids, ignore_index)
    inside = False
    for t, token in enumerate(input_ids.tolist()):
        if token == assistant_id:
            inside = True
        if inside:
            labels[t] = token
        if token == eot_id:
            inside = False
    return labels


def forgets_eot(input_ids, assistant_id, eot_id, ignore_index=-100):
    labels = solution.assistant_labels(input_ids, assistant_id, eot_id, ignore_index)
    labels[input_ids == eot_id] = ignore_index
    return labels


def never_stops(input_ids, assistant_id, eot_id, ignore_index=-100):
    labels = torch.full_like(input_ids, ignore_index)
    first = int((input_ids == assistant_id).nonzero().flatten()[0])
    labels[first + 1 :] = input_ids[first + 1 :]
    return labels


def test_assistant_labels_rejects(rejects):
    rejects("ch09.assistant_labels", last_answer_only, mentions=["Only the last answer"])
    rejects("ch09.assistant_labels", labels_role_token, mentions=["<|assistant|> token itself"])
    rejects("ch09.assistant_labels", forgets_eot, mentions=["learns to stop"])
    rejects("ch09.assistant_labels", never_stops, mentions=["3-turn conversation"])


# --- count_parameters -----------------------------------------------------------------------


def from_state_dict(model):
    state = model.state_dict(keep_vars=True)
    total = sum(v.numel() for v in state.values())
    trainable = sum(v.numel() for v in state.values() if v.requires_grad)
    return trainable, total


def counts_tensors(model):
    params = list(model.parameters())
    return sum(p.requires_grad for p in params), len(params)


def everything_trainable(model):
    total = sum(p.numel() for p in model.parameters())
    return total, total


def test_count_parameters_rejects(rejects):
    rejects("ch09.count_parameters", from_state_dict, mentions=["tied embedding twice"])
    rejects("ch09.count_parameters", counts_tensors, mentions=["p.numel()"])
    rejects("ch09.count_parameters", everything_trainable, mentions=["requires_grad=True"])


# --- no drift: the library does what the solutions do ---------------------------------------


def test_lora_library_matches_solution():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    layer = LoRALinear(base, rank=3, alpha=12.0)
    assert torch.all(layer.lora_B == 0)  # the library initialises like init_lora_factors
    A, B = solution.init_lora_factors(7, 5, 3)
    assert A.shape == layer.lora_A.shape and B.shape == layer.lora_B.shape and torch.all(B == 0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 7)
    expected = solution.lora_forward(
        x, base.weight, base.bias, layer.lora_A.detach(), layer.lora_B.detach(), 12.0
    )
    torch.testing.assert_close(layer(x), expected)
    merged = solution.merge_lora_weight(
        base.weight.detach().clone(), layer.lora_A.detach(), layer.lora_B.detach(), 12.0
    )
    layer.merge()
    torch.testing.assert_close(layer.base.weight.detach(), merged)
    torch.testing.assert_close(layer(x), expected)


def test_render_mask_matches_assistant_labels():
    tok = get_tokenizer()
    samples = [
        {
            "pixel_values": None,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the circle?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "Is there a square?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {
            "pixel_values": None,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": "A small red circle."},
            ],
        },
    ]
    for sample in samples:
        sample["pixel_values"] = torch.zeros(3, 8, 8)
    batch = collate_conversations(samples, tok)
    for b in range(2):
        got = solution.assistant_labels(batch["input_ids"][b], tok.assistant_id, tok.eot_id)
        torch.testing.assert_close(got, batch["labels"][b])


def test_count_parameters_matches_library():
    from minillava.llava import Llava, LlavaConfig
    from minillava.vit import ViTConfig

    vision = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    text = DecoderConfig(
        vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
    )
    model = Llava(LlavaConfig(vision=vision, text=text, image_token_id=3))
    model.freeze_vision()
    assert solution.count_parameters(model) == (
        model.count_parameters(trainable_only=True),
        model.count_parameters(),
    )
    apply_lora(model.language_model, ("q_proj", "v_proj"), rank=4)
    n_lora = sum(p.numel() for p in lora_parameters(model))
    projector = model.parameter_summary()["projector"]["total"]
    assert solution.count_parameters(model)[0] == n_lora + projector


def test_merged_decoder_gives_identical_outputs():
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
    )
    decoder = Decoder(config)
    apply_lora(decoder, ("q_proj", "v_proj", "gate_proj"), rank=2, alpha=4.0)
    with torch.no_grad():
        for p in lora_parameters(decoder):
            p.normal_()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        before = decoder(ids).logits
        merge_lora(decoder)
        after = decoder(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name in decoder.state_dict())


# --- instruction_samples --------------------------------------------------------------------


def _samples_with(change):
    """The reference samples, deep-copied, with `change(samples)` applied."""
    import copy

    samples = copy.deepcopy(solution.instruction_samples())
    change(samples)
    return lambda: samples


def _set_answer(k, j, text):
    def change(samples):
        samples[k]["conversations"][2 * j + 1]["value"] = text

    return change


def test_instruction_samples_name_the_false_fact(rejects):
    wrong_colour = _samples_with(
        _set_answer(1, 1, "There is a large red cross in the middle right.")
    )
    rejects("ch09.instruction_samples", wrong_colour, mentions=["sample 1", "red cross"])
    wrong_cell = _samples_with(_set_answer(1, 1, "There is a large blue cross in the top left."))
    rejects("ch09.instruction_samples", wrong_cell, mentions=["wrong cell", "top left"])
    invented = _samples_with(_set_answer(2, 1, "There is a small green circle in the center."))
    rejects("ch09.instruction_samples", invented, mentions=["green circle", "hallucinated"])
    wrong_size = _samples_with(
        _set_answer(1, 1, "There is a small blue cross in the middle right.")
    )
    rejects("ch09.instruction_samples", wrong_size, mentions=["wrong size", "'small'"])
    miscounted = _samples_with(_set_answer(1, 0, "There are three shapes."))
    rejects("ch09.instruction_samples", miscounted, mentions=["number of shapes", "there are 2"])
    misread = _samples_with(_set_answer(0, 1, "The letter K is written in the middle right."))
    rejects("ch09.instruction_samples", misread, mentions=["'K'", "the letter L"])


def test_instruction_samples_reject_bad_format_and_thin_data(rejects):
    def image_twice(samples):
        samples[0]["conversations"][2]["value"] += "\n<image>"

    rejects("ch09.instruction_samples", _samples_with(image_twice), mentions=["2 times"])

    def one_round(samples):
        del samples[1]["conversations"][2:]

    rejects("ch09.instruction_samples", _samples_with(one_round), mentions=["1 round"])

    def wrong_image(samples):
        samples[2]["image"] = "scene2.png"

    rejects("ch09.instruction_samples", _samples_with(wrong_image), mentions=["train_000002.png"])

    def unverifiable(samples):
        for turn in samples[1]["conversations"][1::2]:
            turn["value"] = "Yes."

    rejects("ch09.instruction_samples", _samples_with(unverifiable), mentions=["0 fact"])

    def same_question(samples):
        for record in samples:
            for turn in record["conversations"][2::2]:
                turn["value"] = "How many shapes are there?"
            record["conversations"][0]["value"] = "<image>\nHow many shapes are there?"
            for turn in record["conversations"][1::2]:
                turn["value"] = f"There are {2 if record['id'] != 'sample_2' else 4} shapes."

    rejects("ch09.instruction_samples", _samples_with(same_question), mentions=["1 kind"])
    rejects("ch09.instruction_samples", lambda: {"id": 0}, mentions=["list of 3"])


def test_instruction_samples_scenes_agree_with_the_grader():
    from exercises import ch09_instruct as exercise
    from minillava.graders import ch09

    assert exercise.SAMPLE_SCENES == solution.SAMPLE_SCENES == ch09.SAMPLE_SCENES
