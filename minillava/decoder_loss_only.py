"""The decoder's loss-only forward: the training loss, computed only where the loss reads it.

The training loop reads one number from the model: the loss. It says so with
`return_logits=False` (`minillava.train.loss_only_kwargs`), and `Decoder.forward` then calls
`loss_only_forward` below instead of its plain path. The plain path runs every layer at every
position, then the LM head at every position, (B, T, V) logits, then the loss. Most of that is
never read. Which outputs does the loss actually read?

1. The last layer's, only at the *scored* positions: those whose next label is not -100. In
   instruction data the prompt and the image are not scored, so 10-30% of positions are. The
   last layer therefore runs only there (`DecoderLayer.forward_at`: every position is still a
   key and a value, but only the scored ones ask), and so do the final norm and the LM head:
   (N, V) logits instead of (B, T, V), and the cross-entropy over V at N positions only.
2. The other layers' outputs are read by the next layer's attention, at the real tokens only:
   no real token attends to padding. Their MLPs, which work on each token alone, therefore run
   at the real tokens only (`keep` of `DecoderLayer.forward`); attention still runs everywhere.
3. Every row of an instruction batch opens with the same tokens (the system line and the user's
   tag). A causal model's outputs there depend on nothing after them, so they are the same in
   every row: they are computed once, on one row, and every row attends to their keys and
   values (`SharedPrefix`, `shared_prefix_length`).

Nothing is approximated: the loss and the gradients are those of the plain path
(tests/test_decoder.py and tests/test_llava.py check both). It is faster only because it does
less: a layer's work grows with the positions it runs at, and the LM head's with V.
docs/results.md measures what each saving is worth (`bench/bench_train.py --disable NAME` puts
one back).

Shapes: B = batch, T = positions, C = hidden size, D = head size, H_kv = key/value heads,
Q = the most scored positions of a row, N = the scored positions of the whole batch, V = vocab.

decoder.py imports this module (its layers use `gather_positions` and `SharedPrefix`), so this
module does not import decoder.py: `loss_only_forward` is handed the Decoder instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels equal to this are not scored, as in decoder.py


def loss_only_forward(
    decoder: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    build_attention_mask: Callable,
) -> torch.Tensor:
    """A Decoder's mean next-token loss on x (B, T, C), the same as `causal_lm_loss` of its
    logits, computed only where it is read (no KV cache: training).

    decoder: the `Decoder` (its layers, norm, lm_head, config and `share_prefix` switch).
    x (B, T, C): the embedded inputs; cos, sin (B, T, D): each position's rotation angles,
        from position_ids (B or 1, T), which the layers also get (a learner's apply_rotary takes
        positions: parts.py); attention_mask (B, T) or None; labels (B, T), unshifted.
    build_attention_mask: decoder.py's, handed in as this module cannot import decoder.py.
    """
    B, T = x.shape[:2]
    positions = position_ids.expand(B, T)  # (B, T)
    # Position t is scored on labels[t + 1]: the scored positions are those where it is not -100.
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    queries, valid = positions_where(next_labels != IGNORE_INDEX)  # (B, Q) each
    real = None if attention_mask is None else attention_mask.bool()  # (B, T)

    n = shared_prefix_length(decoder, x, attention_mask, position_ids, valid, queries)
    prefix = None
    if n:
        # The first n positions are the same in every row: run them once (row 0), keep their
        # keys and values, then run only the rest of each row, (B, T - n).
        prefix = SharedPrefix(len(decoder.layers))
        shared = x[:1, :n]  # (1, n, C)
        for layer in decoder.layers:
            shared = layer(
                shared, cos[:1, :n], sin[:1, :n], None, prefix, positions=positions[:1, :n]
            )
        x, cos, sin, positions = x[:, n:], cos[:, n:], sin[:, n:], positions[:, n:]
        real = None if real is None else real[:, n:]

    # T - n queries over T keys: with a shared prefix the mask's diagonal is shifted right by n
    # (SDPA's is_causal would align the queries with the first keys).
    mask = build_attention_mask(attention_mask, T - n, T, x.device)
    for layer in decoder.layers[:-1]:  # MLP on the real tokens only
        x = decoder.run_layer(
            layer, x, cos, sin, mask, cache=prefix, keep=real, positions=positions
        )  # (B, T - n, C)

    # The last layer only at the scored positions, as indices into x (all after the prefix; the
    # unused padding entries of `queries` may not be, and point at x's first position instead).
    asking = (queries - n).clamp(min=0)  # (B, Q); queries itself if n == 0
    query_mask = query_attention_mask(asking + n, attention_mask, T)  # (B, 1, Q, T)
    last = decoder.layers[-1].forward_at
    x = decoder.run_layer(
        last, x, cos, sin, query_mask, asking, cache=prefix, positions=positions
    )  # (B, Q, C)
    scored_logits = decoder.lm_head(decoder.norm(x[valid]))  # (N, V), not (B, T, V)
    return F.cross_entropy(scored_logits.float(), next_labels.gather(1, queries)[valid])


def positions_where(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> (positions (B, Q), valid (B, Q)): each row's True positions, in order.

    Rows have different numbers of them, so each is padded to Q = the largest count (at least
    1) with other positions of the row; `valid` is False there. Example:
        keep [[0 1 0 1], [1 0 0 0]] -> positions [[1 3], [0 1]], valid [[1 1], [1 0]]
    """
    counts = keep.sum(-1)  # (B,)
    Q = max(int(counts.max()), 1)
    # A stable sort of "not kept" puts each row's kept positions first, in their order.
    positions = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[:, :Q]
    valid = torch.arange(Q, device=keep.device) < counts[:, None]
    return positions, valid


def shared_prefix_length(
    decoder: nn.Module,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    valid: torch.Tensor,
    queries: torch.Tensor,
) -> int:
    """How many leading positions the loss-only path may compute once for all rows.

    Those whose inputs x (B, T, C) and positions are equal in every row, that are real
    tokens in every row, and that no row scores (`queries`, `valid` from positions_where):
    their outputs are then the same in every row. 0 when there is one row, when the decoder's
    `share_prefix` is off, and in training with dropout (one row's dropout masks shared by all
    is another computation) or with gradient checkpointing (its recomputation in backward would
    store the prefix twice).
    """
    if not decoder.share_prefix or x.shape[0] < 2 or not bool(valid.any()):
        return 0
    if decoder.training and (decoder.config.dropout > 0 or decoder.config.gradient_checkpointing):
        return 0
    same = (x == x[:1]).all(-1).all(0)  # (T,): position t is the same in every row
    if attention_mask is not None:
        same &= attention_mask.bool().all(0)
    if position_ids is not None and position_ids.shape[0] > 1:
        same &= (position_ids == position_ids[:1]).all(0)
    n = int(same.long().cumprod(0).sum())  # the leading run of such positions
    return min(n, int(queries[valid].min()))  # a scored position needs its own row


class SharedPrefix:
    """The keys and values of a prefix that every row of a batch shares, computed once.

    Instruction data starts every row with the same tokens: the system line and the user's tag,
    9 of the ~47 positions of a cpu-preset VQA row. A causal model's outputs at those positions
    depend on nothing after them, so they are the same in every row, and so are their keys and
    values. `loss_only_forward` runs the prefix on one row, with this object as its cache: each
    layer's first `update` stores the prefix's keys and values (1, H_kv, n, D). Then it runs
    the rest of every row, whose `update` puts the stored ones in front of the new ones,
    broadcast over the B rows: (B, H_kv, n + T_rest, D). The loss and the gradients are those
    of the whole batch (backward through `expand` sums the rows' gradients for the prefix, as B
    separate copies would); tests/test_decoder.py checks it. Servers that cache a shared system
    prompt ("prefix caching") save the same work at inference.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer_idx] is None:  # the prefix itself: remember it
            self.keys[layer_idx], self.values[layer_idx] = k, v
            return k, v
        rows = k.shape[0]
        prefix_k = self.keys[layer_idx].expand(rows, -1, -1, -1)  # a view: no copy per row
        prefix_v = self.values[layer_idx].expand(rows, -1, -1, -1)
        return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)


def query_attention_mask(
    queries: torch.Tensor, attention_mask: torch.Tensor | None, total_len: int
) -> torch.Tensor:
    """Boolean (B, 1, Q, T_total) for queries at positions `queries` (B, Q) (no cache): each
    sees the real keys up to its own position, and always itself (so no row is empty)."""
    keys = torch.arange(total_len, device=queries.device)  # (T_total,)
    allowed = keys <= queries[..., None]  # (B, Q, T_total): causal
    if attention_mask is not None:
        itself = keys == queries[..., None]
        allowed = allowed & (attention_mask.bool()[:, None, :] | itself)
    return allowed[:, None]


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...), positions (B, Q) -> (B, Q, ...): row b's entries at positions[b]."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]  # (B, 1)
    return x[rows, positions]
