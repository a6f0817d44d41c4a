"""Knowledge-distillation pieces the `distill` stage uses: the loss, and the teacher's top-k cache.

The loss. Per answer token (the positions SFT trains, `labels != -100`, shifted as the causal LM
predicts them): `alpha * D(teacher, student) + (1 - alpha) * CE(student, label)`, averaged over the
batch's answer tokens. D is TRL's `GKDTrainer.generalized_jsd_loss` (a public static method,
trl.experimental.gkd, TRL 1.12): both distributions softened by `temperature` (no T^2 factor, as
TRL's GKD), `beta` 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), in between
the generalized JSD of the GKD paper (Agarwal et al. 2024, eq. 1). The cross-entropy is at temperature 1.

The top-k cache (`distill.top_k`). The teacher's log-probabilities at `temperature` are computed once,
for every answer token of every sequence, and only the k largest kept with their token ids: 8 bytes a
(token, k) pair. The divergence is then taken over k + 1 outcomes, the k tokens and "the rest of the
vocabulary" (mass 1 - sum of the k), for teacher and student alike: exact for that coarse distribution,
and equal to the full one when k covers the vocabulary. The cache lives in the prepared-data cache
(`finetune.data.cache`), keyed by the teacher's content, the encoded data, k and temperature; a
sequence is found in it by the digest of its token ids and labels, so the trainer's shuffling, the
length-grouped sampler or another student with the same tokenizer need no index column.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("finetune")

IGNORE = -100
CACHE_VERSION = 1
REST_FLOOR = -30.0  # log of the rest-of-vocabulary mass when the k tokens hold (almost) all of it
teacher_passes = 0  # teacher passes over a split run by this process (tests count cache hits with it)


def _generalized_jsd():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def divergence(student_logits, teacher_logits, beta: float, temperature: float) -> torch.Tensor:
    """Sum over rows of the generalized JSD between full distributions ([tokens, vocab] logits each)."""
    return _generalized_jsd()(student_logits, teacher_logits, beta=beta, temperature=temperature, reduction="sum")


def _log_rest(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_probs))) over the last dim, kept finite (>= REST_FLOOR)."""
    top = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-12)
    rest = torch.where(top > -0.693, torch.log(-torch.expm1(top)), torch.log1p(-torch.exp(top)))
    return rest.clamp(min=REST_FLOOR)


def topk_divergence(student_logits, topk_ids, topk_logprobs, beta: float, temperature: float) -> torch.Tensor:
    """Sum over rows of the generalized JSD over the teacher's k tokens + the rest of the vocabulary.
    `topk_logprobs`: the teacher's log-probabilities at `temperature` (full-vocabulary normalised)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    student_k = student.gather(-1, topk_ids.long())
    teacher_k = topk_logprobs.float()
    s = torch.cat([student_k, _log_rest(student_k)], dim=-1)
    t = torch.cat([teacher_k, _log_rest(teacher_k)], dim=-1)
    return _generalized_jsd()(s, t, beta=beta, temperature=1.0, reduction="sum")


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over the [batch, seq-1] shifted positions that predict an answer token, their target tokens)."""
    target = labels[:, 1:]
    mask = target != IGNORE
    return mask, target[mask]


def kd_loss(
    student_logits, labels, alpha: float, beta: float, temperature: float, teacher=None, topk=None, items=None
):
    """The distillation loss of one batch. `student_logits`: [batch, seq, vocab] (or the answer positions'
    rows, [tokens, vocab], with `labels` then the [tokens] targets); `teacher`: the teacher's logits of
    the same shape, or `topk`: (ids, logprobs) rows of the answer tokens in batch order. `items`: the
    number of answer tokens to average over (the trainer's count across gradient accumulation)."""
    if student_logits.dim() == 3:
        mask, target = answer_positions(labels)
        student = student_logits[:, :-1][mask]
        teacher = teacher[:, :-1][mask] if teacher is not None else None
    else:
        student, target = student_logits, labels
    denom = items if items is not None else max(int(target.numel()), 1)
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    if topk is not None:
        kd = topk_divergence(student, topk[0], topk[1], beta, temperature)
    else:
        vocab = min(student.shape[-1], teacher.shape[-1])  # padded embedding rows beyond the tokenizer differ
        kd = divergence(student[:, :vocab].float(), teacher[:, :vocab].float(), beta, temperature)
    ce = F.cross_entropy(student.float(), target, reduction="sum") if alpha < 1 else kd * 0.0
    return (alpha * kd + (1 - alpha) * ce) / denom


# ----------------------------------------------------------------------------- the top-k cache


def row_digest(input_ids, labels) -> bytes:
    """What finds a sequence in the cache: its token ids and labels (unpadded)."""
    import xxhash

    h = xxhash.xxh3_128()
    h.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.digest()


def split_rows(split) -> tuple[list[list[int]], list[list[int]]]:
    ids, labels = [], []
    for batch in split.table.select_columns(["input_ids", "labels"]).iter(batch_size=1000):
        ids += batch["input_ids"]
        labels += batch["labels"]
    return ids, labels


def cache_key(teacher_fingerprint: str, splits, k: int, temperature: float) -> tuple[str, list]:
    """(the cache key, the unique rows (ids, labels) to run the teacher on, in a fixed order)."""
    from finetune.data import cache

    seen, rows = set(), []
    for split in splits:
        for ids, labels in zip(*split_rows(split)):
            d = row_digest(ids, labels)
            if d not in seen:
                seen.add(d)
                rows.append((ids, labels))
    import xxhash

    h = xxhash.xxh3_128()
    for ids, labels in rows:
        h.update(row_digest(ids, labels))
    parts = {"kind": "teacher-topk", "version": CACHE_VERSION, "teacher": teacher_fingerprint}
    parts.update(data=h.hexdigest(), k=k, temperature=temperature)
    return cache.key_of(parts), rows


def n_answer_tokens(labels) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE)


def cache_bytes(n_tokens: int, k: int) -> int:
    """Disk (and, read through, memory-map) cost of the cache: an int32 id and a float32 log-prob per pair."""
    return n_tokens * k * 8


@torch.no_grad()
def build_topk(teacher, rows, k: int, temperature: float, batch_size: int, out: Path, pad_id: int, vocab: int) -> dict:
    """Run the teacher over `rows` (right-padded batches) and write its top-k answer-token log-probs into `out`.
    Only the tokenizer's `vocab` ids count (a teacher's padded embedding rows beyond it are no tokens)."""
    global teacher_passes
    start = time.perf_counter()
    device = next(teacher.parameters()).device
    vocab = min(vocab, teacher.get_output_embeddings().weight.shape[0])
    k = min(k, vocab)
    counts = [n_answer_tokens(labels) for _, labels in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    total = int(offsets[-1])
    ids_out = np.lib.format.open_memmap(out / "ids.npy", mode="w+", dtype=np.int32, shape=(total, k))
    lp_out = np.lib.format.open_memmap(out / "logprobs.npy", mode="w+", dtype=np.float32, shape=(total, k))
    for start_row in range(0, len(rows), batch_size):
        batch = rows[start_row : start_row + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):
            input_ids[i, : len(ids)], labels[i, : len(ids)], attention[i, : len(ids)] = (
                torch.tensor(ids),
                torch.tensor(lab),
                1,
            )
        logits = teacher(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        mask, _ = answer_positions(labels.to(device))
        picked = F.log_softmax(logits[:, :-1][mask][:, :vocab].float() / temperature, dim=-1)
        top = picked.topk(k, dim=-1)
        a, b = int(offsets[start_row]), int(offsets[start_row + len(batch)])
        ids_out[a:b] = top.indices.cpu().numpy()
        lp_out[a:b] = top.values.cpu().numpy()
    ids_out.flush()
    lp_out.flush()
    np.save(out / "offsets.npy", offsets)
    np.save(out / "keys.npy", np.frombuffer(b"".join(row_digest(i, la) for i, la in rows), dtype=np.uint8))
    teacher_passes += 1
    seconds = time.perf_counter() - start
    return {
        "kind": "teacher-topk",
        "sequences": len(rows),
        "answer_tokens": total,
        "k": k,
        "temperature": temperature,
        "bytes": cache_bytes(total, k),
        "seconds": round(seconds, 2),
    }


class TopK:
    """A finished top-k cache entry, memory-mapped: `rows(input_ids, labels)` for a padded batch."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        load = dict(mmap_mode="r", allow_pickle=False)
        self.ids = np.load(self.path / "ids.npy", **load)
        self.logprobs = np.load(self.path / "logprobs.npy", **load)
        self.offsets = np.load(self.path / "offsets.npy", allow_pickle=False)
        keys = np.load(self.path / "keys.npy", allow_pickle=False).reshape(-1, 16)
        self.index = {bytes(key): i for i, key in enumerate(keys)}

    def rows(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
        """(ids, logprobs) of the batch's answer tokens, in the order `answer_positions` visits them."""
        ids, lps = [], []
        for row_ids, row_labels, row_mask in zip(input_ids.tolist(), labels.tolist(), attention_mask.tolist()):
            n = sum(row_mask)
            j = self.index.get(row_digest(row_ids[:n], row_labels[:n]))
            if j is None:
                raise KeyError(
                    f"{self.path}: a training sequence is not in the teacher's top-k cache (the data changed "
                    "after it was built); run again with data.cache=refresh"
                )
            a, b = int(self.offsets[j]), int(self.offsets[j + 1])
            ids.append(self.ids[a:b])
            lps.append(self.logprobs[a:b])
        device = input_ids.device
        return (
            torch.from_numpy(np.concatenate(ids)).to(device),
            torch.from_numpy(np.concatenate(lps)).to(device),
        )
