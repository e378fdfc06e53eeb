"""minillava: a tiny LLaVA-style vision-language model, built by hand in PyTorch.

Data flows through the package in this order (one file per concept):

    data/shapes.py          ShapesWorld scenes: images + annotations + captions
    data/instruct.py        the rule-based data engine: LLaVA-style conversations
    data/mixture.py         which conversation each training row holds
    bpe.py                  the byte-level BPE trainer
    tokenizer.py            tiktoken BPE trained on ShapesWorld text + the chat template
    vocabulary.py           `python -m minillava.vocabulary`: train and measure the vocabulary
    attention.py            scaled dot-product attention, by hand
    vit.py                  the Eyes: a CLIP-style Vision Transformer
    clip.py                 contrastive pretraining of the Eyes
    projector.py            the Bridge: linear / MLP projector (and the linear algebra behind it)
    resampler.py            the Bridge's alternatives: Perceiver resampler, Q-Former sizes
    gated_cross_attention.py  Flamingo's way in: gated cross-attention inside a frozen LLM
    decoder.py              the Brain: a LLaMA-style decoder-only language model
    decoder_loss_only.py    the Brain's training path: the loss alone, shared prefix once
    generate.py             sampling with a KV cache
    llava.py                eyes + bridge + brain, image tokens spliced in at <image>
    lora.py                 low-rank adapters
    device.py               CPU, CUDA or MPS, and the autocast that suits it
    presets.py              every size and step count of a run: tiny, cpu, gpu
    checkpoint.py           save and load, atomically, with clear errors
    stages.py, train.py     what each stage trains on; one training loop for every stage
    parts.py                `--parts exercises`: your exercise functions in the model's place
    launch.py               several training processes on one CPU, owned by `minillava train`
    plots.py                loss curves from the training log
    chat.py                 talk to a trained model about an image
    judge.py                free answers judged by meaning, descriptions against the scene
    eval.py, report.py      VQA accuracy by question type against blind baselines; its report
    export.py, interop.py   transformers' LLaVA format, parity-tested
    pretrained.py           a real LLaVA-1.5 checkpoint run by this code (safetensors; `hf` extra)
    hf_tokenizer.py         that checkpoint's own tokenizer and LLaVA-1.5's prompt format
    simple_llava.py         a pretrained CLIP + a pretrained Llama + a new projector, trained
    data/clip_preprocess.py CLIP's image preprocessing by hand: resize, centre crop, normalise
    grading.py, graders/    `minillava grade`: each chapter's checks (grading_*.py: its parts)
    cli.py                  the `minillava` command
"""

__version__ = "0.1.0"
