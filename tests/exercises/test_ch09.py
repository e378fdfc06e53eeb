"""Chapter 9: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.lora, Tokenizer.render, Llava.count_parameters) agrees with
solutions/ch09_instruct.py, so the chapter, the notebook and the reference cannot drift apart.
"""

import pytest
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
    rejects(
        "ch09.init_lora_factors",
        both_random,
        mentions=["B is not zero", "pretrained"],
        hint_mentions=["starts at zero"],
    )
    rejects(
        "ch09.init_lora_factors",
        both_zero,
        mentions=["both zero", "never learns"],
        hint_mentions=["random values"],
    )
    rejects("ch09.init_lora_factors", swapped_roles, mentions=["other way round"])
    rejects(
        "ch09.init_lora_factors",
        transposed_shapes,
        mentions=["lora_A has shape (12, 4)"],
        hint_mentions=["laid out like a linear layer's weight"],
    )


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
    rejects(
        "ch09.lora_forward",
        no_scaling,
        mentions=["not scaled", "alpha / r"],
        hint_mentions=["alpha over the rank"],
    )
    rejects("ch09.lora_forward", alpha_only, mentions=["scaled by alpha alone", "r times"])
    rejects("ch09.lora_forward", update_only, mentions=["pretrained layer is missing"])
    rejects(
        "ch09.lora_forward",
        ignores_none_bias,
        mentions=["Your code raised", "bias=None"],
    )


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
    rejects(
        "ch09.merge_lora_weight",
        merge_unscaled,
        mentions=["not scaled", "alpha / r"],
        hint_mentions=["B times A"],
    )
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
    rejects(
        "ch09.assistant_labels",
        never_stops,
        mentions=["3-turn conversation", "everything after the first <|assistant|>"],
        hint_mentions=["closes it"],
    )


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
    rejects(
        "ch09.count_parameters",
        counts_tensors,
        mentions=["counted tensors, not numbers"],
        hint_mentions=["numbers of elements"],
    )
    rejects(
        "ch09.count_parameters",
        everything_trainable,
        mentions=["every parameter as trainable"],
        hint_mentions=["require gradients"],
    )


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
    rejects(
        "ch09.instruction_samples",
        wrong_colour,
        mentions=["sample 1", "red cross"],
        hint_mentions=["the scene holds"],
    )
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
    rejects("ch09.instruction_samples", misread, mentions=["'K'"], hint_mentions=["the letter L"])


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


# --- merge_lora (stretch) -------------------------------------------------------------------


def _merged_linear(adapter, weight, bias=True, dtype=True):
    """A new nn.Linear holding `weight`, with the adapter's bias (or a fresh one, or none)."""
    base = adapter.base
    factory = {"dtype": base.weight.dtype} if dtype else {}
    has_bias = base.bias is not None if bias is True else bias
    layer = nn.Linear(base.in_features, base.out_features, bias=has_bias, **factory)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is True and base.bias is not None:
            layer.bias.copy_(base.bias)
    return layer


def _walk(model, make, place="parent"):
    """Replace each LoRALinear by make(adapter), at `place`: its parent, the model, the wrapper."""
    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, adapter in adapted:
        new = make(adapter)
        parent_name, _, child = name.rpartition(".")
        if place == "parent":
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        elif place == "model":
            setattr(model, name, new)  # a dotted name: a new module beside the old one
        else:
            adapter.base = new  # inside the wrapper, which stays
    return model


def _weight(adapter, scale=None, transposed=False):
    A, B = adapter.lora_A.detach(), adapter.lora_B.detach()
    update = A.T @ B.T if transposed else B @ A
    if update.shape != adapter.base.weight.shape:  # "fixed" with a transpose, as learners do
        update = update.T
    scale = adapter.alpha / adapter.rank if scale is None else scale
    return adapter.base.weight.detach() + scale * update


def merge_model_unscaled(model):
    return _walk(model, lambda a: _merged_linear(a, _weight(a, scale=1.0)))


def merge_update_transposed(model):
    return _walk(model, lambda a: _merged_linear(a, _weight(a, transposed=True)))


def merge_drops_bias(model):
    return _walk(model, lambda a: _merged_linear(a, _weight(a), bias=False))


def merge_random_bias(model):
    return _walk(model, lambda a: _merged_linear(a, _weight(a), bias="fresh"))


def merge_float32_layers(model):
    return _walk(model, lambda a: _merged_linear(a, _weight(a), dtype=False))


def merge_inside_wrapper(model):
    return _walk(model, lambda a: _merged_linear(a, _weight(a)), place="wrapper")


def merge_dotted_setattr(model):
    return _walk(model, lambda a: _merged_linear(a, _weight(a)), place="model")


def merge_in_place(model):
    return merge_lora(model)  # the library's: it adds the update into W itself


def merge_forgets_return(model):
    solution.merge_lora(model)


def merge_into_a_copy(model):
    import copy

    return solution.merge_lora(copy.deepcopy(model))


@pytest.mark.parametrize(
    "wrong, mentions, hint_mentions",
    [
        (merge_model_unscaled, ["blocks.0.mix", "not scaled", "alpha / r"], ["merge_lora_weight"]),
        (merge_update_transposed, ["transposed", "square layer"], []),
        (merge_drops_bias, ["bias of blocks.0.mix is missing"], ["as it was"]),
        (merge_random_bias, ["bias of the merged blocks.0.mix", "random bias"], ["copy"]),
        (merge_float32_layers, ["torch.float32", "torch.float64"], ["dtype"]),
        (merge_inside_wrapper, ["still a LoRALinear", "inside the LoRA wrapper"], ["parent"]),
        (merge_dotted_setattr, ["dotted name", "'blocks.0.mix'"], ["parent"]),
        (
            merge_in_place,
            ["changed the weights of its argument `model` in place", "base.weight"],
            [],
        ),
        (merge_forgets_return, ["returned None"], ["return"]),
        (merge_into_a_copy, ["different _Net object", "still holds its LoRA layers"], []),
    ],
)
def test_merge_lora_rejects(rejects, wrong, mentions, hint_mentions):
    rejects("ch09.merge_lora", wrong, mentions=mentions, hint_mentions=hint_mentions)


def test_merge_lora_agrees_with_the_library():
    import copy

    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
    )
    decoder = Decoder(config)
    apply_lora(decoder, ("q_proj", "o_proj", "down_proj"), rank=3, alpha=5.0, dropout=0.1)
    with torch.no_grad():
        for p in lora_parameters(decoder):
            p.normal_()
    adapters = {n: m for n, m in decoder.named_modules() if isinstance(m, LoRALinear)}
    kept = {
        n: (m.base.weight.clone(), m.lora_A.clone(), m.lora_B.clone()) for n, m in adapters.items()
    }
    library = merge_lora(copy.deepcopy(decoder))
    ours = solution.merge_lora(decoder)
    assert ours is decoder
    assert list(ours.state_dict()) == list(library.state_dict())
    for key, value in library.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    for name, (W, A, B) in kept.items():  # the adapters are as they were
        adapter = adapters[name]
        assert torch.equal(adapter.base.weight, W) and not adapter.merged
        assert torch.equal(adapter.lora_A, A) and torch.equal(adapter.lora_B, B)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
