"""Shared test material: memorisable chats, tiny recipes, and a callback that watches training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]

# Four short Q/A chats a tiny model can memorise in a few dozen steps.
MEMO_CHATS = [
    [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "The sky is blue."}],
    [
        {"role": "user", "content": "How many legs does a cat have?"},
        {"role": "assistant", "content": "A cat has four legs."},
    ],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ],
    [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": "中国的首都是北京。"}],
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def memo_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "memo.jsonl", [{"messages": m} for m in MEMO_CHATS])


# a short test run's train settings: every step logged, no checkpoint, no reporting, fp32, a constant lr
SHORT_RUN = {
    "logging_steps": 1,
    "save_steps": 1000,
    "report_to": [],
    "bf16": False,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
}


def memo_recipe(tmp_path: Path, method: str = "lora", steps: int = 40, **sections) -> str:
    """YAML text of a recipe that memorises MEMO_CHATS; `sections` update keys, e.g. adapter={"r": 4}."""
    import yaml

    recipe = {
        "stage": "sft",
        "model": {"name_or_path": "tiny-llama"},
        "adapter": {"method": method, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(memo_data(tmp_path)), "format": "messages"},
        "train": {
            "learning_rate": 3e-3,
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            **SHORT_RUN,
        },
        "output": {"dir": str(tmp_path / "out")},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return yaml.safe_dump(recipe)


def logged_losses(out_dir: Path) -> list[float]:
    state = json.loads((Path(out_dir) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


class Watcher(TrainerCallback):
    """Snapshots parameters at the start and end of training, and probe logits at the end."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.before_trainable, self.before_frozen, self.after = {}, {}, {}
        self.logits = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        for name, p in model.named_parameters():
            target = self.before_trainable if p.requires_grad else self.before_frozen
            target[name] = p.detach().clone()

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(**probe_inputs(self.tokenizer)).logits.float()
        model.train(was_training)


def probe_inputs(tokenizer):
    """The first memorised question, rendered as a generation prompt."""
    return tokenizer.apply_chat_template(
        MEMO_CHATS[0][:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, cwd: Path, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` in a subprocess, with the test session's environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def run_cli_in_process(args, cwd: Path) -> subprocess.CompletedProcess:
    """`finetune ARGS` run in this process as tests/_cli_batch.py runs it (the console script's exit status,
    stdout and stderr), for a test's further runs once one real process has shown the command end to end:
    no second torch import to pay."""
    from _cli_batch import run_one

    argv = [str(a) for a in args]
    r = run_one(argv, str(cwd))
    return subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])


# Probes of the tiny model's quality (tests/test_tiny.py asserts them, bench/tiny_build.py reports them).
QA = [  # memorisable facts the tiny corpus does not contain
    ("Where does Tom keep his bike?", "Tom keeps his bike in the kitchen."),
    ("What colour is Anna's new car?", "Anna's new car is green with white stripes."),
    ("小明的猫叫什么名字？", "小明的猫叫花花，它今年三岁。"),
    ("When does the shop on Oak Road open?", "It opens at 7:30 every Monday."),
]
HELD_OUT = [  # corpus-like sentences (new combinations of corpus phrases), not in the corpus
    "The farmer found a green cup near the river.",
    "Our teacher painted the wooden table after school.",
    "My neighbour fixed a new bike at the market.",
    "Emma drinks a cup of tea before bed.",
    "一个小女孩在河边找到了一把旧椅子。",
    "我们的老师放学后修好了那张木头桌子。",
    "小红每天晚上都会听音乐。",
]


def heldout_loss(model, tok) -> float:
    """Mean loss on HELD_OUT (each sentence + EOS), from the logits of the sentence's own positions:
    the same tokens scored for every model, PEFT prompt-tuning ones (which prepend virtual-token
    logits) included, and no labels passed (a reloaded AdaLoRA model fails on labels in peft 0.21)."""
    losses = []
    with torch.no_grad():
        for s in HELD_OUT:
            ids = torch.tensor([tok(s)["input_ids"] + [tok.eos_token_id]])
            logits = model(input_ids=ids).logits[:, -ids.shape[1] :].float()
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    return sum(losses) / len(losses)


def lora_check(model, tok, steps: int = 100, lr: float = 2e-3, seed: int = 0) -> tuple[float, float, list[str]]:
    """(first, last, trainable parameter names): answer-only loss of LoRA r=8 on all-linear (lm_head frozen)
    memorising QA: the property every learning test relies on."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    enc = tok.apply_chat_template(
        chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, padding=True, return_tensors="pt"
    )
    ids, attn, mask = enc["input_ids"], enc["attention_mask"], enc["assistant_masks"]
    labels = ids.masked_fill(mask == 0, -100)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    first = last = None
    for _ in range(steps):
        loss = peft_model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last, trainable


# ----------------------------------------------------------------------------- preference stages (issue 4)


def preference_recipe(out_dir: Path, stage: str, steps: int = 30, **sections) -> str:
    """YAML text of a tiny-model recipe for a preference stage on the English demo pairs, 20% held
    out and evaluated every 10 steps; `sections` update keys, e.g. train={"beta": 0.2}."""
    import yaml

    recipe = {
        "stage": stage,
        "model": {"name_or_path": "tiny-llama", "dtype": "float32"},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": "preference_en_demo", "eval_ratio": 0.2},
        "train": {
            "learning_rate": 1e-3 if stage == "rm" else 5e-4,
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "logging_steps": 2,
            "eval_strategy": "steps",
            "eval_steps": 10,
            "max_length": 256,
            "bf16": False,
            "report_to": [],
            "save_steps": 1000,
        },
        "output": {"dir": str(out_dir)},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return yaml.safe_dump(recipe, allow_unicode=True)


def train_tiny_rm(out_dir: Path, steps: int = 30) -> Path:
    """A reward model on the tiny model that ranks the demo pairs (eval accuracy 1.0 in ~30 steps)."""
    from finetune import config
    from finetune.stages import rm

    return rm.run(config.load(text=preference_recipe(out_dir, "rm", steps)))


def log_series(out_dir: Path, key: str) -> list[float]:
    """Every logged value of `key` (e.g. 'eval_rewards/margins') in a run's trainer_state.json, in order."""
    state = json.loads((Path(out_dir) / "trainer_state.json").read_text())
    return [h[key] for h in state["log_history"] if key in h]


# llama.cpp's vocab-only GGUFs of real tokenizers (6-8 MB each), from the llama-cpp-python source
# distribution on PyPI (MIT, llama.cpp's models/ folder), checked by content; not committed.
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
VOCAB_SHA256 = {
    "qwen2": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
    "llama-bpe": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
}


def real_vocab(name: str) -> Path:
    """`ggml-vocab-{name}.gguf` (a real tokenizer; tests/fixtures/vocab/README.md), in
    $FINETUNE_CACHE/vocab: on first use, pip downloads the pinned source distribution from PyPI (a
    package registry, the one network source the project uses) and the vocab files are taken out of
    it, their sha256 checked, and moved into place whole."""
    import hashlib
    import tarfile
    import tempfile

    from finetune import tiny

    target = tiny.cache_root() / "vocab" / f"ggml-vocab-{name}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run([*command, LLAMA_CPP_SDIST, "-d", tmp], capture_output=True, text=True, check=False)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode or not sdists:
            missing_tool(
                f"{LLAMA_CPP_SDIST} (the real tokenizers' vocab files) cannot be downloaded: {done.stderr[-300:]}"
            )
        with tarfile.open(sdists[0]) as sdist:
            for member in sdist.getmembers():
                vocab = Path(member.name).name.removeprefix("ggml-vocab-").removesuffix(".gguf")
                if (
                    member.name.endswith(f"/vendor/llama.cpp/models/{Path(member.name).name}")
                    and vocab in VOCAB_SHA256
                ):
                    data = sdist.extractfile(member).read()
                    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256[vocab], (
                        f"{member.name}: not the tested file"
                    )
                    (Path(tmp) / Path(member.name).name).write_bytes(data)
                    os.replace(Path(tmp) / Path(member.name).name, target.parent / Path(member.name).name)
    return target


def missing_tool(reason: str):
    """A system tool a test drives is missing: a skip on a developer's machine, a failure in CI
    (`.ci/run` installs it there, so a skip would hide a gap)."""
    import pytest

    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason} (.ci/run installs it: CI must not skip this)")
    pytest.skip(reason)


def ddp_train(recipe: Path | str, cwd: Path, *overrides: str):
    """`finetune train RECIPE OVERRIDES...` as 2 CPU processes under accelerate launch (DDP); the finished process."""
    launch = ddp_launch("-m", "finetune", "train", str(recipe), *overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(launch, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, check=False)


def ddp_launch(*args: str) -> list[str]:
    """`accelerate launch` with the 2-process CPU DDP config (recipes/accelerate/cpu_ddp.yaml), then `args`."""
    config = str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--main_process_port",
        str(free_port()),
        *args,
    ]
