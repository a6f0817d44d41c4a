"""The Gradio app: Train, Data, Chat, Evaluate and Export tabs over the same functions and commands the
terminal uses (`finetune train / eval / merge / export` run as subprocesses; data preview, dry-run plans
and chat call finetune's own functions). No training logic lives here."""

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


def shipped_recipes() -> list[str]:
    if not REPO_RECIPES.is_dir():
        return []
    return sorted(
        str(p.relative_to(REPO_RECIPES.parent))
        for p in REPO_RECIPES.rglob("*.yaml")
        if "accelerate" not in p.parts and "pipelines" not in p.parts
    )


def read_recipe(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = REPO_RECIPES.parent / path
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FinetuneError(f"{path}: {str(e).splitlines()[0]}") from None


def form_values(recipe: dict) -> list:
    out = []
    for _, section, key in FORM_KEYS:
        value = recipe.get(key) if section is None else (recipe.get(section) or {}).get(key)
        out.append(value)
    return out


def recipe_with_form(recipe: dict, values: list) -> dict:
    recipe = json.loads(json.dumps(recipe))  # a deep copy of plain data
    for (_, section, key), value in zip(FORM_KEYS, values):
        if value is None or value == "":
            continue
        if isinstance(value, float) and value.is_integer() and key != "learning_rate":
            value = int(value)
        if section is None:
            recipe[key] = value
        else:
            recipe.setdefault(section, {})[key] = value
    if recipe.get("train", {}).get("max_steps") == -1:
        recipe["train"].pop("max_steps")
    return recipe


def to_yaml(recipe: dict, path_hint: str = "RECIPE.yaml") -> str:
    return f"# finetune train {path_hint}\n" + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def preview_html(dataset: str, model: str, index: int) -> str:
    """`finetune data preview`, with the trained tokens highlighted."""
    from finetune import loading
    from finetune.config import ModelSection
    from finetune.data.preview import preview

    try:
        tok = loading.load_tokenizer(ModelSection(name_or_path=model))
        text = preview(dataset, tok, index=int(index or 0), color=True)
    except (FinetuneError, OSError, ValueError) as e:
        return f"<pre class='ft-error'>{html.escape(str(e))}</pre>"
    body = ANSI_GREEN.sub(lambda m: "\x00" + m.group(1) + "\x01", text)
    body = (
        html.escape(body)
        .replace("\x00", "<mark class='ft-trained' style='background:#9be59b'>")
        .replace("\x01", "</mark>")
    )
    return f"<pre class='ft-preview' style='white-space: pre-wrap'>{body}</pre>"


class ChatSessions:
    """Loaded models for the Chat tab, one at a time (the last dir chosen)."""

    def __init__(self):
        self.path, self.model, self.tok = None, None, None
        self.lock = threading.Lock()

    def get(self, path: str):
        from finetune.loading import load_for_inference

        with self.lock:
            if path != self.path:
                self.model, self.tok, _ = load_for_inference(path)
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


def run_command(args: list[str], cwd: Path, timeout: int = 3600) -> tuple[int, str]:
    r = subprocess.run(
        finetune_command(*args), cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    return r.returncode, (r.stdout + ("\n" if r.stdout and r.stderr else "") + r.stderr).strip()


def written_files(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    siblings = sorted(path.parent.glob(path.stem + "*")) if path.suffix else []
    rows = {p: p.stat().st_size for p in [*files, *siblings] if p.is_file()}
    return "\n".join(f"{p}  ({size:,} bytes)" for p, size in rows.items()) or "(nothing written)"


def build(lang: str = "en", runs_dir: str = "runs"):
    import gradio as gr
    import pandas as pd

    runs = Path(runs_dir).expanduser().resolve()
    cwd = Path.cwd()
    runner, chats = Runner(), ChatSessions()
    labelled: list[tuple[object, str, str]] = []  # (component, text key, "label" | "value")

    def L(component, key, attr="label"):
        labelled.append((component, key, attr))
        return component

    recipes = shipped_recipes()
    first = next((r for r in recipes if r.endswith("tiny/sft_lora.yaml")), recipes[0] if recipes else None)
    base_recipe = read_recipe(first) if first else {"stage": "sft", "model": {"name_or_path": "tiny-llama"}}

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
                    fields[name] = L(gr.Textbox(value=value, label=t(name, lang), elem_id=f"ft-{name}"), name)
            with gr.Row():
                for (name, _, _), value in zip(FORM_KEYS[4:11], values[4:11]):
                    fields[name] = L(gr.Number(value=value, label=t(name, lang), elem_id=f"ft-{name}"), name)
            fields["output_dir"] = L(
                gr.Textbox(value=values[11], label=t("output_dir", lang), elem_id="ft-output_dir"), "output_dir"
            )
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
                d_data = L(gr.Textbox("alpaca_en_demo", label=t("data", lang), elem_id="ft-d-data"), "data")
                d_model = L(gr.Textbox("tiny-llama", label=t("model", lang), elem_id="ft-d-model"), "model")
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
                e_data = L(gr.Textbox("messages_demo", label=t("eval_data", lang), elem_id="ft-e-data"), "eval_data")
                e_suite = L(gr.Textbox(label=t("suite", lang)), "suite")
                e_base = L(gr.Textbox(label=t("baseline", lang)), "baseline")
                e_max = L(gr.Number(8, precision=0, label=t("max_samples", lang)), "max_samples")
            e_out = L(gr.Textbox(str(runs / "eval"), label=t("eval_out", lang), elem_id="ft-e-out"), "eval_out")
            e_btn = L(gr.Button(t("run_eval", lang), variant="primary", elem_id="ft-e-run"), "run_eval", "value")
            e_log = L(gr.Textbox(label=t("log", lang), lines=4, interactive=False, elem_id="ft-e-log"), "log")
            e_table = L(gr.Dataframe(label=t("metrics", lang), elem_id="ft-e-metrics"), "metrics")
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
                    gr.Textbox(str(runs / "export" / "merged"), label=t("export_out", lang), elem_id="ft-x-out"),
                    "export_out",
                )
                x_ollama = L(gr.Checkbox(False, label=t("ollama", lang)), "ollama")
                x_over = L(gr.Checkbox(False, label=t("overwrite", lang)), "overwrite")
            x_btn = L(gr.Button(t("run_export", lang), variant="primary", elem_id="ft-x-run"), "run_export", "value")
            x_log = L(gr.Textbox(label=t("log", lang), lines=8, interactive=False, elem_id="ft-x-log"), "log")
            x_files = L(
                gr.Textbox(label=t("written", lang), lines=6, interactive=False, elem_id="ft-x-files"), "written"
            )

        # ---- language
        def switch(choice):
            code = "zh" if choice == "中文" else "en"
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

        def load(shipped_path, file_path):
            path = (file_path or "").strip() or shipped_path
            try:
                recipe = read_recipe(path)
            except FinetuneError as e:
                return [gr.update()] * (len(form) + 1) + [gr.update(), str(e)]
            return [*form_values(recipe), recipe, to_yaml(recipe), f"loaded {path}"]

        load_btn.click(load, [shipped, recipe_file], [*form, state_recipe, recipe_yaml, status])
        shipped.change(load, [shipped, recipe_file], [*form, state_recipe, recipe_yaml, status])

        def live_yaml(recipe, *values):
            return to_yaml(recipe_with_form(recipe, list(values)))

        for field in form:
            field.change(live_yaml, [state_recipe, *form], recipe_yaml)

        def write_recipe(text: str) -> tuple[Path, Path]:
            try:
                recipe = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise FinetuneError(f"recipe YAML: {str(e).splitlines()[0]}") from None
            out_dir = Path(str((recipe.get("output") or {}).get("dir") or "outputs/run")).expanduser()
            out_dir = out_dir if out_dir.is_absolute() else cwd / out_dir
            runs.mkdir(parents=True, exist_ok=True)
            path = runs / f"{out_dir.name}.yaml"
            path.write_text(
                f"# finetune train {path}\n" + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True),
                encoding="utf-8",
            )
            return path, out_dir

        def dry_run(text):
            import importlib

            from finetune import config

            try:
                path, _ = write_recipe(text)
                recipe = config.load(str(path), [])
                return importlib.import_module(f"finetune.stages.{recipe.stage}").plan(recipe).render()
            except FinetuneError as e:
                return f"error: {e}"

        dry_btn.click(dry_run, recipe_yaml, plan)

        def start(text, choice):
            code = "zh" if choice == "中文" else "en"
            try:
                path, out_dir = write_recipe(text)
            except FinetuneError as e:
                return str(e)
            if not runner.start(path, out_dir, cwd):
                return t("busy", code)
            return f"{t('running', code)}: finetune train {path}"

        start_btn.click(start, [recipe_yaml, lang_box], status)

        def stop():
            runner.stop()

        stop_btn.click(stop, None, None)

        def poll(choice):
            code = "zh" if choice == "中文" else "en"
            state, rc = runner.state()
            if state == "idle":
                return gr.update(), gr.update(), gr.update()
            points = runner.losses()
            frame = pd.DataFrame({"step": [p[0] for p in points], "loss": [p[1] for p in points]})
            word = t(state, code).format(rc=rc)
            last = f"; loss {points[-1][1]:.4f} ({len(points)} logged)" if points else ""
            where = f"; output {runner.output_dir}" if state == "finished" else ""
            return f"{word}{last}{where}", runner.log_tail(14), frame

        timer.tick(poll, lang_box, [status, log_box, curve])

        # ---- data
        d_btn.click(preview_html, [d_data, d_model, d_index], d_out)

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

        c_send.click(send, [c_dir, c_system, chatbot, c_msg, c_max, c_temp], [chatbot, c_msg])
        c_msg.submit(send, [c_dir, c_system, chatbot, c_msg, c_max, c_temp], [chatbot, c_msg])
        c_reset.click(list, None, chatbot)

        # ---- evaluate
        def evaluate(path, data, suite, baseline, max_samples, out):
            args = ["eval", path.strip(), "--out", out.strip(), "--overwrite"]
            if data.strip():
                args += ["--data", data.strip(), "--max-samples", str(int(max_samples or 8))]
            if suite.strip():
                args += ["--suite", suite.strip()]
            if baseline.strip():
                args += ["--baseline", baseline.strip()]
            rc, text = run_command(args, cwd)
            report = Path(out.strip()).expanduser() / "report.json"
            table = pd.DataFrame()
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

        e_btn.click(evaluate, [e_dir, e_data, e_suite, e_base, e_max, e_out], [e_log, e_table, e_report])

        # ---- export
        def export(path, kind, outtype, out, ollama, overwrite):
            out_path = Path(out.strip()).expanduser()
            if kind == "merge":
                args = ["merge", path.strip(), "--out", str(out_path)]
            else:
                args = ["export", path.strip(), "--format", kind, "--out", str(out_path)]
                if kind == "gguf":
                    args += ["--outtype", outtype] + (["--ollama"] if ollama else [])
            if overwrite:
                args.append("--overwrite")
            rc, text = run_command(args, cwd)
            return f"$ finetune {' '.join(args)}\n{text}\n(exit {rc})", written_files(out_path) if rc == 0 else ""

        x_btn.click(export, [x_dir, x_kind, x_outtype, x_out, x_ollama, x_over], [x_log, x_files])

    app.finetune_runner = runner
    return app


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = round(float(v), 4)
    return out


def launch(host: str = "127.0.0.1", port: int = 7860, lang: str = "en", runs_dir: str = "runs", block: bool = True):
    app = build(lang, runs_dir)
    app.queue(default_concurrency_limit=4)
    app.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, inbrowser=False, quiet=True
    )
    return app
