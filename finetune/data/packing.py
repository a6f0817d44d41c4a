"""Packing, as TRL's `bfd` strategy packs (`train.packing: true`): how many rows the examples become, for the plan
and `data preview`, computed from their lengths alone.

TRL packs best-fit decreasing: the longest example first, each into the open row with the least room that still
holds it, else a new row; examples longer than the row are truncated. Each packed row keeps per-example
`position_ids` and no attention mask, and transformers' sdpa and eager attention then keep every example to itself
(tests/test_packing.py checks the log-probabilities)."""

from __future__ import annotations

import bisect

# Attention implementations that keep packed examples apart (from the per-example position_ids); any other one
# would let an example attend to the one packed before it, so packing refuses it.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def packed_rows(lengths, seq_length: int) -> int:
    """Rows of at most `seq_length` tokens that TRL's best-fit-decreasing packing makes of these lengths."""
    room: list[int] = []  # free space of the open rows, sorted
    rows = 0
    for n in sorted((min(n, seq_length) for n in lengths if n > 0), reverse=True):
        i = bisect.bisect_left(room, n)
        if i < len(room):
            space = room.pop(i)
        else:
            space, rows = seq_length, rows + 1
        if space > n:
            bisect.insort(room, space - n)
    return rows
