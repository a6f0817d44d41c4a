"""A vision-language model after training: merge checked with an image (and the merged dir loads as a VLM with its
processor), `finetune chat --image`, `finetune serve` answering OpenAI image_url parts exactly as chat does (and
refusing files, URLs and images over its bounds), eval generation on prompts with images, DPO on image preference
pairs chained after SFT (LoRA) and a QLoRA DPO step; GGUF export of tiny-vlm refused in one line naming the field.
One tiny SFT adapter (tiny-vlm, Qwen2-VL style) is trained once and shared."""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
import yaml
from _support import REPO, SHORT_RUN, free_port, log_series, run_cli
from PIL import Image

from finetune import chat, cli, config, image_inputs, loading, merge, pipeline, serve
from finetune.errors import DataError
from finetune.eval import generation

SHAPES = REPO / "data" / "vision" / "shapes"
RED_SQUARE = SHAPES / "red_square_1.png"
QUESTION = "What colour is the shape?"

SFT = {
    "stage": "sft",
    "model": {"name_or_path": "tiny-vlm", "dtype": "float32"},
    "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "data": {"train": "vision_en_demo", "eval_ratio": 0.0},
    "train": {
        "learning_rate": 3e-3,
        "max_steps": 8,
        "per_device_train_batch_size": 8,
        **SHORT_RUN,
    },
}
DPO_OVERRIDES = {  # the training pairs, scored as a whole before and after training
    "data": {"eval_ratio": 0.0, "eval": "vision_preference_demo"},
    "train": {
        "learning_rate": 1e-3,
        "max_steps": 8,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 8,
        "eval_on_start": True,
        "save_steps": 1000,
    },
}


@pytest.fixture(scope="session")
def vlm_sft_dir(tmp_path_factory):
    """An SFT LoRA adapter of tiny-vlm on the English image demo (8 steps, once per session): read only."""
    from finetune.stages import sft

    root = tmp_path_factory.mktemp("vlm_sft")
    recipe = copy.deepcopy(SFT)
    recipe["output"] = {"dir": str(root / "out")}
    return sft.run(config.load(text=yaml.safe_dump(recipe)))


@pytest.fixture(scope="session")
def vlm_chat(vlm_sft_dir):
    """(model, tokenizer, processor) of the SFT adapter, as `finetune chat` loads them."""
    model, tok, source = loading.load_for_inference(vlm_sft_dir)
    return model, tok, image_inputs.vision_processor(source)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def probe_logits(model, processor, image) -> torch.Tensor:
    messages, images = image_inputs.with_images([image_inputs.user_turn(QUESTION, [image])], "test")
    enc = image_inputs.to_model(image_inputs.render(processor, messages, images=images), model)
    with torch.no_grad():
        return model(**enc, use_cache=False).logits.float()


def test_merge_with_an_image_equals_the_adapter_and_loads_as_a_vlm(vlm_sft_dir, vlm_chat, tmp_path):
    model, _, processor = vlm_chat
    report = merge.merge(str(vlm_sft_dir), str(tmp_path / "merged"), dtype="float32")
    assert report.image_probe and "(one with an image)" in report.lines()[1]
    assert report.max_delta <= 1e-6 * max(1.0, report.logit_scale)  # fp32: rounding of the folded weights only
    out = tmp_path / "merged"
    assert (out / "processor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    merged = loading.load_inference_model(str(out), "test")
    assert type(merged).__name__.endswith("ForConditionalGeneration")
    merged_processor = image_inputs.vision_processor(loading.inspect(out))
    image = Image.open(RED_SQUARE)
    adapter_logits, merged_logits = (
        probe_logits(model, processor, image),
        probe_logits(merged, merged_processor, image),
    )
    assert (adapter_logits - merged_logits).abs().max().item() <= 1e-5 * max(1.0, adapter_logits.abs().max().item())
    # the image reaches the logits: another picture changes them (so the check above compares image paths too)
    other = probe_logits(merged, merged_processor, Image.open(SHAPES / "blue_circle_0.png"))
    assert (other - merged_logits).abs().max().item() > 1e-3


def test_serve_answers_a_base64_image_as_chat_image_does_and_refuses_files_urls_and_big_images(vlm_sft_dir, tmp_path):
    r = run_cli(
        ["chat", str(vlm_sft_dir), "--image", str(RED_SQUARE), "--prompt", QUESTION, "--max-new-tokens", "12"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    expected = r.stdout.strip()
    assert expected
    limits = serve.Limits(max_tokens=64, max_images=2, max_image_pixels=64 * 64)
    served = serve.load_served(str(vlm_sft_dir), name="vlm")
    app = serve.create_app(served, limits=limits)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

        def ask(*parts, **kw):
            content = [*parts, {"type": "text", "text": QUESTION}]
            return c.chat.completions.create(
                model="vlm", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=12, **kw
            )

        image = {"type": "image_url", "image_url": {"url": data_url(RED_SQUARE)}}
        assert ask(image).choices[0].message.content == expected
        streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(image, stream=True) if ch.choices)
        assert streamed == expected
        big = tmp_path / "big.png"
        Image.new("RGB", (80, 80), (200, 0, 0)).save(big)
        refusals = {
            "http://example.com/a.png": "only data: URLs are accepted",
            str(RED_SQUARE): "the server reads no files",
            "data:image/png;base64,@@": "not valid base64",
            data_url(big): "over 4,096 pixels",
        }
        for url, message in refusals.items():
            with pytest.raises(openai.BadRequestError) as e:
                ask({"type": "image_url", "image_url": {"url": url}})
            assert message in e.value.body["message"] and e.value.body["param"] == "messages[0].content[0]"
        with pytest.raises(openai.BadRequestError) as e:
            ask(image, image, image)
        assert "more than 2 images" in e.value.body["message"]
        assert ask(image).choices[0].message.content == expected  # and the server goes on
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_chat_image_errors_are_one_line(vlm_sft_dir, tiny_path, capsys):
    assert cli.main(["chat", str(vlm_sft_dir), "--image", "/nonexistent.png", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image: /nonexistent.png: image file not found" in err
    assert cli.main(["chat", tiny_path, "--image", str(RED_SQUARE), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes no images" in err


def test_eval_generation_answers_prompts_with_images_as_chat_does(vlm_chat):
    model, tok, processor = vlm_chat
    cases = [
        (QUESTION, str(RED_SQUARE)),
        ("What colour is the sky?", None),
        (QUESTION, data_url(SHAPES / "green_square_0.png")),
    ]
    prompts = [[image_inputs.user_turn(text, [ref] if ref else [])] for text, ref in cases]
    answers = generation.generate(model, tok, prompts, max_new_tokens=10, processor=processor)
    for (text, ref), answer in zip(cases, answers):
        images = [image_inputs.open_image(ref, "test")] if ref else []
        assert chat.Chat(model, tok, max_new_tokens=10, processor=processor).answer(text, images=images) == answer
    items, _ = generation.load_items("vision_en_demo", max_samples=2)  # eval data: parts get their references back
    assert all(image_inputs.has_images(it.prompt) for it in items)
    assert len(generation.generate(model, tok, [it.prompt for it in items], 4, processor=processor)) == 2
    with pytest.raises(DataError, match="prompt 1 has an image, but the model takes no images"):
        generation.generate(model, tok, prompts[:1], max_new_tokens=2)


def test_dpo_on_image_pairs_chains_after_sft_and_trains(tmp_path):
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({**SFT, "output": {"dir": "unused"}}))
    pipe_text = {
        "output": {"dir": str(tmp_path / "out")},
        "stages": {
            "sft": {"recipe": str(tmp_path / "sft.yaml"), "train": {"max_steps": 2}},
            "dpo": {
                "recipe": str(REPO / "recipes" / "tiny" / "dpo_vl_lora.yaml"),
                "model": {"name_or_path": "${sft}"},
                **DPO_OVERRIDES,
            },
        },
    }
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipe_text, sort_keys=False))
    pipe = pipeline.load(tmp_path / "pipe.yaml")
    summary = pipeline.run(pipe)
    assert [s["status"] for s in summary["stages"].values()] == ["trained", "trained"]
    dpo_dir = pipe.stages[-1].dir
    assert len(log_series(dpo_dir, "loss")) == 8
    before, after = log_series(dpo_dir, "eval_loss")
    assert after < before < 0.6932  # the pairs' DPO loss fell from log 2 (at the start the policy is the reference)
    from safetensors.torch import load_file

    weights = load_file(str(dpo_dir / "adapter_model.safetensors"))
    b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert b and all(v.abs().max() > 0 for v in b.values())  # every B moved off its zero init
    assert all("language_model" in k for k in weights)  # the adapter stays in the language model
    assert (dpo_dir / "processor_config.json").is_file()


def test_qlora_dpo_on_image_pairs_runs_a_step(tmp_path):
    from finetune.stages import dpo

    text = (REPO / "recipes" / "tiny" / "dpo_vl_lora.yaml").read_text()
    recipe = config.load(
        text=text,
        overrides=[
            "adapter.method=qlora",
            "train.max_steps=1",
            "data.eval_ratio=0.0",
            "train.eval_strategy=no",
            f"output.dir={tmp_path / 'q'}",
        ],
    )
    out = dpo.run(recipe)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and (out / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["adapter"]["method"] == "qlora"


def test_gguf_export_of_a_vlm_llama_cpp_would_compute_differently_is_one_line_naming_the_field(
    vlm_sft_dir, tmp_path, capsys
):
    # tiny-vlm's vision windows are 56 pixels; llama.cpp's Qwen2.5-VL graph has 112 (tests/test_gguf_mmproj.py
    # writes and checks the two files where it computes the same)
    assert cli.main(["export", str(vlm_sft_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "vision_config.window_size: 56; llama.cpp's qwen25vl projector graph computes with 112" in err
    assert list(tmp_path.iterdir()) == []


def test_image_references_are_bounded_and_urls_refused(tmp_path):
    bounds = image_inputs.ImageBounds(max_images=1, max_image_bytes=10_000, max_image_pixels=100)
    with pytest.raises(image_inputs.ImageInputError, match="image URLs are not fetched"):
        image_inputs.open_image("https://example.com/x.png", "--image")
    with pytest.raises(image_inputs.ImageInputError, match="over 100 pixels"):
        image_inputs.open_image(str(RED_SQUARE), "--image", bounds=bounds)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(image_inputs.ImageInputError, match="empty image file"):
        image_inputs.open_image("empty.png", "--image", base_dir=tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(image_inputs.ImageInputError, match="not a readable image"):
        image_inputs.open_image(str(tmp_path / "bad.png"), "--image")
    two = [image_inputs.user_turn("x", [str(RED_SQUARE), str(RED_SQUARE)])]
    with pytest.raises(image_inputs.ImageInputError, match="more than 1 images"):
        image_inputs.with_images(two, "t", bounds=image_inputs.ImageBounds(max_images=1))
    image = image_inputs.open_image(data_url(RED_SQUARE), "x")
    assert image.size == Image.open(RED_SQUARE).size and image.mode == "RGB"
