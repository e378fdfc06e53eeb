"""Chapter 10, Inference and evaluation: your exercises. Fill each function, then run
`minillava grade ch10` (or the `check(...)` cells of notebooks/10_eval.ipynb).

How do we know the model *looks* at the image? We ask it short questions, decode its answers
greedily with the KV cache, compare them word for word with the truth, and put every number
next to a baseline that cannot see. Compare your code with minillava/eval.py and
minillava/generate.py once it passes.

Shapes: B batch, T prompt length, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalise_answer(text: str) -> str:
    """Bring an answer to a canonical form so that exact match ignores harmless differences.

        "  Top   Left. "  ->  "top left"
        "Red!"            ->  "red"
        "3"               ->  "3"

    Three rules, in this order:
      1. lower-case;
      2. collapse every run of whitespace (spaces, tabs, newlines) to one space and drop the
         whitespace at both ends;
      3. strip punctuation from the *end* only: any of the characters . ! ? , ; : (several in a
         row too, "yes?!" -> "yes"), then any space that this uncovers.
    Punctuation inside an answer is kept: "top-left" stays "top-left".
    Hint: split with no argument cuts at every run of whitespace and drops the ends, and join
    puts single spaces back; rstrip, given a string of characters, strips any of them from the
    end, however many there are.
    """
    raise NotImplementedError("normalise_answer: your code here (chapter 10)")


def accuracy_by_type(records: list[dict]) -> tuple[float, dict[str, float], dict[str, int]]:
    """Score a list of answered questions: overall accuracy, accuracy per type, count per type.

    Each record is a dict with at least "type" (str, e.g. "colour") and "correct" (bool).
    Returns (overall, per_type, counts):
      overall   fraction of *all* records that are correct (a float in [0, 1]);
      per_type  {type: fraction correct among the records of that type};
      counts    {type: number of records of that type}.
    Both dicts have their keys in sorted order (the types sorted by name).

    Careful: `overall` is not the mean of the per-type accuracies. With 90 colour questions
    (all right) and 10 count questions (all wrong), overall is 90 / 100 = 0.9, not
    (1.0 + 0.0) / 2. Raise ValueError if `records` is empty.
    """
    raise NotImplementedError("accuracy_by_type: your code here (chapter 10)")


@torch.no_grad()
def greedy_generate(decoder, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding with the KV cache: input_ids (B, T) -> new tokens (B, max_new_tokens).

    `decoder` is a minillava Decoder: called with input_ids, past_key_values (a cache, or
    None) and use_cache on, it returns an object with .logits (B, T_in, V) and .past_key_values
    (the cache holding every position seen so far). No padding here: every row has T real
    tokens.

      1. Prefill: run the whole prompt once with use_cache=True.
      2. Repeat max_new_tokens times:
         - the next token of each row is the argmax of the logits at the *last* position;
         - append it to the output;
         - run the model on that one new token only, shape (B, 1), passing the cache it
           returned back in as past_key_values, use_cache still on. The decoder places it at
           position cache length (T, T + 1, ...) by itself: do not pass position_ids.
    You may skip the model call after the last token (nothing would use it).
    The result must equal re-running the whole sequence every step, with T + t positions of
    work at step t instead of 1.
    """
    raise NotImplementedError("greedy_generate: your code here (chapter 10)")


@torch.no_grad()
def greedy_generate_batch(
    decoder, prompts: list[list[int]], max_new_tokens: int, eot_id: int, pad_id: int
) -> Tensor:
    """Stretch exercise: answer prompts of different lengths in one batch, each row stopping
    at its own end token, as minillava.generate.generate does for `minillava eval`.

    prompts: B lists of token ids, of different lengths (at least one token each). Returns a
    LongTensor (B, n_new) of new tokens, with n_new <= max_new_tokens:

      1. Pad on the *left*: one (B, T) tensor, T the longest prompt, pad_id before the shorter
         prompts, and an attention mask (B, T), 1 on real tokens and 0 on padding. On the left,
         every row's last position is its last real token: its logits predict the row's first
         new token, and the new tokens line up in one column per step. The decoder keeps the
         padding out of attention and numbers each row's positions from its first real token,
         so a padded prompt gets exactly the answer it gets alone.
      2. Prefill the whole batch once, with the mask and use_cache=True.
      3. Each step: every row's greedy token. A row *finishes* when it writes eot_id; the end
         token is kept in its row, and from the next step on the row gets pad_id. Stop as soon
         as every row has finished, or after max_new_tokens steps: no model call whose logits
         nobody reads.
      4. Feed the new tokens, shape (B, 1), back with the cache, and with the mask grown by a
         column of ones: the mask covers every key the model sees, the cached ones too.

        prompts [[5, 8, 2], [7]], eot_id 0, pad_id 9; say row 0 writes 4 0 ... and row 1 3 6 0
        input_ids [[5, 8, 2], [9, 9, 7]]     mask [[1, 1, 1], [0, 0, 1]]
        result    [[4, 0, 9], [3, 6, 0]]     (3 columns: both rows have finished)

    Why: evaluation asks hundreds of questions; one at a time, a small model spends its time
    on overheads, and answers differ in length, so a batch must let each row end on its own.
    """
    raise NotImplementedError("greedy_generate_batch: your code here (chapter 10, stretch)")


def majority_baseline(train_records: list[dict], test_records: list[dict]) -> dict[str, float]:
    """Accuracy of a 'model' that never looks: it gives each question type's most common answer.

    Records are dicts with "type" and "answer" (the true answer, a string).
      1. From train_records, find for each type the most common *normalised* answer
         (normalise_answer above; ties go to the answer seen first).
      2. On test_records, predict that answer for every question of the type and compare with
         the normalised true answer.
    Returns {type: accuracy on test} for every type present in test_records, keys sorted; a type
    never seen in training scores 0.0. This is the answer prior: what a blind model can reach by
    learning, per type, which answer comes up most.
    Hint: a collections.Counter of each type's normalised answers counts them; its most_common
    method lists them most frequent first and, among equal counts, in the order they were first
    seen: the tie rule above.
    """
    raise NotImplementedError("majority_baseline: your code here (chapter 10)")
