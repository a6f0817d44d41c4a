"""`finetune webui` attacked over plain HTTP, as issue 20 did: Gradio's upload route, remote code through
a recipe's `trust_remote_code`, files read and folders replaced outside the workspace root, a public bind
without a login. Each case drives the app's HTTP API (`/gradio_api/call/<name>`) and requires refusal."""

import json
import os
import urllib.error
import urllib.request

import pytest
import yaml
from _support import free_port, run_cli, run_cli_in_process, write_jsonl

from finetune.webui.workspace import Workspace

OUTSIDE_SECRET = "token: s3cr3t-kube-token"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The UI on a workspace root, with an outside dir beside it holding what an attacker wants."""
    from finetune.webui.app import launch

    base = tmp_path_factory.mktemp("webui_attack")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "kubeconfig.yaml").write_text(f"apiVersion: v1\n{OUTSIDE_SECRET}\n")
    write_jsonl(outside / "private.jsonl", [{"instruction": "the secret is", "output": "hunter2"}])
    (root / "escape.jsonl").symlink_to(outside / "private.jsonl")  # a link inside the root, pointing out
    port = free_port()
    app = launch(port=port, workspace=Workspace.at(root), block=False)
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "outside": outside, "app": app}
    app.close()


def call(url: str, name: str, *data, headers: dict | None = None):
    """POST /gradio_api/call/NAME then read its event stream: the outputs of the `complete` event."""
    body = json.dumps({"data": list(data)}).encode()
    req = urllib.request.Request(
        f"{url}/gradio_api/call/{name}", body, {"Content-Type": "application/json", **(headers or {})}
    )
    event_id = json.loads(urllib.request.urlopen(req, timeout=30).read())["event_id"]
    stream = urllib.request.urlopen(f"{url}/gradio_api/call/{name}/{event_id}", timeout=600).read().decode()
    events = stream.split("event: ")
    complete = [e for e in events if e.startswith("complete")]
    assert complete, stream
    return json.loads(complete[-1].split("data:", 1)[1])


def recipe_text(**sections) -> str:
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": "tiny-llama"},
        "adapter": {"method": "lora"},
        "data": {"train": "alpaca_en_demo"},
        "output": {"dir": "outputs/x"},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return yaml.safe_dump(recipe)


def test_gradios_upload_route_is_closed(site):
    """The app takes no files; before, /gradio_api/upload stored any file and answered its path."""
    boundary = "ftboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="modeling_x.py"\r\n'
        f"Content-Type: text/x-python\r\n\r\nimport os\r\n--{boundary}--\r\n"
    ).encode()
    req = urllib.request.Request(
        f"{site['url']}/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 403


def test_remote_code_through_a_recipe_is_refused_and_never_runs(site):
    """The reported exploit: a model dir whose config.json `auto_map`s to a modeling file, then a dry run
    with `trust_remote_code: true` sent to the UI. The module must not run (in the UI or anywhere)."""
    root = site["root"]
    evil = root / "evil_model"
    evil.mkdir()
    marker = root / "pwned.txt"
    (evil / "modeling_x.py").write_text(f"import os\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n")
    (evil / "configuration_x.py").write_text(f"import os\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n")
    config = {"model_type": "x", "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.X"}}
    (evil / "config.json").write_text(json.dumps(config))
    for key in ("trust_remote_code", "allow_pickle"):
        text = recipe_text(model={"name_or_path": "evil_model", key: True})
        for name in ("dry_run",):
            answer = call(site["url"], name, text)[0]
            assert f"model.{key}: the web UI was started without" in answer, answer
        started = call(site["url"], "start", text, False, "English")[0]
        assert "was started without" in started, started
    assert not marker.exists()
    assert site["app"].finetune_runner.state()[0] == "idle"


def test_a_recipe_file_outside_the_root_is_not_read(site):
    outside = site["outside"] / "kubeconfig.yaml"
    answer = call(site["url"], "load", "recipes/tiny/sft_lora.yaml", str(outside), "English")
    assert OUTSIDE_SECRET.split()[1] not in json.dumps(answer)
    assert f"{outside} is outside the workspace" in answer[-1]
    climbing = call(site["url"], "load", "recipes/tiny/sft_lora.yaml", "../outside/kubeconfig.yaml", "English")
    assert "is outside the workspace" in climbing[-1] and "s3cr3t" not in json.dumps(climbing)
    # a shipped recipe is loaded by its name from the list only
    shipped = call(site["url"], "load", "recipes/tiny/sft_lora.yaml", "", "English")
    assert shipped[-1] == "loaded recipes/tiny/sft_lora.yaml" and "alpaca_en_demo" in json.dumps(shipped)


def test_a_jsonl_outside_the_root_is_not_previewed(site):
    for path in (str(site["outside"] / "private.jsonl"), "escape.jsonl", "../outside/private.jsonl"):
        answer = call(site["url"], "preview_html", path, "tiny-llama", 0)[0]
        assert "hunter2" not in answer and "is outside the workspace" in answer, answer


def test_recipe_paths_outside_the_root_are_refused(site):
    """A recipe sent to Dry-run or Start may not read data or write an output outside the root."""
    cases = [
        (recipe_text(data={"train": str(site["outside"] / "private.jsonl")}), "data.train"),
        (recipe_text(data={"train": "escape.jsonl"}), "data.train"),
        (recipe_text(output={"dir": str(site["outside"] / "out")}), "output.dir"),
        (recipe_text(output={"dir": "../outside/out"}), "output.dir"),
        (recipe_text(output={"dir": "."}), "output.dir"),
    ]
    for text, key in cases:
        assert call(site["url"], "dry_run", text)[0].startswith(f"error: {key}:")
        assert call(site["url"], "start", text, False, "English")[0].startswith(f"{key}:")
    assert not (site["outside"] / "out").exists() and site["app"].finetune_runner.state()[0] == "idle"


def test_start_replaces_an_output_only_when_overwrite_is_ticked(site):
    kept = site["root"] / "precious"
    kept.mkdir()
    (kept / "keep.txt").write_text("keep")
    text = recipe_text(output={"dir": "precious", "overwrite": True})
    answer = call(site["url"], "start", text, False, "English")[0]
    assert answer.startswith("output.overwrite:") and "Overwrite box" in answer
    assert (kept / "keep.txt").is_file() and site["app"].finetune_runner.state()[0] == "idle"


def test_eval_and_export_never_replace_a_folder_unasked(site):
    """Before, Eval always passed --overwrite: a report dir holding keep.txt was replaced."""
    root = site["root"]
    kept = root / "reports"
    kept.mkdir()
    (kept / "keep.txt").write_text("keep")
    log, table, _ = call(
        site["url"], "evaluate", "tiny-llama", "messages_demo", "", "", 1, "reports", False, "English"
    )
    assert "holds a previous report" in log and table["headers"] == ["metric", "value"]
    adapter = root / "adapter"
    adapter.mkdir()
    log, _ = call(site["url"], "export", "adapter", "merge", "f16", "reports", False, False, "English")
    assert "exists: choose another output path, or tick Overwrite" in log
    assert (kept / "keep.txt").read_text() == "keep"
    # and neither writes outside the root
    outside = str(site["outside"] / "report")
    assert (
        "outside the workspace"
        in call(site["url"], "evaluate", "tiny-llama", "", "", "", 1, outside, True, "English")[0]
    )
    assert (
        "outside the workspace"
        in call(site["url"], "export", "adapter", "merge", "f16", outside, False, True, "English")[0]
    )
    assert not (site["outside"] / "report").exists()


def test_chat_loads_nothing_outside_the_root(site):
    history = call(site["url"], "send", str(site["outside"]), "", [], "hi", 8, 0.0)[0]
    assert "is outside the workspace" in json.dumps(history[-1]["content"])


def test_a_public_bind_without_a_login_is_refused_at_start(tmp_path):
    r = run_cli(["webui", "--host", "0.0.0.0", "--port", str(free_port())], tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--host 0.0.0.0" in lines[0] and "--auth" in lines[0], r.stderr
    bad = run_cli_in_process(["webui", "--host", "0.0.0.0", "--auth", "nopassword"], tmp_path)
    assert bad.returncode == 2 and "--auth: expected USER:PASSWORD" in bad.stderr


def test_a_login_guards_every_api_call(tmp_path):
    from finetune.webui.app import launch

    port = free_port()
    app = launch(port=port, workspace=Workspace.at(tmp_path), auth=[("ana", "pw")], block=False)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            call(f"http://127.0.0.1:{port}", "dry_run", recipe_text())
        assert refused.value.code in (401, 403)
    finally:
        app.close()


def test_credentials_come_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    from finetune.webui import FinetuneError, credentials

    logins = tmp_path / "logins"
    logins.write_text("# team\nana:pw1\n\nbo:pw:2\n")
    assert credentials(None, str(logins)) == [("ana", "pw1"), ("bo", "pw:2")]
    monkeypatch.setenv("FINETUNE_WEBUI_AUTH", "env:pw")
    assert credentials(None, None) == [("env", "pw")]
    assert credentials("cli:pw", None) == [("cli", "pw")]
    logins.write_text("ana\n")
    with pytest.raises(FinetuneError, match=r"--auth-file .*logins line 1: expected USER:PASSWORD"):
        credentials(None, str(logins))
    assert os.environ["FINETUNE_WEBUI_AUTH"] == "env:pw"


def test_a_dry_run_that_runs_model_code_runs_it_in_a_child_process(tmp_path, tiny_path):
    """With the UI started with --trust-remote-code, a model's own code may run, but never inside the UI
    process: the dry run (which loads the model's config through its `auto_map`) is a subprocess."""
    import shutil

    from finetune.webui.app import launch

    evil = tmp_path / "remote_model"
    evil.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_path}/{name}", evil / name)
    marker = tmp_path / "ran_in.txt"
    (evil / "configuration_x.py").write_text(
        f"import os\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n"
        "from transformers import PretrainedConfig\n\n\nclass XConfig(PretrainedConfig):\n    model_type = 'x'\n"
    )
    (evil / "config.json").write_text(
        json.dumps({"model_type": "x", "auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    )
    port = free_port()
    app = launch(port=port, workspace=Workspace.at(tmp_path, trust_remote_code=True), block=False)
    try:
        text = recipe_text(model={"name_or_path": "remote_model", "trust_remote_code": True})
        answer = call(f"http://127.0.0.1:{port}", "dry_run", text)[0]
    finally:
        app.close()
    assert answer.startswith("error:") and "\n" not in answer  # not a causal LM: one line, no traceback
    assert marker.is_file() and int(marker.read_text()) != os.getpid(), answer
