"""Build the tiny model with a (possibly modified) spec and print what it costs and buys.

    python bench/tiny_build.py                       # the shipped tiny-llama spec
    python bench/tiny_build.py pretrain_steps=300 pretrain_seq_len=64 vocab_size=1024

Prints: build seconds, pre-training loss vs random-init loss, loss on held-out sentences,
and the LoRA learnability check (r=8, all-linear, lm_head frozen, answer-only loss on
4 memorisable Q/A chats) on the pre-trained base and on a random base of the same shape.
A figure, not a test: tests/test_tiny.py asserts the properties.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time

import torch

from finetune import tiny

QA = [
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
    losses = []
    with torch.no_grad():
        for s in HELD_OUT:
            ids = torch.tensor([tok(s)["input_ids"] + [tok.eos_token_id]])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def lora_check(model, tok, steps: int = 100, lr: float = 2e-3, seed: int = 0) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    enc = tok.apply_chat_template(chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  padding=True, return_tensors="pt")
    ids, attn, mask = enc["input_ids"], enc["attention_mask"], enc["assistant_masks"]
    labels = ids.masked_fill(mask == 0, -100)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    first = last = None
    for _ in range(steps):
        loss = peft_model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


def main(argv: list[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = {}
    for arg in argv:
        k, _, v = arg.partition("=")
        field = {f.name: f for f in dataclasses.fields(tiny.TinySpec)}[k]
        overrides[k] = type(getattr(tiny.TinySpec(), field.name))(v)
    spec = dataclasses.replace(tiny.TINY_MODELS["tiny-llama"], **overrides)
    tiny.TINY_MODELS["tiny-bench"] = spec
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        path = tiny.build("tiny-bench", cache_root=root)
        wall = time.perf_counter() - t
        info = json.loads((path / tiny.INFO_FILE).read_text())
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        rand = AutoModelForCausalLM.from_config(model.config)
        torch.set_num_threads(2)
        t = time.perf_counter()
        res = {
            "spec": dataclasses.asdict(spec),
            "params": info["num_parameters"],
            "build_s": round(wall, 1),
            "pretrain_loss_init": info["init_loss"],
            "pretrain_loss_final": info["final_loss"],
            "heldout_loss_pretrained": round(heldout_loss(model, tok), 3),
            "heldout_loss_random": round(heldout_loss(rand, tok), 3),
            "lora_answer_loss_pretrained": [round(x, 3) for x in lora_check(model, tok)],
            "lora_answer_loss_random": [round(x, 3) for x in lora_check(rand, tok)],
        }
        res["lora_check_s"] = round((time.perf_counter() - t) / 2, 1)
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
