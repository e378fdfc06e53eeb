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


# A few sentences to train the test checkpoints' tokenizer on.
LLAMA_CORPUS = [
    "USER: what is this ?\n ASSISTANT: a photo .",
    "what is in the picture ? a red circle and a blue square .",
    "how many shapes are there ? there are three shapes in the image .",
    "describe the photo . a cat sits on a green mat near the door .",
    "write a short caption . a small green triangle on the left .",
]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as Llama's (<s> = 1)


def write_llama_tokenizer(directory, extra_specials=()) -> int:
    """A Llama-style BPE tokenizer.json in `directory` (Metaspace, <s> added in front), trained
    on LLAMA_CORPUS; `extra_specials` follow Llama's four (e.g. LLaVA's "<image>", id 4).
    Returns its vocabulary size. Needs the `tokenizers` package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    specials = [*LLAMA_SPECIALS, *extra_specials]
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(LLAMA_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer.get_vocab_size()
