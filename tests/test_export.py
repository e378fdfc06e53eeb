"""`minillava export --format hf`: transformers loads the directory and computes our logits."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import transformers
from tiny_models import tiny_llava_config

from minillava.checkpoint import save_checkpoint
from minillava.export import expand_image_tokens, main
from minillava.llava import Llava
from minillava.tokenizer import get_tokenizer


def test_expand_image_tokens_repeats_each_image_id():
    ids = torch.tensor([[5, 1, 6, 7], [1, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 6, 7], [-100, 8, -100, -100]])
    out = expand_image_tokens(ids, 3, image_token_id=1, attention_mask=mask, labels=labels)
    assert out["input_ids"].tolist() == [[5, 1, 1, 1, 6, 7], [1, 1, 1, 8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert out["labels"].tolist() == [
        [-100, -100, -100, -100, 6, 7],
        [-100, -100, -100, 8, -100, -100],
    ]
    left = expand_image_tokens(ids, 3, 1, mask, padding_side="left")
    assert left["input_ids"][1].tolist() == [0, 0, 1, 1, 1, 8]


def tiny_checkpoint(path, projector: str = "mlp2x_gelu"):
    """A randomly initialised tiny LLaVA saved as `minillava train` would save it."""
    tokenizer = get_tokenizer()
    torch.manual_seed(0)
    config = tiny_llava_config(tokenizer, num_heads=4, num_kv_heads=2, max_seq_len=128)
    config.projector = projector
    model = Llava(config).eval()
    save_checkpoint(
        path, model=model, step=0, config={"tokenizer": "shapesworld"}, model_config=asdict(config)
    )
    return model, tokenizer


@pytest.mark.slow  # importing transformers and building its LLaVA takes several seconds
def test_exported_directory_loads_in_transformers_with_equal_logits(tmp_path):
    checkpoint = tmp_path / "llava.pt"
    model, tokenizer = tiny_checkpoint(checkpoint)
    config = model.config
    out_dir = tmp_path / "hf"
    assert main(["--format", "hf", str(out_dir), "--checkpoint", str(checkpoint)]) == 0
    assert (out_dir / "config.json").is_file() and (out_dir / "README.md").is_file()
    assert (out_dir / "tokenizer" / "special_tokens.json").is_file()

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
    prompts = ["<image>\nWhat colour is the circle?", "<image>\nHow many shapes?"]
    rows = [tokenizer.render_prompt([{"from": "human", "value": p}]) for p in prompts]
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [tokenizer.pad_id] * (length - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = model(input_ids, pixel_values, attention_mask)
        expanded = expand_image_tokens(
            input_ids, config.vision.num_patches, tokenizer.image_id, attention_mask
        )
        theirs = hf(pixel_values=pixel_values, **expanded)
    real = expanded["attention_mask"].bool()  # compare real positions (padding rows may differ)
    assert ours.logits.shape == theirs.logits.shape
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-4, rtol=1e-4)


def test_a_projector_transformers_lacks_is_refused_clearly(tmp_path, capsys):
    checkpoint = tmp_path / "llava.pt"
    tiny_checkpoint(checkpoint, projector="linear")
    assert main([str(tmp_path / "hf"), "--checkpoint", str(checkpoint)]) == 1
    assert "projector" in capsys.readouterr().err
