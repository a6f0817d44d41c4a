"""`finetune webui` in a real browser (Debian's chromium driven by Playwright): fill the Train tab with the
tiny recipe and start it, watch the loss and the curve appear, chat with the result, preview data, evaluate,
export (a verified merge), switch the UI to Chinese. Screenshots of every tab go to the test's tmp dir (and
to $FINETUNE_SCREENSHOTS when set)."""

import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from _support import MEMO_CHATS, free_port, memo_recipe, missing_tool, write_jsonl

from finetune import chat, loading
from finetune.webui.workspace import Workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from finetune.webui.app import launch

    root = tmp_path_factory.mktemp("webui")
    port = free_port()
    app = launch(port=port, workspace=Workspace.at(root), runs_dir="runs", block=False)
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "app": app}
    app.finetune_runner.stop()
    app.close()


@pytest.fixture(scope="module")
def page(ui):
    if CHROMIUM is None:
        missing_tool("needs Debian's chromium (apt-get install -y chromium); CI installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(ui["url"])
        page.wait_for_selector("#ft-yaml")
        yield page
        browser.close()


def shot(page, ui, name):
    path = ui["root"] / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("FINETUNE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def fill(page, elem_id, text):
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(text))
    box.press("Tab")  # commit the change


def value(page, elem_id) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def wait_for(predicate, timeout=300, what="", poll=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def monospace(page, elem_id) -> bool:
    font = page.locator(f"#{elem_id} textarea").first.evaluate("e => getComputedStyle(e).fontFamily")
    return "monospace" in font


def test_train_chat_data_eval_export_in_a_browser(ui, page, tiny_path):
    root = ui["root"]
    recipe = root / "memo.yaml"
    # the shipped recipe shown at start has no max_steps: the box is empty (the epochs decide), not 0
    assert value(page, "ft-max_steps") == "" and "max_steps" not in page.locator("#ft-yaml").inner_text()
    assert monospace(page, "ft-plan")
    # 8 micro-batches of 4 a step (the memo chats 8 times): slow enough (8 micro-batches of 1 took 4.5 s for 40
    # steps on an idle 2-core machine) that the test stops the run well before it finishes; no periodic
    # checkpoint (save_steps 1000): Stop itself saves the step it reached
    slow = write_jsonl(root / "memo_x2.jsonl", [{"messages": m} for m in MEMO_CHATS * 8])
    train = {"save_steps": 1000, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8}
    text = memo_recipe(root, steps=25, train=train, data={"train": str(slow), "format": "messages"})
    recipe.write_text(text, encoding="utf-8")
    out_dir = root / "memo_out"

    # Train: load the recipe file, change the form (the YAML follows), dry-run, start, watch the loss
    fill(page, "ft-recipe-file", recipe)
    page.locator("#ft-load").click()
    wait_for(lambda: "memo_x2.jsonl" in value(page, "ft-data"), 30, "the recipe in the form")
    assert value(page, "ft-status") == f"loaded {recipe}" and value(page, "ft-shipped") == ""  # Load is followed
    fill(page, "ft-output_dir", out_dir)
    fill(page, "ft-max_steps", 40)
    wait_for(
        lambda: str(out_dir) in (text := page.locator("#ft-yaml").inner_text()) and "max_steps: 40" in text,
        30,
        "the form (output dir, max steps) in the YAML",
    )
    page.locator("#ft-dry-run").click()
    wait_for(lambda: "steps          40" in value(page, "ft-plan"), 120, "the dry-run plan")
    # start; the status counts steps; stop after a few steps, then the same button resumes it from the
    # step the run reached (Stop saves a checkpoint there), not from the beginning or an older save
    page.locator("#ft-start").click()
    log_path = next(iter((root / "runs").glob("memo_out-*.yaml"))).with_suffix(".log")
    wait_for(lambda: log_path.is_file() and "step 3/40" in log_path.read_text(), 300, "the third step", poll=0.1)
    wait_for(lambda: re.search(r"step \d+/40", value(page, "ft-status")), 30, "step N/40 in the status")
    page.locator("#ft-stop").click()
    wait_for(lambda: value(page, "ft-status").startswith("stopped"), 60, "the run to stop")
    stopped = value(page, "ft-status")
    reached = max(int(n) for n in re.findall(r"^step (\d+)/40", log_path.read_text(), re.MULTILINE))
    work = out_dir.with_name(out_dir.name + ".incomplete")
    assert f"Start resumes from checkpoint-{reached} ({work / f'checkpoint-{reached}'})" in stopped, stopped
    assert reached >= 3 and not out_dir.exists()  # an interrupted run never looks finished
    shot(page, ui, "1-train-stopped")
    page.locator("#ft-start").click()
    wait_for(lambda: value(page, "ft-status").startswith("finished"), 300, "the resumed run to finish")
    log_text = log_path.read_text()
    assert "interrupted" in log_text and f"resuming from {work / f'checkpoint-{reached}'}" in log_text
    status = value(page, "ft-status")
    final_loss = float(re.search(r"loss ([0-9.]+)", status).group(1))
    state = yaml.safe_load((out_dir / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 40 and final_loss == pytest.approx(losses[-1], abs=1e-4)
    assert losses[-1] < losses[0] / 3
    page.wait_for_selector("#ft-curve canvas, #ft-curve svg")  # the curve is drawn
    assert f"done: output in {out_dir}" in value(page, "ft-log")
    shot(page, ui, "1-train")

    # Chat: the trained dir answers as `finetune chat` does, streamed into the chat box
    question = MEMO_CHATS[0][0]["content"]
    model, tok, _ = loading.load_for_inference(out_dir)
    expected = chat.Chat(model, tok, max_new_tokens=128).answer(question)
    page.get_by_role("tab", name="Chat").click()
    fill(page, "ft-c-dir", out_dir)
    fill(page, "ft-c-msg", question)
    page.locator("#ft-c-send").click()
    bot = page.locator("#ft-chatbot")
    wait_for(lambda: expected in bot.inner_text(), 120, f"the answer {expected!r}")
    shot(page, ui, "3-chat")

    # Data: a long error (a path outside the workspace, refused without a child process) wraps inside the
    # page; the memo record with its trained tokens highlighted
    page.get_by_role("tab", name="Data").click()
    fill(page, "ft-d-data", "/" + "no_such_dir_" * 12 + "/x.jsonl")
    page.locator("#ft-d-preview").click()
    error = page.locator("#ft-d-out .ft-error")
    error.wait_for(timeout=120_000)
    assert error.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), "the error is cut off"
    shot(page, ui, "2-data-error")
    fill(page, "ft-d-data", root / "memo.jsonl")
    page.locator("#ft-d-preview").click()
    # wait for the preview asked for (its own answer highlighted), not for any highlight: a preview of
    # other data may still be on the page when the click returns
    answer = MEMO_CHATS[0][1]["content"]
    marks = page.locator("#ft-d-out mark.ft-trained")
    wait_for(lambda: any(answer in m for m in marks.all_inner_texts()), 120, f"the preview of {answer!r}")
    assert answer in marks.first.inner_text()  # the record asked for (index 0), its answer trained
    shot(page, ui, "2-data")

    # Evaluate: finetune eval on the memo chats, metrics table and report; a second run keeps the report
    page.get_by_role("tab", name="Evaluate").click()
    headers = page.locator("#ft-e-metrics").inner_text()
    assert "metric" in headers and "value" in headers  # the empty table has real headers
    fill(page, "ft-e-dir", out_dir)
    fill(page, "ft-e-data", root / "memo.jsonl")
    fill(page, "ft-e-out", root / "eval")
    page.locator("#ft-e-run").click()
    wait_for(lambda: "report:" in value(page, "ft-e-log") or "error" in value(page, "ft-e-log"), 300, "the evaluation")
    wait_for(lambda: "generation.tuned.exact_match" in page.locator("#ft-e-metrics").inner_text(), 30, "the metrics")
    assert "exact_match 1" in value(page, "ft-e-log")  # the memorised answers, scored by finetune eval
    shot(page, ui, "4-evaluate")
    report = (root / "eval" / "report.json").read_text()
    page.locator("#ft-e-run").click()
    wait_for(lambda: "holds a previous report" in value(page, "ft-e-log"), 60, "the refusal to replace the report")
    assert (root / "eval" / "report.json").read_text() == report

    # Export: GGUF's default path is a .gguf file; a verified merge; the written files are listed
    page.get_by_role("tab", name="Export").click()
    page.locator("#ft-x-kind").get_by_text("gguf", exact=True).click()
    wait_for(lambda: value(page, "ft-x-out").endswith("model.gguf"), 30, "the GGUF default path")
    page.locator("#ft-x-kind").get_by_text("merge", exact=True).click()
    wait_for(lambda: value(page, "ft-x-out").endswith("merged"), 30, "the merge default path")
    fill(page, "ft-x-dir", out_dir)
    fill(page, "ft-x-out", root / "merged")
    page.locator("#ft-x-run").click()
    wait_for(lambda: "(exit" in value(page, "ft-x-log"), 300, "the merge")
    log = value(page, "ft-x-log")
    assert "(exit 0)" in log and "logit" in log, log
    assert "model.safetensors" in value(page, "ft-x-files") and (root / "merged" / "config.json").is_file()
    shot(page, ui, "5-export")

    # Language: the whole UI switches to Chinese; every tab in Chinese
    page.get_by_text("中文", exact=True).click()
    page.get_by_role("tab", name="训练").click()
    wait_for(lambda: page.get_by_role("button", name="开始 / 继续").count() == 1, 30, "Chinese labels")
    shot(page, ui, "6-train-zh")
    for n, tab in enumerate(("数据", "对话", "评估", "导出"), 7):
        page.get_by_role("tab", name=tab).click()
        shot(page, ui, f"{n}-{tab}-zh")


def test_stop_interrupts_a_run_even_when_the_ui_ignores_ctrl_c(tmp_path):
    """A UI started where SIGINT is ignored (`finetune webui &` in a script) hands that to its
    children; Stop must still interrupt the run cleanly (checkpoints kept), not wait and kill it."""
    import signal

    from finetune.webui.runner import Runner

    recipe = tmp_path / "long.yaml"
    recipe.write_text(memo_recipe(tmp_path, steps=2000, output={"dir": str(tmp_path / "long_out")}))
    runner = Runner()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert runner.start(recipe, tmp_path / "long_out", tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        wait_for(lambda: "step 2/2000" in runner.log_path.read_text(), 300, "the run's second step")
    finally:
        runner.stop()
    assert runner.state()[0] == "stopped"
    assert "finetune: interrupted" in runner.log_path.read_text()  # Ctrl-C's clean stop, not a kill


def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gradio(name, *args, **kw):
        if name == "gradio":
            raise ImportError(name)
        return real_import(name, *args, **kw)

    from finetune import webui

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    with pytest.raises(webui.FinetuneError, match=r"needs gradio: pip install 'finetune\[webui\]'"):
        webui.require_extra()


def test_the_live_loss_curve_reads_the_lines_a_run_prints():
    """The Train tab's curve, while a run goes on, comes from the log lines the trainer prints
    (finetune.stages.common.log_line): eval and summary lines are not training losses."""
    from finetune.stages.common import log_line
    from finetune.webui.runner import logged_losses

    text = "\n".join(
        [
            "finetune: training: sft, lora r=16 ...",
            log_line({"loss": 2.5, "grad_norm": 1.25, "learning_rate": 0.003}, 1, 40),
            "  3%|#         | 1/40 [00:01<00:40]\r  5%|##        | 2/40",
            log_line({"loss": 1.75e-05, "grad_norm": 0.5}, 2, 40),
            log_line({"eval_loss": 3.0, "eval_runtime": 0.1}, 2, 40),
            log_line({"train_runtime": 5.0, "train_loss": 1.1}, 40, 40),
        ]
    )
    assert logged_losses(text) == [(1, 2.5), (2, 1.75e-05)]


def test_a_multi_line_chat_template_stays_readable_in_the_recipe_box(tmp_path):
    """A `|-` chat template loaded into the UI is written back as a block, not one quoted line of \\n."""
    from finetune.webui.app import read_recipe, to_yaml

    template = "{% for m in messages %}\n<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    path = tmp_path / "r.yaml"
    path.write_text(
        "stage: sft\nmodel:\n  name_or_path: tiny-llama\n  chat_template: |-\n"
        + "".join(f"    {line}\n" for line in template.splitlines())
    )
    text = to_yaml(read_recipe(path, "r.yaml"))
    assert "  chat_template: |-\n    {% for m in messages %}\n    <|{{ m.role }}|>\n" in text, text
    assert yaml.safe_load(text)["model"]["chat_template"] == template


def test_the_form_leaves_max_steps_out_unless_given_and_runs_do_not_share_a_recipe_file(tmp_path):
    from finetune.webui.app import FORM_KEYS, recipe_with_form, run_yaml

    recipe = {"stage": "sft", "train": {"num_train_epochs": 3, "max_steps": 10}}
    steps = [name for name, _, _ in FORM_KEYS].index("max_steps")
    values = [None] * len(FORM_KEYS)
    assert "max_steps" not in recipe_with_form(recipe, values)["train"]  # an emptied box: the epochs decide
    values[steps] = "40"
    assert recipe_with_form(recipe, values)["train"]["max_steps"] == 40
    a, b = (run_yaml(tmp_path / "runs", tmp_path / d / "sft_lora", tmp_path) for d in ("qwen", "llama"))
    assert a != b and a.name.startswith("sft_lora-") and b.name.startswith("sft_lora-")
