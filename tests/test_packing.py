"""Packing (`train.packing: true`) is exact: the demo chats, encoded by finetune with answer-only labels, packed
as TRL packs them (best-fit decreasing, per-example position_ids, no attention mask) give every trained token
the same log-probability as the examples run one by one, under sdpa and eager, on several architectures
(sliding windows and experts included); the labelled tokens are the same ones; the plan's packed-row count is
TRL's."""

from __future__ import annotations

import pytest
import torch

from finetune import config, data
from finetune.data.encode import options_of
from finetune.data.packing import packed_rows

ARCHS = ("llama", "qwen3", "gemma3-sliding", "qwen3-moe")


def tiny_config(kind: str, vocab: int, attn: str):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        attn_implementation=attn,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if kind == "gemma3-sliding":  # a sliding window much shorter than the packed rows
        return Gemma3TextConfig(
            **common, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        )
    if kind == "qwen3-moe":
        return Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def encoded(tiny_path):
    """The shipped demo chats encoded as `finetune train` encodes them (max_length 96), 24 of them."""
    recipe = config.load(
        "recipes/tiny/sft_lora.yaml",
        [f"model.name_or_path={tiny_path}", "data.eval_ratio=0", "train.max_length=96"],
    )
    from finetune import loading

    tok = loading.load_tokenizer(recipe.model)
    prepared = data.load(recipe.data, tok, 96, options=options_of(recipe))
    rows = prepared.train.dataset(with_length=False).select(range(24))
    return tok, rows


def labelled_logprobs(logits, labels):
    """log p(label) at every position whose next-token label is trained, in order."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = labels[1:]
    keep = target != -100
    return logp[keep].gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ARCHS)
def test_packed_rows_give_every_trained_token_the_unpacked_log_probability(encoded, kind, attn):
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok, rows = encoded
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tok), attn)).eval()
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)

    alone = {}
    with torch.no_grad():
        for ex in rows:
            ids = torch.tensor([ex["input_ids"]])
            logits = model(input_ids=ids, use_cache=False).logits[0]
            alone[tuple(ex["input_ids"])] = labelled_logprobs(logits, torch.tensor(ex["labels"]))

    packed = pack_dataset(rows, seq_length=160, strategy="bfd")
    assert len(packed) < len(rows)  # it really packs
    seen = 0
    with torch.no_grad():
        for row in packed:
            batch = collate([row])
            # as SFTTrainer.compute_loss calls it: no cache (transformers only finds the packed examples in the
            # position_ids when there is none), no attention mask
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            start = 0
            for length in row["seq_lengths"]:
                ids = tuple(row["input_ids"][start : start + length])
                labels = batch["labels"][0, start : start + length]
                got = labelled_logprobs(logits[start : start + length], labels)
                torch.testing.assert_close(got, alone[ids], atol=2e-5, rtol=1e-5)
                start += length
                seen += 1
    assert seen == len(rows)  # every example, once


def test_packing_keeps_exactly_the_answer_labels(encoded):
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok, rows = encoded
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    packed = pack_dataset(rows, seq_length=160, strategy="bfd")
    trained_alone = sum(sum(label != -100 for label in ex["labels"][1:]) for ex in rows)
    trained_packed = 0
    for row in packed:
        labels = collate([row])["labels"][0]
        start = 0
        for length in row["seq_lengths"]:
            segment = labels[start : start + length]
            original = torch.tensor(row["labels"][start : start + length])
            assert segment[0] == -100 and torch.equal(segment[1:], original[1:])  # answer-only labels kept
            trained_packed += int((segment != -100).sum())
            start += length
    assert trained_packed == trained_alone


@pytest.mark.parametrize("seq_length", [96, 160, 512])
def test_the_plans_packed_row_count_is_trls(encoded, seq_length):
    from trl.data_utils import pack_dataset

    _, rows = encoded
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert packed_rows(lengths, seq_length) == len(pack_dataset(rows, seq_length=seq_length, strategy="bfd"))


def dry_run(capsys, *args) -> tuple[int, str, str]:
    from finetune import cli

    code = cli.main(["train", *args, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_plan_says_how_many_rows_packing_makes(capsys, tiny_path, encoded):
    code, out, _ = dry_run(
        capsys, "recipes/tiny/sft_lora.yaml", f"model.name_or_path={tiny_path}", "train.packing=true"
    )
    assert code == 0, out
    line = next(line for line in out.splitlines() if "packing:" in line)
    examples, rows = (int(x.replace(",", "")) for x in __import__("re").findall(r"([\d,]+) (?:examples|rows)", line))
    assert 0 < rows < examples and "each example attends only to itself" in line


@pytest.mark.parametrize(
    ("recipe", "override", "expected"),
    [
        (
            "sft_lora",
            "train.use_liger_kernel=true",
            "train.use_liger_kernel: Liger's fused kernels (Triton) needs a CUDA GPU",
        ),
        ("grpo_lora", "train.use_vllm=true", "train.use_vllm: vLLM generation needs a CUDA GPU"),
        ("sft_lora", "model.attn_implementation=flash_attention_1", "packed examples would attend to each other"),
    ],
)
def test_features_this_machine_cannot_run_are_one_line(capsys, tiny_path, recipe, override, expected):
    extra = ["train.packing=true"] if "attn" in override else []
    code, out, err = dry_run(
        capsys, f"recipes/tiny/{recipe}.yaml", f"model.name_or_path={tiny_path}", override, *extra
    )
    errors = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert code == 2 and out == "" and len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err


def test_qlora_with_vllm_is_refused_before_anything_loads(monkeypatch, tiny_path):
    from finetune.errors import RecipeError
    from finetune.stages import common

    recipe = config.load(
        "recipes/tiny/grpo_lora.yaml",
        [f"model.name_or_path={tiny_path}", "adapter.method=qlora", "train.use_vllm=true"],
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine with vllm installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    with pytest.raises(RecipeError, match="merging the adapter into the 4-bit base"):
        common.check_throughput_features(recipe)
