"""Look at the data: a grid of ShapesWorld scenes with a caption and a few Q/A pairs each.

In a notebook, `show_samples()` as the last line of a cell draws the figure.
"""

from __future__ import annotations

import textwrap

from minillava.data.instruct import QUESTION_TYPES, make_question
from minillava.data.shapes import ShapesWorld, WorldConfig, sample_rng


def show_samples(
    n: int = 8,
    split: str = "train",
    seed: int = 0,
    config: WorldConfig | None = None,
    cols: int = 4,
    questions: int = 3,
    start: int = 0,
):
    """Draw samples start .. start + n - 1 of `split`; returns a matplotlib Figure.

    Under each image: its first caption and `questions` Q/A pairs of different types.
    """
    from matplotlib.figure import Figure  # lazily: plotting is optional for the library

    if n < 1 or cols < 1:
        raise ValueError(f"n and cols must be positive, got n={n}, cols={cols}")
    world = ShapesWorld(split, start + n, config, seed)
    cols = min(cols, n)
    rows = -(-n // cols)  # ceiling division
    fig = Figure(figsize=(3.2 * cols, 4.6 * rows), layout="constrained")
    for k in range(n):
        sample = world[start + k]
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(sample.image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{split} #{sample.index}", fontsize=9)
        rng = sample_rng(seed, split, sample.index, stream="show")
        lines = textwrap.wrap(sample.captions[0], 38)
        for qtype in rng.sample(QUESTION_TYPES, min(questions, len(QUESTION_TYPES))):
            qa = make_question(sample.scene, qtype, rng, world.config)
            wrapped = textwrap.wrap(f"Q ({qa.type}): {qa.question}", 38)
            lines += wrapped + [f"A: {qa.answer}"]
        ax.set_xlabel("\n".join(lines), fontsize=7, loc="left", family="monospace")
    return fig
