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
import pathlib
import sys
import tempfile
import time

import torch

from finetune import tiny

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from _support import heldout_loss, lora_check  # noqa: E402  (one copy of the probes, shared with the tests)


def main(argv: list[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = {}
    for arg in argv:
        k, _, v = arg.partition("=")
        fields = {f.name: f for f in dataclasses.fields(tiny.TinySpec)}
        if k not in fields or not v:
            raise SystemExit(
                f"tiny_build.py: expected key=value with a TinySpec key ({', '.join(fields)}), got {arg!r}"
            )
        field = fields[k]
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
            "lora_answer_loss_pretrained": [round(x, 3) for x in lora_check(model, tok)[:2]],
            "lora_answer_loss_random": [round(x, 3) for x in lora_check(rand, tok)[:2]],
        }
        res["lora_check_s"] = round((time.perf_counter() - t) / 2, 1)
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
