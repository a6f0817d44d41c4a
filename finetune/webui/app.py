"""The Gradio app: Train, Data, Chat, Evaluate and Export tabs over the same functions and commands the
terminal uses. `finetune train / eval / merge / export`, dry-run plans and data previews run as
subprocesses in the workspace root (loading a model or tokenizer can run its code: never in the UI
process); chat calls finetune's own functions with remote code and pickles off. What a request may read,
write and turn on is finetune.webui.workspace's to decide. No training logic lives here."""

import hashlib
import html
import json
import queue
import re
import subprocess
import threading
from pathlib import Path

import yaml

from finetune.errors import FinetuneError
from finetune.webui.i18n import TEXT, t
from finetune.webui.runner import Runner, child_env, finetune_command
from finetune.webui.workspace import Refused, Workspace

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ANSI_GREEN = re.compile(r"\x1b\[42;30m(.*?)\x1b\[0m", re.DOTALL)
FORM_KEYS = [  # (form field, recipe section, key)
    ("stage", None, "stage"),
    ("model", "model", "name_or_path"),
    ("method", "adapter", "method"),
    ("data", "data", "train"),
    ("lr", "train", "learning_rate"),
    ("epochs", "train", "num_train_epochs"),
    ("max_steps", "train", "max_steps"),
    ("batch", "train", "per_device_train_batch_size"),
    ("max_length", "train", "max_length"),
    ("lora_r", "adapter", "r"),
    ("lora_alpha", "adapter", "alpha"),
    ("output_dir", "output", "dir"),
]
EXPORT_OUT = {"merge": "export/merged", "gguf": "export/model.gguf", "safetensors": "export/model"}
CSS = """
#ft-plan textarea, #ft-log textarea, #ft-e-log textarea, #ft-x-log textarea, #ft-x-files textarea
  { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.ft-error, .ft-preview { white-space: pre-wrap; overflow-wrap: anywhere; max-width: 100%; }
"""


def shipped_recipes() -> list[str]:
    if not REPO_RECIPES.is_dir():
        return []
    return sorted(
        str(p.relative_to(REPO_RECIPES.parent))
        for p in REPO_RECIPES.rglob("*.yaml")
        if "accelerate" not in p.parts and "pipelines" not in p.parts
    )


def read_recipe(path: Path, shown: str) -> dict:
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FinetuneError(f"{shown}: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise FinetuneError(f"{shown}: a recipe is a mapping of sections")
    return recipe


def form_values(recipe: dict) -> list:
    out = []
    for _, section, key in FORM_KEYS:
        value = recipe.get(key) if section is None else (recipe.get(section) or {}).get(key)
        out.append(value)
    return out


def recipe_with_form(recipe: dict, values: list) -> dict:
    recipe = json.loads(json.dumps(recipe))  # a deep copy of plain data
    for (_, section, key), value in zip(FORM_KEYS, values):
        if key == "max_steps":  # a text box: empty (or 0, -1) leaves it to the epochs
            text = str(value if value is not None else "").strip()
            try:
                value = int(float(text)) if text else 0
            except ValueError:
                continue  # half typed
            if value <= 0:
                (recipe.get("train") or {}).pop("max_steps", None)
                continue
        if value is None or value == "":
            continue
        if isinstance(value, float) and value.is_integer() and key != "learning_rate":
            value = int(value)
        if section is None:
            recipe[key] = value
        else:
            recipe.setdefault(section, {})[key] = value
    return recipe


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings (a chat template) as YAML block scalars (`|`), as a person writes them."""


def _str(dumper, value: str):
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_ReadableDumper.add_representer(str, _str)


def dump_yaml(recipe: dict) -> str:
    return yaml.dump(recipe, Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True, width=119)


def to_yaml(recipe: dict, path_hint: str = "RECIPE.yaml") -> str:
    return f"# finetune train {path_hint}\n" + dump_yaml(recipe)


def run_command(args: list[str], cwd: Path, timeout: int = 3600, module: str = "finetune") -> tuple[int, str]:
    """`finetune ARGS` (or `python -m MODULE ARGS`) in `cwd`: (exit code, stdout and stderr)."""
    command = finetune_command(*args) if module == "finetune" else [finetune_command()[0], "-m", module, *args]
    try:
        r = subprocess.run(
            command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"
    return r.returncode, (r.stdout + ("\n" if r.stdout and r.stderr else "") + r.stderr).strip()


def error_line(text: str) -> str:
    """The `finetune: error: ...` line of a command's output (else its last line)."""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line.removeprefix("finetune: error: ") for line in lines if line.startswith("finetune: error:")]
    return (errors or lines or ["(no output)"])[-1]


def preview_html(workspace: Workspace, dataset: str, model: str, index) -> str:
    """`finetune data preview`, with the trained tokens highlighted (run in a child process)."""
    try:
        dataset = workspace.name_or_path(dataset, "dataset")
        model = workspace.name_or_path(model, "model")
    except Refused as e:
        return f"<pre class='ft-error'>{html.escape(str(e))}</pre>"
    rc, text = run_command([dataset, model, str(int(index or 0))], workspace.root, 600, "finetune.webui.child")
    if rc != 0:
        return f"<pre class='ft-error'>{html.escape(error_line(text))}</pre>"
    body = ANSI_GREEN.sub(lambda m: "\x00" + m.group(1) + "\x01", text)
    body = (
        html.escape(body)
        .replace("\x00", "<mark class='ft-trained' style='background:#9be59b'>")
        .replace("\x01", "</mark>")
    )
    return f"<pre class='ft-preview'>{body}</pre>"


class ChatSessions:
    """Loaded models for the Chat tab, one at a time (the last dir chosen): a model or dir in the workspace,
    loaded in the UI process with remote code and pickles off whatever the UI's flags (`finetune chat` in a
    terminal takes --trust-remote-code)."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.path, self.model, self.tok = None, None, None
        self.lock = threading.Lock()

    def get(self, path: str):
        from finetune import security
        from finetune.loading import load_for_inference

        path = self.workspace.name_or_path(path, "model or output dir")
        with self.lock:
            if path != self.path:
                with security.user_flags(trust_remote_code=False, allow_pickle=False):
                    local = self.workspace.root / path if self.workspace.is_path(path) else path
                    self.model, self.tok, _ = load_for_inference(str(local))
                self.path = path
            return self.model, self.tok

    def stream(
        self, path: str, system: str, history: list[dict], message: str, max_new_tokens: int, temperature: float
    ):
        """Yield the growing answer (finetune.chat.Chat generating, streamed through a queue)."""
        from finetune.chat import Chat

        model, tok = self.get(path)
        session = Chat(model, tok, system or None, int(max_new_tokens), float(temperature))
        session.history = [{"role": m["role"], "content": m["content"]} for m in history]
        pieces: queue.Queue = queue.Queue()

        class Sink:
            def write(self, text):
                pieces.put(text)

            def flush(self):
                pass

        errors = []

        def work():
            try:
                session.answer(message, stream=Sink())
            except Exception as e:  # noqa: BLE001 - shown in the chat, the UI goes on
                errors.append(e)
            finally:
                pieces.put(None)

        threading.Thread(target=work, daemon=True).start()
        answer = ""
        while (piece := pieces.get()) is not None:
            answer += piece
            yield answer.strip()
        if errors:
            raise FinetuneError(str(errors[0]).splitlines()[0])
        yield session.history[-1]["content"]


def written_files(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    siblings = sorted(path.parent.glob(path.stem + "*")) if path.suffix else []
    rows = {p: p.stat().st_size for p in [*files, *siblings] if p.is_file()}
    return "\n".join(f"{p}  ({size:,} bytes)" for p, size in rows.items()) or "(nothing written)"


def known_datasets(root: Path) -> list[str]:
    """The registry names a recipe can use from the workspace: ./data/datasets.yaml, else the shipped one."""
    from finetune.data.sources import SHIPPED_REGISTRY, read_registry

    local = root / "data" / "datasets.yaml"
    try:
        return sorted(read_registry(local if local.is_file() else SHIPPED_REGISTRY))
    except (FinetuneError, OSError):
        return []


def run_yaml(runs: Path, out_dir: Path, root: Path) -> Path:
    """`runs/<output basename>-<hash of the output path>.yaml`: one recipe (and log) per output dir."""
    digest = hashlib.sha1(str(out_dir.relative_to(root)).encode()).hexdigest()[:8]
    return runs / f"{out_dir.name}-{digest}.yaml"


def build(lang: str = "en", workspace: Workspace | None = None, runs_dir: str = "runs"):
    import gradio as gr
    import pandas as pd

    from finetune.config import ADAPTER_METHODS, STAGES
    from finetune.tiny import TINY_MODELS

    workspace = workspace or Workspace.at(Path.cwd())
    root = workspace.root
    runs = workspace.output(runs_dir, "--runs-dir")
    runner, chats = Runner(), ChatSessions(workspace)
    labelled: list[tuple[object, str, str]] = []  # (component, text key, "label" | "value")

    def L(component, key, attr="label"):
        labelled.append((component, key, attr))
        return component

    def code_of(choice) -> str:
        return "zh" if choice == "中文" else "en"

    recipes = shipped_recipes()
    first = next((r for r in recipes if r.endswith("tiny/sft_lora.yaml")), recipes[0] if recipes else None)
    base_recipe = (
        read_recipe(REPO_RECIPES.parent / first, first) if first else {"stage": "sft", "model": {"name_or_path": ""}}
    )
    lists = {
        "stage": list(STAGES),
        "model": sorted(TINY_MODELS),
        "method": list(ADAPTER_METHODS),
        "data": known_datasets(root),
    }

    with gr.Blocks(title="finetune", analytics_enabled=False) as app:  # offline: no usage pings
        state_recipe = gr.State(base_recipe)
        with gr.Row():
            L(gr.Markdown(f"## {t('title', lang)}\n{t('subtitle', lang)}"), "title", "value")
            lang_box = gr.Radio(
                ["English", "中文"],
                value="中文" if lang == "zh" else "English",
                label=t("lang", lang),
                scale=0,
                min_width=200,
                elem_id="ft-lang",
            )

        with gr.Tab(t("tab_train", lang), id="train") as tab_train:
            L(tab_train, "tab_train")
            with gr.Row():
                shipped = L(
                    gr.Dropdown(recipes, value=first, label=t("shipped", lang), elem_id="ft-shipped"), "shipped"
                )
                recipe_file = L(gr.Textbox(label=t("recipe_file", lang), elem_id="ft-recipe-file"), "recipe_file")
                load_btn = L(gr.Button(t("load", lang), scale=0, elem_id="ft-load"), "load", "value")
            with gr.Row():
                fields = {}
                values = form_values(base_recipe)
                for (name, _, _), value in zip(FORM_KEYS[:4], values[:4]):
                    choices = lists[name] if value in (None, *lists[name]) else [*lists[name], value]
                    fields[name] = L(
                        gr.Dropdown(
                            choices,
                            value=value,
                            label=t(name, lang),
                            allow_custom_value=True,
                            elem_id=f"ft-{name}",
                        ),
                        name,
                    )
            with gr.Row():
                for (name, _, _), value in zip(FORM_KEYS[4:11], values[4:11]):
                    # Gradio's Number shows an absent value as 0: max_steps, often absent, is a text box
                    box = gr.Textbox if name == "max_steps" else gr.Number
                    fields[name] = L(box(value=value, label=t(name, lang), elem_id=f"ft-{name}"), name)
            with gr.Row():
                fields["output_dir"] = L(
                    gr.Textbox(value=values[11], label=t("output_dir", lang), elem_id="ft-output_dir", scale=4),
                    "output_dir",
                )
                t_over = L(gr.Checkbox(False, label=t("overwrite_run", lang), elem_id="ft-overwrite"), "overwrite_run")
            recipe_yaml = L(
                gr.Code(to_yaml(base_recipe), language="yaml", label=t("yaml", lang), elem_id="ft-yaml"), "yaml"
            )
            with gr.Row():
                dry_btn = L(gr.Button(t("dry_run", lang), elem_id="ft-dry-run"), "dry_run", "value")
                start_btn = L(gr.Button(t("start", lang), variant="primary", elem_id="ft-start"), "start", "value")
                stop_btn = L(gr.Button(t("stop", lang), variant="stop", elem_id="ft-stop"), "stop", "value")
            status = L(gr.Textbox(label=t("status", lang), interactive=False, elem_id="ft-status"), "status")
            plan = L(gr.Textbox(label=t("plan", lang), lines=6, interactive=False, elem_id="ft-plan"), "plan")
            with gr.Row():
                log_box = L(
                    gr.Textbox(
                        label=t("log", lang),
                        lines=14,
                        max_lines=14,
                        interactive=False,
                        autoscroll=True,
                        elem_id="ft-log",
                    ),
                    "log",
                )
                curve = L(
                    gr.LinePlot(
                        pd.DataFrame({"step": [], "loss": []}),
                        x="step",
                        y="loss",
                        label=t("loss", lang),
                        elem_id="ft-curve",
                    ),
                    "loss",
                )
            timer = gr.Timer(1.0)

        with gr.Tab(t("tab_data", lang), id="data") as tab_data:
            L(tab_data, "tab_data")
            with gr.Row():
                d_data = L(
                    gr.Dropdown(
                        lists["data"],
                        value="alpaca_en_demo",
                        allow_custom_value=True,
                        label=t("data", lang),
                        elem_id="ft-d-data",
                    ),
                    "data",
                )
                d_model = L(
                    gr.Dropdown(
                        lists["model"],
                        value="tiny-llama",
                        allow_custom_value=True,
                        label=t("model", lang),
                        elem_id="ft-d-model",
                    ),
                    "model",
                )
                d_index = L(gr.Number(0, precision=0, label=t("index", lang)), "index")
                d_btn = L(gr.Button(t("preview", lang), elem_id="ft-d-preview"), "preview", "value")
            d_out = L(gr.HTML(label=t("preview_out", lang), elem_id="ft-d-out"), "preview_out")

        with gr.Tab(t("tab_chat", lang), id="chat") as tab_chat:
            L(tab_chat, "tab_chat")
            with gr.Row():
                c_dir = L(gr.Textbox(label=t("chat_dir", lang), elem_id="ft-c-dir"), "chat_dir")
                c_system = L(gr.Textbox(label=t("system", lang), elem_id="ft-c-system"), "system")
                c_max = L(gr.Number(128, precision=0, label=t("max_new", lang)), "max_new")
                c_temp = L(gr.Number(0.0, label=t("temperature", lang)), "temperature")
            chatbot = L(gr.Chatbot(label=t("chatbot", lang), height=320, elem_id="ft-chatbot"), "chatbot")
            with gr.Row():
                c_msg = L(gr.Textbox(label=t("message", lang), scale=4, elem_id="ft-c-msg"), "message")
                c_send = L(
                    gr.Button(t("send", lang), variant="primary", scale=1, elem_id="ft-c-send"), "send", "value"
                )
                c_reset = L(gr.Button(t("reset", lang), scale=1, elem_id="ft-c-reset"), "reset", "value")

        with gr.Tab(t("tab_eval", lang), id="eval") as tab_eval:
            L(tab_eval, "tab_eval")
            with gr.Row():
                e_dir = L(gr.Textbox(label=t("eval_dir", lang), elem_id="ft-e-dir"), "eval_dir")
                e_data = L(
                    gr.Dropdown(
                        ["", *lists["data"]],
                        value="messages_demo",
                        allow_custom_value=True,
                        label=t("eval_data", lang),
                        elem_id="ft-e-data",
                    ),
                    "eval_data",
                )
                e_suite = L(gr.Textbox(label=t("suite", lang)), "suite")
                e_base = L(gr.Textbox(label=t("baseline", lang)), "baseline")
                e_max = L(gr.Number(8, precision=0, label=t("max_samples", lang)), "max_samples")
            with gr.Row():
                e_out = L(
                    gr.Textbox(str(runs / "eval"), label=t("eval_out", lang), elem_id="ft-e-out", scale=4), "eval_out"
                )
                e_over = L(
                    gr.Checkbox(False, label=t("overwrite_report", lang), elem_id="ft-e-overwrite"), "overwrite_report"
                )
            e_btn = L(gr.Button(t("run_eval", lang), variant="primary", elem_id="ft-e-run"), "run_eval", "value")
            e_log = L(gr.Textbox(label=t("log", lang), lines=4, interactive=False, elem_id="ft-e-log"), "log")
            e_table = L(
                gr.Dataframe(
                    pd.DataFrame({"metric": [], "value": []}),
                    headers=["metric", "value"],
                    label=t("metrics", lang),
                    interactive=False,
                    elem_id="ft-e-metrics",
                ),
                "metrics",
            )
            e_report = L(gr.HTML(label=t("report", lang)), "report")

        with gr.Tab(t("tab_export", lang), id="export") as tab_export:
            L(tab_export, "tab_export")
            with gr.Row():
                x_dir = L(gr.Textbox(label=t("export_dir", lang), elem_id="ft-x-dir"), "export_dir")
                x_kind = L(
                    gr.Radio(
                        ["merge", "gguf", "safetensors"],
                        value="merge",
                        label=t("export_kind", lang),
                        elem_id="ft-x-kind",
                    ),
                    "export_kind",
                )
                x_outtype = L(gr.Radio(["f32", "f16", "q8_0"], value="f16", label=t("outtype", lang)), "outtype")
            with gr.Row():
                x_out = L(
                    gr.Textbox(str(runs / EXPORT_OUT["merge"]), label=t("export_out", lang), elem_id="ft-x-out"),
                    "export_out",
                )
                x_ollama = L(gr.Checkbox(False, label=t("ollama", lang)), "ollama")
                x_over = L(gr.Checkbox(False, label=t("overwrite", lang), elem_id="ft-x-overwrite"), "overwrite")
            x_btn = L(gr.Button(t("run_export", lang), variant="primary", elem_id="ft-x-run"), "run_export", "value")
            x_log = L(gr.Textbox(label=t("log", lang), lines=8, interactive=False, elem_id="ft-x-log"), "log")
            x_files = L(
                gr.Textbox(label=t("written", lang), lines=6, interactive=False, elem_id="ft-x-files"), "written"
            )

        # ---- language
        def switch(choice):
            code = code_of(choice)
            out = []
            for _component, key, attr in labelled:
                text = t(key, code)
                if key == "title":
                    text = f"## {text}\n{TEXT['subtitle'][1 if code == 'zh' else 0]}"
                out.append(gr.update(**{attr: text}))
            return out

        lang_box.change(switch, lang_box, [c for c, _, _ in labelled])

        # ---- train
        form = [fields[name] for name, _, _ in FORM_KEYS]

        def locate_recipe(shipped_path, file_path) -> tuple[Path, str, str | None]:
            """(file, name shown, shipped name or None): a shipped recipe by its name, else a file in the root."""
            text = (file_path or "").strip()
            if not text and shipped_path in recipes:
                return REPO_RECIPES.parent / shipped_path, shipped_path, shipped_path
            if not text:
                raise Refused("choose a shipped recipe or give a recipe file")
            return workspace.path(text, "recipe file"), text, None

        def load(shipped_path, file_path, choice):
            try:
                path, shown, shipped_name = locate_recipe(shipped_path, file_path)
                recipe = read_recipe(path, shown)
            except FinetuneError as e:
                return [gr.update()] * (len(form) + 3) + [str(e)]
            updates = [
                gr.update(value=v, choices=lists[name] if v in (None, *lists[name]) else [*lists[name], v])
                if name in lists
                else v
                for (name, _, _), v in zip(FORM_KEYS, form_values(recipe))
            ]
            picked = gr.update(value=shipped_name)  # None for a file: the list no longer names what is loaded
            return [*updates, recipe, to_yaml(recipe), picked, f"{t('loaded', code_of(choice))} {shown}"]

        load_outputs = [*form, state_recipe, recipe_yaml, shipped, status]
        load_btn.click(load, [shipped, recipe_file, lang_box], load_outputs, api_name="load")
        shipped.input(lambda s, c: load(s, "", c), [shipped, lang_box], load_outputs)

        def live_yaml(recipe, *values):
            return to_yaml(recipe_with_form(recipe, list(values)))

        for field in form:
            field.change(live_yaml, [state_recipe, *form], recipe_yaml)

        def write_recipe(text: str, overwrite_confirmed: bool = False) -> tuple[Path, Path]:
            """The recipe in the YAML box, checked (paths in the root, flags, overwrite) and written to
            `runs/`; (recipe file, output dir)."""
            try:
                recipe = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise FinetuneError(f"recipe YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(recipe, dict):
                raise FinetuneError("recipe YAML: a recipe is a mapping of sections")
            recipe = workspace.check_recipe(recipe)
            out_dir = Path(recipe["output"]["dir"])
            if recipe["output"].get("overwrite") and not overwrite_confirmed:
                raise Refused(f"output.overwrite: replacing {out_dir} needs the Overwrite box ticked")
            if overwrite_confirmed:
                recipe["output"]["overwrite"] = True
            runs.mkdir(parents=True, exist_ok=True)
            path = run_yaml(runs, out_dir, root)
            path.write_text(to_yaml(recipe, str(path)), encoding="utf-8")
            return path, out_dir

        def dry_run(text):
            try:
                path, _ = write_recipe(text)
            except FinetuneError as e:
                return f"error: {e}"
            rc, out = run_command(["train", str(path), "--dry-run"], root, 600)
            return out if rc == 0 else f"error: {error_line(out)}"

        dry_btn.click(dry_run, recipe_yaml, plan, api_name="dry_run")

        def start(text, overwrite, choice):
            code = code_of(choice)
            try:
                path, out_dir = write_recipe(text, bool(overwrite))
            except FinetuneError as e:
                return str(e)
            if not runner.start(path, out_dir, root):
                return t("busy", code)
            return f"{t('running', code)}: finetune train {path}"

        start_btn.click(start, [recipe_yaml, t_over, lang_box], status, api_name="start")

        def stop(choice):
            runner.stop()
            return status_line(code_of(choice))

        stop_btn.click(stop, lang_box, status, api_name="stop")

        def status_line(code: str) -> str:
            state, rc = runner.state()
            points = runner.losses()
            progress = runner.progress()
            where = ""
            if progress and state == "running":
                step, total, left = progress
                eta = f", {t('eta', code)} {_duration(left)}" if left is not None else ""
                where = f"; {t('step', code)} {step}/{total}{eta}"
            last = f"; loss {points[-1][1]:.4f} ({len(points)} logged)" if points else ""
            word = t(state, code).format(rc=rc)
            if state in ("stopped", "failed"):
                ckpt = runner.resume_point()
                word += "; " + (
                    t("resumes_from", code).format(ckpt=ckpt.name, path=ckpt) if ckpt else t("no_checkpoint", code)
                )
            output = f"; output {runner.output_dir}" if state == "finished" else ""
            return f"{word}{where}{last}{output}"

        def poll(choice):
            if runner.state()[0] == "idle":
                return gr.update(), gr.update(), gr.update()
            points = runner.losses()
            frame = pd.DataFrame({"step": [p[0] for p in points], "loss": [p[1] for p in points]})
            return status_line(code_of(choice)), runner.log_tail(14), frame

        timer.tick(poll, lang_box, [status, log_box, curve])

        # ---- data
        d_btn.click(
            lambda data, model, index: preview_html(workspace, data, model, index),
            [d_data, d_model, d_index],
            d_out,
            api_name="preview_html",
        )

        # ---- chat
        def send(path, system, history, message, max_new, temperature):
            history = list(history or [])
            if not message.strip():
                yield history, ""
                return
            if not (path or "").strip():
                yield [*history, {"role": "assistant", "content": "choose a model or output dir first"}], message
                return
            prior = [m for m in history if m["role"] in ("user", "assistant")]
            history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            try:
                for partial in chats.stream(path.strip(), system, prior, message, max_new, temperature):
                    history[-1] = {"role": "assistant", "content": partial}
                    yield history, ""
            except FinetuneError as e:
                history[-1] = {"role": "assistant", "content": f"error: {e}"}
                yield history, ""

        c_send.click(send, [c_dir, c_system, chatbot, c_msg, c_max, c_temp], [chatbot, c_msg], api_name="send")
        c_msg.submit(send, [c_dir, c_system, chatbot, c_msg, c_max, c_temp], [chatbot, c_msg])
        c_reset.click(list, None, chatbot)

        # ---- evaluate
        def evaluate(path, data, suite, baseline, max_samples, out, overwrite, choice):
            empty = pd.DataFrame({"metric": [], "value": []})
            try:
                model = workspace.name_or_path(path, "model or output dir")
                out_path = workspace.output(out, "report dir")
                data, suite, baseline = (
                    workspace.name_or_path(v, what)
                    for v, what in ((data, "dataset"), (suite, "suite"), (baseline, "baseline"))
                )
            except Refused as e:
                return str(e), empty, ""
            if out_path.exists() and not overwrite:
                return t("report_exists", code_of(choice)).format(path=out_path), empty, ""
            args = ["eval", model, "--out", str(out_path)] + (["--overwrite"] if overwrite else [])
            if data:
                args += ["--data", data, "--max-samples", str(int(max_samples or 8))]
            if suite:
                args += ["--suite", suite]
            if baseline:
                args += ["--baseline", baseline]
            rc, text = run_command(args, root)
            report = out_path / "report.json"
            table = empty
            if rc == 0 and report.is_file():
                data = json.loads(report.read_text(encoding="utf-8"))
                metrics = _flat({k: data[k] for k in ("generation", "suite") if isinstance(data.get(k), dict)})
                table = pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())})
            page = report.with_suffix(".html")
            frame = (
                (
                    f"<iframe style='width:100%;height:600px;border:0' srcdoc='{html.escape(page.read_text())}'>"
                    "</iframe>"
                )
                if rc == 0 and page.is_file()
                else ""
            )
            return text[-4000:], table, frame

        e_btn.click(
            evaluate,
            [e_dir, e_data, e_suite, e_base, e_max, e_out, e_over, lang_box],
            [e_log, e_table, e_report],
            api_name="evaluate",
        )

        # ---- export
        def export(path, kind, outtype, out, ollama, overwrite, choice):
            try:
                source = workspace.path(path, "adapter or model dir")
                out_path = workspace.output(out, "output path")
            except Refused as e:
                return str(e), ""
            if out_path.exists() and not overwrite:
                return t("export_exists", code_of(choice)).format(path=out_path), ""
            if kind == "merge":
                args = ["merge", str(source), "--out", str(out_path)]
            else:
                args = ["export", str(source), "--format", kind, "--out", str(out_path)]
                if kind == "gguf":
                    args += ["--outtype", outtype] + (["--ollama"] if ollama else [])
            if overwrite:
                args.append("--overwrite")
            rc, text = run_command(args, root)
            return f"$ finetune {' '.join(args)}\n{text}\n(exit {rc})", written_files(out_path) if rc == 0 else ""

        x_btn.click(
            export,
            [x_dir, x_kind, x_outtype, x_out, x_ollama, x_over, lang_box],
            [x_log, x_files],
            api_name="export",
        )

        def default_out(kind, out):
            """The output path follows the kind while it is one of the defaults (a `.gguf` file for GGUF)."""
            defaults = {str(runs / v) for v in EXPORT_OUT.values()}
            return str(runs / EXPORT_OUT[kind]) if (out or "").strip() in defaults | {""} else gr.update()

        x_kind.change(default_out, [x_kind, x_out], x_out)

    app.finetune_runner = runner
    return app


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = round(float(v), 4)
    return out


class NoUploads:
    """ASGI middleware: the app has no file inputs, so Gradio's upload routes answer 403 (an upload is
    how a file of the sender's choosing would land on this machine)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith(("/upload", "/upload_progress")):
            body = b'{"error": "uploads are off: this app takes no files"}'
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    lang: str = "en",
    workspace: Workspace | None = None,
    runs_dir: str = "runs",
    auth: list[tuple[str, str]] | None = None,
    block: bool = True,
):
    from starlette.middleware import Middleware

    app = build(lang, workspace, runs_dir)
    app.queue(default_concurrency_limit=4)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        show_error=True,
        inbrowser=False,
        quiet=True,
        auth=auth or None,
        css=CSS,
        max_file_size=0,  # and NoUploads: no uploads at all
        app_kwargs={"middleware": [Middleware(NoUploads)]},
    )
    return app
