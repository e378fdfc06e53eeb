"""Data: the ShapesWorld images and their words, the data engine, and real LLaVA-format data.

    shapes.py           procedural scenes -> images, annotations, captions, descriptions
    image_processor.py  any PIL image -> normalised (3, S, S) tensor (pad or centre-crop)
    instruct.py         the rule-based data engine: Q/A pairs and LLaVA conversations
    mixture.py          the training mixture: which conversation a training row holds
    llava_json.py       load any LLaVA-format JSON + image folder, with clear errors
    collate.py          conversations -> padded token batches (tokenizer helper)
    export.py           `minillava data export DIR` / `minillava data check JSON IMAGE_DIR`
    show.py             show_samples(): a grid of scenes with captions and Q/A

Submodules are imported on demand (`from minillava.data.shapes import ShapesWorld`), so that
importing one part never pulls in the others.
"""
