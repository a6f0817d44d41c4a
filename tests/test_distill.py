"""stage: distill. The teacher is the session's memorising SFT LoRA (`memo_lora_dir`: tiny-llama + an adapter
whose greedy answers are tests/_support.MEMO_CHATS); the student is a fresh tiny-llama LoRA (same vocabulary).
Held-out prompts are paraphrases of the memorised questions, never trained on; the measures are taken
on the teacher's own greedy answers to them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from _support import MEMO_CHATS, REPO, logged_losses, memo_recipe, run_cli_in_process, write_jsonl

from finetune import config, kd, loading
from finetune.errors import RecipeError

HELD_OUT = [
    "What color is the sky?",
    "How many legs has a cat got?",
    "Which city is the capital of France?",
    "中国的首都是哪个城市？",
]


def distill_recipe(tmp: Path, teacher, name: str, data=None, steps: int = 20, **sections) -> Path:
    recipe = yaml.safe_load(memo_recipe(tmp, steps=steps))  # the SFT memo recipe, as the student's stage
    recipe["stage"], recipe["distill"] = "distill", {"teacher": str(teacher)}
    recipe["output"] = {"dir": str(tmp / name)}
    if data is not None:
        recipe["data"]["train"] = str(data)
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def train(recipe: Path, *overrides: str) -> Path:
    from finetune.stages import distill

    return distill.run(config.load(str(recipe), list(overrides)))


@pytest.fixture(scope="module")
def teacher(memo_lora_dir):
    loaded = loading.load_for_eval(str(memo_lora_dir))
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def held_out(teacher):
    """The teacher's greedy answers to the held-out prompts, and its logits on them."""
    from finetune.eval import generation

    model, tok = teacher
    prompts = [[{"role": "user", "content": q}] for q in HELD_OUT]
    answers = generation.generate(model, tok, prompts, max_new_tokens=16)
    return prompts, answers


def measure(student, teacher, held_out) -> tuple[float, float]:
    """(mean KL(teacher || student) per answer token, share of answer tokens where the greedy choices agree),
    teacher-forced on the teacher's answers to the held-out prompts."""
    model, tok = teacher
    prompts, answers = held_out
    kls, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            chat = [*prompt, {"role": "assistant", "content": answer}]
            ids = tok.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
            start = len(tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
            t = F.log_softmax(model(input_ids=ids).logits[0, start - 1 : -1].float(), -1)
            s = F.log_softmax(student(input_ids=ids).logits[0, start - 1 : -1].float(), -1)
            kls += float((t.exp() * (t - s)).sum())
            agree += int((t.argmax(-1) == s.argmax(-1)).sum())
            n += t.shape[0]
    return kls / n, agree / n


@pytest.fixture(scope="module")
def before(teacher, held_out, tiny_path):
    student = loading.load_for_eval("tiny-llama").model
    return measure(student, teacher, held_out)


def after(out: Path, teacher, held_out) -> tuple[float, float]:
    return measure(loading.load_for_eval(str(out)).model, teacher, held_out)


# ----------------------------------------------------------------------------- the loss, by hand


def by_hand(p, q, beta: float) -> torch.Tensor:
    """The divergence of the GKD paper between probability vectors p (teacher) and q (student), written out."""
    if beta == 0.0:
        return (p * (p / q).log()).sum()  # forward KL(p || q)
    if beta == 1.0:
        return (q * (q / p).log()).sum()  # reverse KL(q || p)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_loss_equals_a_hand_computed_reference(beta):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, -100, -100, -100]])
    alpha, temperature = 0.3, 2.0
    loss = kd.kd_loss(student, labels, alpha, beta, temperature, teacher=teacher)

    terms, ce, topk_terms = [], [], []
    for b in range(2):
        for t in range(5):  # logits at t predict the token at t + 1
            if labels[b, t + 1] == -100:
                continue
            p = torch.softmax(teacher[b, t] / temperature, -1)
            q = torch.softmax(student[b, t] / temperature, -1)
            terms.append(by_hand(p, q, beta))
            ce.append(-torch.log_softmax(student[b, t], -1)[labels[b, t + 1]])
            # top-3: the teacher's three tokens and one bucket for the rest of the vocabulary, both sides
            ids = p.topk(3).indices
            topk_terms.append(
                by_hand(
                    torch.cat([p[ids], 1 - p[ids].sum(0, True)]), torch.cat([q[ids], 1 - q[ids].sum(0, True)]), beta
                )
            )
    reference = alpha * torch.stack(terms).mean() + (1 - alpha) * torch.stack(ce).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)

    mask, _ = kd.answer_positions(labels)
    logprobs = torch.log_softmax(teacher[:, :-1][mask] / temperature, -1)
    top = logprobs.topk(11, -1)  # top-k over the whole vocabulary: the same loss
    cached = kd.kd_loss(student, labels, alpha, beta, temperature, topk=(top.indices, top.values))
    assert cached.item() == pytest.approx(loss.item(), rel=1e-4)
    top = logprobs.topk(3, -1)
    cached = kd.kd_loss(student, labels, alpha, beta, temperature, topk=(top.indices, top.values))
    reference = alpha * torch.stack(topk_terms).mean() + (1 - alpha) * torch.stack(ce).mean()
    assert cached.item() == pytest.approx(reference.item(), rel=1e-5)


def test_labels_mask_exactly_as_sft(tmp_path, memo_lora_dir):
    from finetune.stages import distill, sft

    recipe = config.load(str(distill_recipe(tmp_path, memo_lora_dir, "out")), [])
    as_sft = config.load(str(distill_recipe(tmp_path, memo_lora_dir, "out")), ["stage=sft", "distill=null"])
    _, _, ours = distill.prepare(recipe, dry_run=True)
    _, _, theirs = sft.prepare(as_sft, dry_run=True)
    assert [(e.input_ids, e.labels) for e in ours.train.encoded] == [
        (e.input_ids, e.labels) for e in theirs.train.encoded
    ]
    examples = [dict(input_ids=e.input_ids, labels=e.labels) for e in ours.train.encoded]
    batch = distill.Collator(0, with_prompts=True)(examples)
    mask, _ = kd.answer_positions(batch["labels"])
    for i, e in enumerate(ours.train.encoded):
        n = len(e.input_ids)
        assert batch["labels"][i, :n].tolist() == e.labels and (batch["labels"][i, n:] == -100).all()
        assert int(mask[i].sum()) == e.n_trained  # every trained token is distilled, nothing else
        first = next(j for j, x in enumerate(e.labels) if x != -100)
        prompt = batch["prompts"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        assert prompt == e.input_ids[:first]


# ----------------------------------------------------------------------------- learning, per method


@pytest.fixture(scope="module")
def logits_out(tmp_path_factory, memo_lora_dir):
    tmp = tmp_path_factory.mktemp("distill_logits")
    eval_data = write_jsonl(tmp / "heldout.jsonl", [{"messages": m} for m in MEMO_CHATS])
    recipe = distill_recipe(
        tmp,
        memo_lora_dir,
        "logits",
        distill={"alpha": 0.5, "temperature": 1.0},
        eval={"data": str(eval_data), "max_new_tokens": 16},
    )
    return train(recipe)


def test_logits_distillation_brings_the_student_to_the_teacher(logits_out, teacher, held_out, before):
    kl_after, agree_after = after(logits_out, teacher, held_out)
    print(f"logits: KL {before[0]:.3f} -> {kl_after:.3f}, agreement {before[1]:.2f} -> {agree_after:.2f}")
    assert kl_after < before[0] / 3
    assert agree_after > before[1]


def test_a_distilled_output_merges_exports_and_evaluates(logits_out, tmp_path):
    from finetune import export, merge

    report = merge.merge(str(logits_out), str(tmp_path / "merged"))
    assert report.max_delta <= report.tolerance
    lines = export.export_safetensors(str(logits_out), str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "config.json").is_file() and lines
    report = json.loads((logits_out / "eval" / "report.json").read_text())  # the recipe's eval: section
    assert report["generation"]["tuned"]["n"] == len(MEMO_CHATS)


def test_topk_cache_is_hit_on_the_second_run_and_gives_the_online_loss(tmp_path, memo_lora_dir, monkeypatch):
    from finetune.data import cache

    monkeypatch.setenv("FINETUNE_DATA_CACHE", str(tmp_path / "cache"))  # not an earlier session's entry

    vocab = 1536  # top-k over the whole tiny vocabulary: the cached loss is the online one
    online = train(distill_recipe(tmp_path, memo_lora_dir, "online", steps=6, distill={"temperature": 2.0}))
    cached = distill_recipe(tmp_path, memo_lora_dir, "cached", steps=6, distill={"temperature": 2.0, "top_k": vocab})
    passes, builds = kd.teacher_passes, cache.builds
    first = train(cached)
    assert (kd.teacher_passes, cache.builds) == (passes + 1, builds + 1)
    second = train(cached, f"output.dir={tmp_path / 'cached_again'}")
    assert (kd.teacher_passes, cache.builds) == (passes + 1, builds + 1)  # the teacher did not run
    assert logged_losses(second) == pytest.approx(logged_losses(first), rel=1e-6)
    assert logged_losses(first) == pytest.approx(logged_losses(online), rel=1e-3)
    private = train(cached, f"output.dir={tmp_path / 'private'}", 'data.cache="off"')  # computed again, not shared
    assert (kd.teacher_passes, cache.builds) == (passes + 2, builds + 1)
    assert logged_losses(private) == pytest.approx(logged_losses(first), rel=1e-6)


def test_sequences_distillation_trains_on_the_teachers_answers(tmp_path, memo_lora_dir, teacher, held_out, before):
    from finetune.eval import generation

    # the data's own answers are not the teacher's: the student must learn the teacher's
    wrong = [[m[0], {"role": "assistant", "content": "I do not know."}] for m in MEMO_CHATS]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": m} for m in wrong])
    out = train(
        distill_recipe(
            tmp_path,
            memo_lora_dir,
            "sequences",
            data=data,
            steps=30,
            distill={"method": "sequences", "max_new_tokens": 24},
        )
    )
    written = [json.loads(line) for line in (out / "distill_data" / "train.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in written] == [m[1]["content"] for m in MEMO_CHATS]
    model, tok = teacher
    student = loading.load_for_eval(str(out)).model
    prompts = [m[:1] for m in MEMO_CHATS]
    assert generation.generate(student, tok, prompts, 24) == generation.generate(model, tok, prompts, 24)
    kl_after, agree_after = measure(student, teacher, held_out)
    print(f"sequences: KL {before[0]:.3f} -> {kl_after:.3f}, agreement {before[1]:.2f} -> {agree_after:.2f}")
    assert kl_after < before[0] / 2 and agree_after > before[1]


def test_on_policy_distillation_learns_on_the_students_samples(tmp_path, memo_lora_dir, teacher, held_out, before):
    recipe = distill_recipe(
        tmp_path,
        memo_lora_dir,
        "on_policy",
        steps=20,
        distill={"method": "on_policy", "lmbda": 0.5, "beta": 0.5, "max_new_tokens": 12},
    )
    out = train(recipe)
    kl_after, agree_after = after(out, teacher, held_out)
    print(f"on_policy: KL {before[0]:.3f} -> {kl_after:.3f}, agreement {before[1]:.2f} -> {agree_after:.2f}")
    assert kl_after < before[0] / 2 and agree_after > before[1]


# ----------------------------------------------------------------------------- plans, pipelines, bad input


def test_plan_names_teacher_student_method_memory_and_cache(tmp_path, memo_lora_dir):
    """Through `finetune train --dry-run` (the CLI hands every stage's plan the --gpu-memory verdict)."""
    path = distill_recipe(tmp_path, memo_lora_dir, "out", distill={"top_k": 20})
    r = run_cli_in_process(["train", path, "--dry-run", "--gpu-memory", "24GB"], tmp_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "targets        model.layers 0-3: mlp.down_proj" in text and "fits" in text
    assert f"teacher        {memo_lora_dir} (1.18M parameters" in text
    assert "student        tiny-llama, lora" in text
    assert "logits: 0.5 x forward KL(teacher || student) at temperature 1 + 0.5 x CE" in text
    assert "top-20 per answer token, 34 tokens = 5.3 KiB" in text and "not cached yet" in text
    assert not (tmp_path / "out").exists()


def test_pipeline_names_the_teacher_by_its_stage(tmp_path):
    from finetune import pipeline

    pipe = pipeline.load(REPO / "recipes" / "pipelines" / "distill.yaml", [f"output.dir={tmp_path}"])
    sft, student = pipe.stages
    assert student.recipe.stage == "distill" and student.recipe.distill.teacher == str(tmp_path / sft.name)


def test_bad_teacher_or_settings_are_one_line_and_write_nothing(tmp_path, memo_lora_dir, tiny_path):
    for overrides, message in [
        (["distill.teacher=/nonexistent/teacher"], "distill.teacher: /nonexistent/teacher: no such directory"),
        # a relative path a hub id cannot be (namespace/name has one slash): not sent to the hub
        (["distill.teacher=outputs/tiny/missing"], "distill.teacher: outputs/tiny/missing: no such directory"),
        (["distill.alpha=1.5"], "distill.alpha: must be in [0, 1], got 1.5"),
        (["distill.temperature=0"], "distill.temperature: must be positive, got 0.0"),
        (["distill.teacher=null"], "distill.teacher: missing"),
        (["distill.lmbda=0.2"], "distill.lmbda: method logits does not use lmbda"),
    ]:
        with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            from finetune.stages import distill

            distill.run(config.load(str(distill_recipe(tmp_path, memo_lora_dir, "out")), overrides))
        assert not (tmp_path / "out").exists()
    # a teacher whose vocabulary differs (two tokens swapped): one line from the CLI, exit 2
    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_path, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    recipe = distill_recipe(tmp_path, other, "out")
    done = cli_in_process(["train", str(recipe)], tmp_path)
    assert done["returncode"] == 2, done["stderr"]
    error = done["stderr"].strip().splitlines()[-1]
    assert f"{other} and the student tiny-llama have different vocabularies (first difference: id 300 is {b!r}" in (
        error
    )
    assert "Traceback" not in done["stderr"] and not (tmp_path / "out").exists()


def cli_in_process(argv: list[str], cwd: Path) -> dict:
    """`finetune ARGV` as the console script runs it, in this process (no second torch import);
    the `finetune` logger is left as it was."""
    import logging

    from _cli_batch import run_one

    logger = logging.getLogger("finetune")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        return run_one(argv, str(cwd))
    finally:
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
