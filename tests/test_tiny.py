"""finetune.tiny: the locally built tiny model every CPU test and the quickstart use.

The properties the rest of the suite leans on: it builds once per cache and is then a
cache hit; it is a plain HF dir; its tokenizer round-trips any text and its chat template
marks exactly the assistant tokens; pre-training made it a (very small) language model on
which LoRA with a frozen lm_head learns; and the corpus covers every token of the demo data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from _support import heldout_loss, lora_check

from finetune import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_path) -> pathlib.Path:
    return pathlib.Path(tiny_path)


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def info(model_dir) -> dict:
    return json.loads((model_dir / tiny.INFO_FILE).read_text(encoding="utf-8"))


def _load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --------------------------------------------------------------------------- resolve / cache


def test_resolve_builds_once_then_hits_the_cache(model_dir, info, monkeypatch):
    root = tiny.cache_root()
    assert root == pathlib.Path(os.environ["FINETUNE_CACHE"]).absolute()
    spec = tiny.TINY_MODELS["tiny-llama"]
    assert model_dir == root / "tiny" / f"tiny-llama-{tiny.fingerprint(spec)[:12]}"
    assert info["fingerprint"] == tiny.fingerprint(spec)
    stamp = (model_dir / tiny.INFO_FILE).stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cache hit expected, but the model was rebuilt")

    monkeypatch.setattr(tiny, "_build_into", no_rebuild)
    assert tiny.build_if_tiny("tiny-llama") == str(model_dir)
    assert tiny.build("tiny-llama") == model_dir
    assert (model_dir / tiny.INFO_FILE).stat().st_mtime_ns == stamp
    assert not list(model_dir.parent.glob(f".{model_dir.name}.tmp-*")), "temp build dirs left behind"


def test_resolve_passes_other_names_through_and_rejects_unknown_tiny_names(tmp_path):
    assert tiny.build_if_tiny("some/hub-id") == "some/hub-id"
    assert tiny.build_if_tiny("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert tiny.build_if_tiny(str(tmp_path)) == str(tmp_path)
    local = tmp_path / "tiny-llama"
    local.mkdir()
    assert not tiny.is_tiny(str(local))  # an existing path is a path, even if it looks tiny
    assert tiny.is_tiny("tiny-llama") and tiny.is_tiny("tiny-nope")
    with pytest.raises(ValueError, match="tiny-nope.*valid names: .*tiny-llama"):
        tiny.build_if_tiny("tiny-nope")
    with pytest.raises(ValueError, match="tiny-llama"):
        tiny.build("tiny-nope")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "a"))
    assert tiny.cache_root() == tmp_path / "a"
    monkeypatch.delenv("FINETUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny.cache_root() == tmp_path / "xdg" / "finetune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny.cache_root() == tmp_path / "home" / ".cache" / "finetune"


def test_fingerprint_covers_spec_and_build_version(monkeypatch):
    spec = tiny.TINY_MODELS["tiny-llama"]
    fp = tiny.fingerprint(spec)
    assert tiny.fingerprint(dataclasses.replace(spec, seed=spec.seed + 1)) != fp
    assert tiny.fingerprint(dataclasses.replace(spec, pretrain_steps=spec.pretrain_steps + 1)) != fp
    monkeypatch.setattr(tiny, "BUILD_VERSION", tiny.BUILD_VERSION + 1)
    assert tiny.fingerprint(spec) != fp


# --------------------------------------------------------------------------- the artefact


def test_dir_is_a_plain_hf_model(model_dir, tok, info):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert (model_dir / "model.safetensors").is_file()
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    model = _load_model(model_dir)
    assert model.config.vocab_size == len(tok)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    spec = tiny.TINY_MODELS["tiny-llama"]
    assert model.config.max_position_embeddings == tok.model_max_length == spec.max_positions


def test_tokenizer_round_trips_any_text(tok):
    texts = [
        "Hello, world! The QUICK brown fox (aged 3) costs $12.50; isn't it?",
        "你好，世界！今天天气怎么样？“很好。”（真的）、：；",
        "Mixed 中英文 text, with digits 0123456789 and\nnew lines\n\n  and  spaces\t.",
        "Emoji and rare scripts still encode: 🙂 ÅΩж ß",
        "def f(x):\n    return {'a': [1, 2]}  # code",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
    # Llama convention: plain encoding prepends exactly one <s>; no </s> is appended.
    ids = tok("Hello")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and tok.eos_token_id not in ids
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    specials |= {tok.convert_tokens_to_ids(t) for t in tiny.ROLE_TOKENS}
    assert len(specials) == 6 and None not in specials and tok.unk_token_id not in specials
    assert tok.padding_side == "right"
    for role in tiny.ROLE_TOKENS:  # one token each, never split
        assert len(tok(role, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_masks_exactly_the_assistant_turns(tok):
    chat = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "用中文说一遍。"},
        {"role": "assistant", "content": "二加三等于五。"},
    ]
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert len(mask) == len(ids)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "2 + 3 = 5.</s>二加三等于五。</s>"
    assert masked.count(tok.eos_token_id) == 2 and ids[-1] == tok.eos_token_id and mask[-1] == 1
    # the generation span == "prefix with generation prompt" -> "prefix + assistant turn"
    full = tok.apply_chat_template(chat, tokenize=False)
    for k in (2, 4):
        prompt = tok.apply_chat_template(chat[:k], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(chat[: k + 1], tokenize=False)
        assert full.startswith(upto) and upto.startswith(prompt)
        assert upto[len(prompt) :] == chat[k]["content"] + tok.eos_token
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_pretraining_made_a_language_model(model_dir, tok, info):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert info["final_loss"] < 0.5 * info["init_loss"], info
    model = _load_model(model_dir)
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).eval()

    trained, rand = heldout_loss(model, tok), heldout_loss(random_model, tok)
    print(f"held-out loss: pre-trained {trained:.3f}, random init {rand:.3f}")
    assert trained < 0.6 * rand

    # It generates, and it has learned the chat layout well enough to stop with </s>.
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1] :].tolist()
    print("generated:", repr(tok.decode(new)))
    assert len(new) > 1
    assert tok.eos_token_id in new


# --------------------------------------------------------------------------- build properties


SMALL_BUILD = dataclasses.replace(tiny.TINY_MODELS["tiny-llama"], pretrain_steps=6, pretrain_batch=4)


def test_build_is_deterministic_and_force_rebuilds(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setitem(tiny.TINY_MODELS, "tiny-small", SMALL_BUILD)
    a = tiny.build("tiny-small", cache_root=tmp_path / "a")
    b = tiny.build("tiny-small", cache_root=tmp_path / "b")
    assert a.name == b.name and a != b
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    ia, ib = (json.loads((d / tiny.INFO_FILE).read_text()) for d in (a, b))
    assert ia["first_train_losses"] == ib["first_train_losses"] and ia["final_loss"] == ib["final_loss"]

    stamp = (a / tiny.INFO_FILE).stat().st_mtime_ns
    assert tiny.build("tiny-small", cache_root=tmp_path / "a", force=True) == a
    assert (a / tiny.INFO_FILE).stat().st_mtime_ns != stamp
    assert torch.equal(load_file(a / "model.safetensors")["lm_head.weight"], wb["lm_head.weight"])
    assert sorted(p.name for p in (tmp_path / "a" / "tiny").iterdir()) == [a.name, a.name + ".lock"]


def test_concurrent_resolve_builds_once(tmp_path):
    """Two processes (as in a 2-process DDP launch) resolve at once: one builds, both get it."""
    code = textwrap.dedent(
        f"""
        import dataclasses, sys
        from finetune import tiny
        tiny.TINY_MODELS["tiny-small"] = dataclasses.replace(
            tiny.TINY_MODELS["tiny-llama"], pretrain_steps={SMALL_BUILD.pretrain_steps},
            pretrain_batch={SMALL_BUILD.pretrain_batch})
        print(tiny.build_if_tiny("tiny-small"))
        """
    )
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(paths) == 1
    assert sum(e.count("finetune: building tiny-small") for _, e in outs) == 1, outs
    built = pathlib.Path(paths.pop())
    assert (built / tiny.INFO_FILE).is_file()
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name, built.name + ".lock"]


# --------------------------------------------------------------------------- fitness for the suite


def _data_strings():
    def walk(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list):
            for v in x:
                yield from walk(v)

    for path in sorted((REPO / "data").glob("*.json")) + sorted((REPO / "data").glob("*.jsonl")):
        text = path.read_text(encoding="utf-8")
        rows = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else [json.loads(text)]
        )
        for row in rows:
            for s in walk(row):
                yield path.name, s


def test_corpus_covers_every_token_of_the_demo_data(tok):
    """A token the pre-training never saw keeps a near-zero lm_head row that LoRA cannot
    raise (STACK_NOTES, "The tiny-model trap"): every demo-data token must occur in the
    tokenized corpus. On failure, add natural sentences with the listed text to the corpus."""
    seen = {i for ids in tok(tiny.corpus_texts(), add_special_tokens=False)["input_ids"] for i in ids}
    seen |= {tok.convert_tokens_to_ids(t) for t in (*tiny.ROLE_TOKENS, tiny.BOS, tiny.EOS, tiny.PAD)}
    seen |= set(tok("\n", add_special_tokens=False)["input_ids"])  # the chat template's newline
    strings = list(_data_strings())
    missing: dict[int, str] = {}
    for (name, _s), ids in zip(strings, tok([s for _, s in strings], add_special_tokens=False)["input_ids"]):
        for j, i in enumerate(ids):
            if i not in seen and i not in missing:
                missing[i] = f"{tok.decode([i])!r} in {name}: ...{tok.decode(ids[max(0, j - 3) : j + 4])!r}..."
    print(f"{len(strings)} demo-data strings checked")
    assert not missing, "demo-data tokens absent from the tiny corpus:\n" + "\n".join(missing.values())


def test_lora_on_all_linear_learns_on_the_pretrained_base(model_dir, tok):
    """The property the suite depends on: LoRA r=8 on all-linear (lm_head frozen), loss on
    the answers only, memorises 4 Q/A chats within ~100 steps."""
    first, last, trainable = lora_check(_load_model(model_dir), tok, steps=100, lr=2e-3, seed=0)
    assert trainable and not any("lm_head" in n or "embed" in n for n in trainable)
    print(f"LoRA answer loss: {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first
