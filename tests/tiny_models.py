"""Tiny model configs and helpers shared by the model-level tests: `from tiny_models import ...`."""


def loss_and_grads(model, *args, **kwargs):
    """One forward and backward from zeroed gradients: (output, {name: gradient}) of every
    parameter that got one (frozen or unused ones get none)."""
    model.zero_grad()
    out = model(*args, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_llava_config(tokenizer, **text_overrides):
    """The smallest LLaVA the model-level tests use: a 2-layer ViT on 16x16 images (4 image
    tokens) and a 2-layer decoder of width 32. `text_overrides` change DecoderConfig fields."""
    from minillava.decoder import DecoderConfig
    from minillava.llava import LlavaConfig
    from minillava.vit import ViTConfig

    vision = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    text = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_seq_len=256,
    )
    text.update(text_overrides)
    return LlavaConfig(vision=vision, text=DecoderConfig(**text), image_token_id=tokenizer.image_id)


def load_bench_script(name: str):
    """bench/<name>.py as a module (the bench scripts are programs, not an installed package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as `import` does: a dataclass looks its module up there.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
