"""LoRA by hand: starts as the identity update, merges exactly, trains only A and B."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minillava.lora import LoRALinear, apply_lora, lora_parameters, merge_lora


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.norm(self.q_proj(x) + self.v_proj(x)))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), nn.ReLU(), Block())


def test_zero_initialised_B_leaves_the_output_unchanged():
    base = nn.Linear(8, 5)
    lora = LoRALinear(base, rank=2, alpha=4)
    x = torch.randn(3, 7, 8)
    assert torch.equal(lora(x), base(x))
    assert lora.lora_A.abs().sum() > 0  # A is random, so B's gradient is not zero


def test_merged_equals_unmerged_and_unmerge_restores_the_weight():
    lora = LoRALinear(nn.Linear(8, 5), rank=3, alpha=6)
    with torch.no_grad():
        lora.lora_B.normal_()
    original = lora.base.weight.clone()
    x = torch.randn(4, 8)
    unmerged = lora(x)
    assert not torch.allclose(unmerged, lora.base(x))  # the update does something
    lora.merge()
    torch.testing.assert_close(lora(x), unmerged)
    lora.merge()  # merging twice must not add the update twice
    torch.testing.assert_close(lora(x), unmerged)
    lora.unmerge()
    torch.testing.assert_close(lora.base.weight, original)
    torch.testing.assert_close(lora(x), unmerged)


def test_apply_lora_wraps_targets_and_only_A_B_train():
    model = _model()
    names = apply_lora(model, ("q_proj", "v_proj"), rank=2, alpha=4)
    assert names == ["0.q_proj", "0.v_proj", "2.q_proj", "2.v_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}" for n in names for m in "AB"}
    assert len(lora_parameters(model)) == 8

    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_merge_lora_restores_plain_names_and_the_same_function():
    model = _model()
    plain_names = set(model.state_dict())
    apply_lora(model, ("q_proj",), rank=2)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B)
    x = torch.randn(5, 8)
    expected = model(x)
    merge_lora(model)
    assert set(model.state_dict()) == plain_names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), expected)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(_model(), ("wq",))
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(nn.Linear(2, 2), rank=0)


def test_lora_on_a_tied_head_is_refused_and_an_untied_one_merges_exactly():
    from minillava.decoder import Decoder, DecoderConfig

    config = dict(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)
    tied = Decoder(DecoderConfig(**config, tie_embeddings=True))
    # Merged into the shared matrix, an lm_head update would move the input embeddings too.
    with pytest.raises(ValueError, match=r"lm_head.weight is shared with embed_tokens.weight"):
        apply_lora(tied, ("lm_head", "q_proj"))
    assert not any(isinstance(m, LoRALinear) for m in tied.modules())  # refused before changing
    assert tied.lm_head.weight is tied.embed_tokens.weight

    untied = Decoder(DecoderConfig(**config, tie_embeddings=False)).eval()
    apply_lora(untied, ("lm_head",), rank=2)
    torch.nn.init.normal_(untied.lm_head.lora_B)
    embeddings = untied.embed_tokens.weight.clone()
    ids = torch.randint(0, 40, (2, 7))
    expected = untied(ids).logits
    merge_lora(untied)
    torch.testing.assert_close(untied(ids).logits, expected)
    assert torch.equal(untied.embed_tokens.weight, embeddings)
