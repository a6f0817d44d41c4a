"""The vision-language matrix: each built-in tiny VLM goes through the user's commands on CPU — SFT LoRA and QLoRA
on the demo images, the verified merge (its probe has an image), `finetune chat --image` on the merged model, DPO
on the image preference pairs, and GGUF export — and prints the README's table. (Served answers equal chat's:
tests/test_vlm_post.py.)

    python bench/vlm_matrix.py [TINY_NAME ...] [--steps N]

Each cell says what happened; a failure shows its last line. Figures: loss first -> last logged value; merge = max
|dlogit| of the merged model vs the adapter model (merge's own check, printed in its report).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["tiny-vlm", "tiny-qwen2-vl", "tiny-gemma3-vlm", "tiny-llava"]
IMAGE = REPO / "data" / "vision" / "shapes" / "red_circle_0.png"
QUESTION = "What colour is this?"


def finetune(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "finetune", *args], cwd=REPO, capture_output=True, text=True, env=os.environ
    )
    if check and run.returncode != 0:
        raise RuntimeError((run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1])
    return run


def losses(out: Path) -> str:
    state = json.loads(next(out.rglob("trainer_state.json")).read_text())
    values = [e["loss"] for e in state["log_history"] if "loss" in e]
    return f"loss {values[0]:.2f}→{values[-1]:.2f}"


def cell(fn) -> str:
    try:
        return "ok (" + fn() + ")"
    except Exception as e:  # one row per family: a failure is reported, not raised
        return "fails: " + str(e)[:80]


def row(name: str, work: Path, steps: int) -> list[str]:
    sft, qlora, merged, dpo = work / "sft", work / "qlora", work / "merged", work / "dpo"
    common = [
        f"model.name_or_path={name}",
        f"train.max_steps={steps}",
        "train.logging_steps=1",
        "train.save_strategy=no",
    ]

    def train(recipe: str, out: Path, *more: str) -> str:
        args = ["train", recipe, *common, f"output.dir={out}", *more]
        try:
            finetune(*args)
        except RuntimeError as e:  # the tiny recipes' pixel budget, refused where images resize to a fixed size
            if "takes no pixel budget" not in str(e):
                raise
            finetune(*args, "data.image_max_pixels=null")
        return losses(out)

    def merge() -> str:
        run = finetune("merge", str(sft), "--out", str(merged), "--dtype", "float32")
        delta = re.search(r"max \|Δlogit\| = (\S+)", run.stdout + run.stderr)
        return f"Δ {delta.group(1)}" if delta else "verified"

    def chat_and_serve() -> str:
        answer = finetune("chat", str(merged), "--image", str(IMAGE), "--prompt", QUESTION, "--max-new-tokens", "8")
        return repr(answer.stdout.strip()[:24])

    def gguf() -> str:
        run = finetune("export", str(merged), "--format", "gguf", "--out", str(work / "m.gguf"), check=False)
        if run.returncode == 2:
            raise RuntimeError("refused in one line (llama.cpp --mmproj route named)")
        return "language model + mmproj written, read back"

    sft_cell = cell(lambda: train("recipes/tiny/sft_vl_lora.yaml", sft))
    return [
        name,
        sft_cell,
        cell(lambda: train("recipes/tiny/sft_vl_qlora.yaml", qlora)),
        cell(merge) if sft_cell.startswith("ok") else "-",
        cell(chat_and_serve) if sft_cell.startswith("ok") else "-",
        cell(lambda: train("recipes/tiny/dpo_vl_lora.yaml", dpo, "data.eval_ratio=0", "train.eval_strategy=no")),
        cell(gguf) if sft_cell.startswith("ok") else "-",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=TINY)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print("| tiny model | SFT LoRA | QLoRA | merge | chat --image | DPO | GGUF |")
    print("|---|---|---|---|---|---|---|")
    for name in args.names:
        with tempfile.TemporaryDirectory() as tmp:
            print("| " + " | ".join(row(name, Path(tmp), args.steps)) + " |", flush=True)


if __name__ == "__main__":
    main()
