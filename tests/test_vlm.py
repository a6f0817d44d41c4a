"""Vision-language fine-tuning (issue 27): tiny VLMs of four styles built from transformers configs, images in
every data format, exact answer-only labels with image tokens never trained, one-line errors for bad images,
the image content in the cache key, and learning measured on held-out generated images."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STYLES = ["tiny-vlm", "tiny-qwen2-vl", "tiny-gemma3-vlm", "tiny-llava"]


def _demo():
    spec = importlib.util.spec_from_file_location("make_vision_demo", REPO / "data/tools/make_vision_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _demo()


@pytest.fixture(scope="session")
def processors(finetune_cache):
    from finetune import loading
    from finetune.config import ModelSection

    return {name: loading.load_processor(ModelSection(name_or_path=name)) for name in STYLES}


def png(path: Path, colour="red", shape="circle", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    demo.draw(colour, shape, random.Random(seed)).save(path)
    return path


def data_uri(colour="blue") -> str:
    buf = io.BytesIO()
    demo.draw(colour, "square", random.Random(1)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def records(tmp: Path) -> dict[str, tuple[str, dict, list[str]]]:
    """One record per way of giving images: (format, record, the answers it trains)."""
    png(tmp / "img" / "a.png")
    png(tmp / "img" / "b.png", "green", "square")
    return {
        "messages_parts": (
            "messages",
            {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": "Colour?"}],
                    },
                    {"role": "assistant", "content": "It is red."},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": "img/b.png"}],
                    },
                    {"role": "assistant", "content": "It is green."},
                ]
            },
            ["It is red.", "It is green."],
        ),
        "openai_image_url": (
            "messages",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What colour?"},
                            {"type": "image_url", "image_url": {"url": data_uri()}},
                        ],
                    },
                    {"role": "assistant", "content": "It is blue."},
                ]
            },
            ["It is blue."],
        ),
        "sharegpt_images": (
            "sharegpt",
            {
                "conversations": [
                    {"from": "human", "value": "<image>这个图形是什么颜色？"},
                    {"from": "gpt", "value": "红色。"},
                    {"from": "human", "value": "<image>这个呢？"},
                    {"from": "gpt", "value": "绿色。"},
                ],
                "images": ["img/a.png", "img/b.png"],
            },
            ["红色。", "绿色。"],
        ),
        "alpaca_images": (
            "alpaca",
            {
                "instruction": "<image>What shape is this?",
                "input": "",
                "output": "It is a square.",
                "images": ["img/b.png"],
            },
            ["It is a square."],
        ),
    }


@pytest.mark.parametrize("name", STYLES)
def test_trained_tokens_are_exactly_the_answers_and_image_tokens_never(name, processors, tmp_path):
    from finetune.data import formats, vision
    from finetune.data import images as image_refs
    from finetune.data.encode import IGNORE
    from finetune.data.sources import Record

    processor = processors[name]
    tok, eos = processor.tokenizer, processor.tokenizer.eos_token
    image_ids = vision.image_token_ids(processor)
    assert image_ids
    for case, (fmt, row, answers) in records(tmp_path).items():
        [example] = formats.convert([Record(row, f"data.jsonl:{case}", root=str(tmp_path))], fmt, {})
        n_images = len(example["images"])
        sequences = vision.encode_many(processor, [example], max_length=None)[0]
        trained_ids = [[i for i, label in zip(seq.input_ids, seq.labels) if label != IGNORE] for seq in sequences]
        want = [tok(a + eos, add_special_tokens=False)["input_ids"] for a in answers]
        runs = []  # each trained run of consecutive positions, as ids
        for seq in sequences:
            run = []
            for i, label in zip(seq.input_ids, seq.labels):
                if label != IGNORE:
                    run.append(i)
                elif run:
                    runs.append(run)
                    run = []
            if run:
                runs.append(run)
        assert runs == want, f"{name} {case}: trained {[tok.decode(r) for r in runs]}"
        assert sum(len(t) for t in trained_ids) == sum(len(w) for w in want)
        for seq in sequences:
            assert all(label == IGNORE for i, label in zip(seq.input_ids, seq.labels) if i in image_ids)
            spans = len(
                [
                    k
                    for k in range(len(seq.input_ids))
                    if seq.input_ids[k] in image_ids and (k == 0 or seq.input_ids[k - 1] not in image_ids)
                ]
            )
            assert spans == len(seq.images) <= n_images, f"{name} {case}: {spans} image spans, {seq.images}"
        # the labels are the processor's own expansion of the rendered chat: the model sees what inference feeds it
        last = sequences[-1]
        rendered = tok.apply_chat_template(example["messages"], tokenize=False)
        if len(sequences) == 1:
            opened = [image_refs.open_image(r, case) for r in example["images"]]
            assert last.input_ids == vision.expand(processor, rendered, opened)


def cli(capsys, *argv) -> tuple[int, str, str]:
    from finetune.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def recipe(tmp: Path, data: Path | str, model="tiny-vlm", **train) -> Path:
    settings = {
        "learning_rate": 3.0e-3,
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "max_length": 128,
        "bf16": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        **train,
    }
    text = json.dumps(
        {
            "stage": "sft",
            "model": {"name_or_path": model},
            "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": str(data)},
            "train": settings,
            "output": {"dir": str(tmp / "out"), "overwrite": True},
        }
    )
    path = tmp / "recipe.yaml"
    path.write_text("# finetune train recipe.yaml\n" + text + "\n", encoding="utf-8")
    return path


def good(k: int) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": f"Colour {k}?"}],
            },
            {"role": "assistant", "content": "It is red."},
        ]
    }


def bad_cases(tmp: Path) -> dict[str, tuple[dict, str]]:
    """record -> a piece of its one-line error (every line also names the file and the record's line)."""
    png(tmp / "img" / "a.png")
    (tmp / "img" / "empty.png").write_bytes(b"")
    (tmp / "img" / "junk.png").write_bytes(b"this is not a picture at all")
    user = lambda ref: {"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": "?"}]}  # noqa: E731
    answer = {"role": "assistant", "content": "It is red."}
    return {
        "missing": ({"messages": [user("img/nope.png"), answer]}, "not found"),
        "empty": ({"messages": [user("img/empty.png"), answer]}, "empty file"),
        "unreadable": ({"messages": [user("img/junk.png"), answer]}, "not a readable image"),
        "two_images_one_placeholder": (
            {
                "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "Red."}],
                "images": ["img/a.png", "img/a.png"],
            },
            "2 image(s) given but the text has 1 <image>",
        ),
        "bad_base64": ({"messages": [user("data:image/png;base64,@@@"), answer]}, "not valid base64"),
        "unreachable_url": ({"messages": [user("http://127.0.0.1:9/x.png"), answer]}, "cannot fetch image"),
    }


def test_every_bad_image_is_one_line_exit_2_and_skip_bad_rows_counts_them(tmp_path, capsys):
    cases = bad_cases(tmp_path)
    for case, (row, piece) in cases.items():
        fmt = "sharegpt" if "conversations" in row else "messages"
        first = good(0) if fmt == "messages" else {**row, "images": ["img/a.png"]}
        data = write_jsonl(tmp_path / f"{case}.jsonl", [first, row])
        code, out, err = cli(capsys, "train", recipe(tmp_path, data), f"data.format={fmt}", "--dry-run")
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2, f"{case}: exit {code}: {err[-2000:]}"
        assert len(lines) == 1 and "Traceback" not in err, f"{case}: {err}"
        assert f"{case}.jsonl:2" in lines[0] and piece in lines[0], f"{case}: {lines[0]}"
    # image tokens that train.max_length would cut (a 112x112 image: 16 tokens)
    demo.draw("red", "circle", random.Random(0), size=112).save(tmp_path / "img" / "a.png")
    data = write_jsonl(tmp_path / "long.jsonl", [good(0)])
    code, _, err = cli(capsys, "train", recipe(tmp_path, data, max_length=12), "--dry-run")
    assert code == 2 and "long.jsonl:1" in err and "train.max_length=12" in err and "image tokens" in err, err
    assert len(err.strip().splitlines()) == 1, err
    png(tmp_path / "img" / "a.png")
    # every case at once, skipped and counted
    rows = [good(k) for k in range(3)] + [row for row, _ in cases.values() if "messages" in row]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    code, out, err = cli(capsys, "train", recipe(tmp_path, data), "data.skip_bad_rows=true", "--dry-run")
    assert code == 0, err[-2000:]
    n_bad = len(rows) - 3
    assert f"{n_bad} bad records skipped" in out + err, out + err
    assert "3 examples from" in out, out


def test_pixel_limits_where_the_processor_takes_them(tmp_path, capsys):
    png(tmp_path / "img" / "a.png")
    data = write_jsonl(tmp_path / "d.jsonl", [good(0)])
    tokens = {}
    for limit in ("12544", "784"):
        code, out, err = cli(capsys, "data", "preview", recipe(tmp_path, data), f"data.image_max_pixels={limit}")
        assert code == 0, err
        tokens[limit] = int(out.split("image 1 (")[1].split("(")[1].split(" tokens")[0])
    assert tokens["784"] < tokens["12544"], tokens
    code, _, err = cli(
        capsys, "train", recipe(tmp_path, data, model="tiny-llava"), "data.image_max_pixels=784", "--dry-run"
    )
    assert (
        code == 2
        and "data.image_max_pixels" in err
        and "takes no pixel budget" in err
        and len(err.strip().splitlines()) == 1
    )


def test_plan_states_what_is_trained(tmp_path, capsys):
    png(tmp_path / "img" / "a.png")
    data = write_jsonl(tmp_path / "d.jsonl", [good(0)])
    code, out, err = cli(capsys, "train", recipe(tmp_path, data, model="tiny-llava"), "--dry-run")
    assert code == 0, err
    trained = next(line for line in out.splitlines() if line.strip().startswith("trained"))
    assert "vision_tower frozen" in trained and "multi_modal_projector frozen" in trained
    assert "language_model" in trained and "language_model frozen" not in trained
    named = ["adapter.target_modules=[q_proj,v_proj,multi_modal_projector.linear_1]"]
    code, out, err = cli(capsys, "train", recipe(tmp_path, data, model="tiny-llava"), *named, "--dry-run")
    assert code == 0, err
    trained = next(line for line in out.splitlines() if line.strip().startswith("trained"))
    assert "vision_tower frozen" in trained, "q_proj is a vision-tower name too: a bare suffix stays in the decoder"
    assert "multi_modal_projector frozen" not in trained, trained


def test_cache_key_follows_the_image_content(tmp_path):
    from finetune import loading
    from finetune.config import DataSection, ModelSection
    from finetune.data import cache, load

    png(tmp_path / "img" / "a.png")
    data = write_jsonl(tmp_path / "d.jsonl", [good(0), good(1)])
    processor = loading.load_processor(ModelSection(name_or_path="tiny-vlm"))
    cfg = DataSection(train=str(data))
    builds = cache.builds
    load(cfg, processor, 128)
    load(cfg, processor, 128)
    assert cache.builds == builds + 1, "the second load is a cache hit"
    png(tmp_path / "img" / "a.png", "blue", "circle", seed=5)  # same name, new pixels
    load(cfg, processor, 128)
    assert cache.builds == builds + 2, "an image changed in place is new data"


@pytest.fixture(scope="session")
def trained_vlm(tmp_path_factory, finetune_cache):
    """tiny-qwen2-vl, LoRA on the language model only, 60 steps on the English demo images (colour and shape
    questions)."""
    from finetune import config
    from finetune.stages import sft

    tmp = tmp_path_factory.mktemp("vlm_lora")
    path = recipe(tmp, "vision_en_demo", model="tiny-qwen2-vl", max_steps=60)
    return sft.run(config.load(str(path), ["adapter.r=16", "adapter.alpha=32"]))


def colour_accuracy(model, processor, seed=123) -> float:
    """Held-out images (new positions and sizes): the colour whose answer has the highest log-likelihood."""
    import torch

    rng, right, n = random.Random(seed), 0, 0
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    for colour in demo.COLOURS:
        for shape in demo.SHAPES:
            for _ in range(2):
                image = demo.draw(colour, shape, rng)
                n_prompt = len(processor(text=[prompt], images=[[image]], add_special_tokens=False)["input_ids"][0])
                scores = {}
                for option in demo.COLOURS:
                    batch = processor(
                        text=[prompt + f"It is {option}.</s>"],
                        images=[[image]],
                        add_special_tokens=False,
                        return_tensors="pt",
                    )
                    with torch.no_grad():
                        logp = model(**batch).logits[0, :-1].log_softmax(-1)
                    ids = batch["input_ids"][0, 1:]
                    scores[option] = logp.gather(1, ids[:, None])[n_prompt - 1 :, 0].sum().item()
                right += max(scores, key=scores.get) == colour
                n += 1
    return right / n


def test_lora_learns_to_name_the_colour_of_held_out_images(trained_vlm):
    from peft import PeftModel

    from finetune import loading

    processor = loading.load_processor(loading.inspect(trained_vlm))
    model_dir = loading.inspect(trained_vlm)
    base = loading.load_base(model_dir)
    before = colour_accuracy(base, processor)
    after = colour_accuracy(PeftModel.from_pretrained(base, str(trained_vlm)).eval(), processor)
    print(f"held-out colour accuracy: {before:.3f} -> {after:.3f}")
    assert after >= before + 0.2 and after >= 0.5, (before, after)
    from safetensors.torch import load_file

    saved = load_file(trained_vlm / "adapter_model.safetensors")
    assert saved and all(".language_model." in k for k in saved), "all-linear stays in the language model"


def test_qlora_vlm_trains_on_cpu(tmp_path):
    from _support import logged_losses
    from safetensors.torch import load_file

    from finetune import config
    from finetune.stages import sft

    path = recipe(tmp_path, "vision_zh_demo", max_steps=12)
    out = sft.run(config.load(str(path), ["adapter.method=qlora"]))
    losses = logged_losses(out)
    assert losses[-1] < 0.7 * losses[0], losses
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), "every LoRA B matrix moved off zero"


@pytest.mark.parametrize(
    "path, tiny_name",
    [
        ("recipes/tiny/sft_vl_lora.yaml", None),
        ("recipes/tiny/sft_vl_qlora.yaml", None),
        ("recipes/qwen2.5-vl/sft_lora.yaml", "tiny-vlm"),  # the same architecture, at toy size
        ("recipes/gemma3/sft_qlora.yaml", "tiny-gemma3-vlm"),
    ],
)
def test_vl_recipes_dry_run(path, tiny_name, tmp_path, capsys):
    overrides = [f"output.dir={tmp_path / 'out'}"] + ([f"model.name_or_path={tiny_name}"] if tiny_name else [])
    code, out, err = cli(capsys, "train", REPO / path, *overrides, "--dry-run")
    assert code == 0, err[-2000:]
    trained = next(line for line in out.splitlines() if line.strip().startswith("trained"))
    assert "language_model" in trained and "frozen" in trained, trained
