"""minillava: a tiny LLaVA-style vision-language model, built by hand in PyTorch.

Data flows through the package in this order (one file per concept):

    data/shapes.py      ShapesWorld scenes: images + annotations + captions
    data/instruct.py    the rule-based data engine: LLaVA-style conversations
    tokenizer.py        tiktoken BPE trained on ShapesWorld text + the chat template
    attention.py        scaled dot-product attention, by hand
    vit.py              the Eyes: a CLIP-style Vision Transformer
    projector.py        the Bridge: linear / MLP projector (and the linear algebra behind it)
    decoder.py          the Brain: a LLaMA-style decoder-only language model
    llava.py            eyes + bridge + brain, image tokens spliced in at <image>
    generate.py         sampling with a KV cache
    clip.py             contrastive pretraining of the Eyes
    train.py            one training loop for every stage
    eval.py             VQA accuracy by question type, against a blind baseline
    cli.py              the `minillava` command
"""

__version__ = "0.1.0"
