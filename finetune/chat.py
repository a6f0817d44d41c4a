"""`finetune chat`: talk to a model or adapter dir (or a tiny name / hub id, as `eval` takes) in the
terminal, with the model's chat template and the system prompt it was trained with.

Answers stream token by token. The conversation is kept (the model sees the history); `/reset`
clears it (the system prompt stays), `/exit` or end of input (Ctrl-D) quits; Ctrl-C stops an answer.
Lines are edited with readline (arrow keys, history kept across sessions). `--prompt` answers one
message and exits, for scripts: only the answer goes to stdout.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from finetune import image_inputs
from finetune.data.chat_formats import DEFAULT_REASONING_TAGS, split_inline_reasoning
from finetune.data.encode import template_messages
from finetune.errors import FinetuneError
from finetune.generate import generate, whole_characters
from finetune.loading import load_for_inference
from finetune.outputs import recorded_system_prompt

HELP = "commands: /reset clears the history, /exit quits"
HISTORY_LENGTH = 1000


def history_file() -> Path:
    """Where chat keeps its input history: $XDG_STATE_HOME/finetune/chat_history (~/.local/state/...)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "finetune" / "chat_history"


def enable_line_editing(history: Path | None = None) -> None:
    """readline for input(): arrow keys edit and recall lines instead of inserting escape codes;
    the history is read from and (at exit) written to `history`. Without readline (Windows), plain input()."""
    try:
        import readline
    except ImportError:
        return
    import atexit

    readline.set_history_length(HISTORY_LENGTH)
    if history is None:
        return
    try:
        readline.read_history_file(history)
    except (FileNotFoundError, OSError):
        pass

    def save():
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass  # a read-only home: the history of this session is lost, nothing else

    atexit.register(save)


def model_dir(name: str) -> str:
    """A model or adapter dir for `name`: a dir as given, a tiny name built (once) into its cache, a hub id
    from the Hugging Face cache (downloaded when online) - the names `finetune eval` accepts."""
    from finetune import loading

    if Path(name).expanduser().is_dir():
        return name
    resolved = loading.resolve_reference(name, "MODEL_OR_ADAPTER_DIR")
    if Path(resolved).is_dir():
        return resolved
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except (OSError, ValueError) as e:  # offline, unknown id, gated repo (hub errors are OSErrors): one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(
            f"MODEL_OR_ADAPTER_DIR: {name}: not a directory, a tiny model or a loadable hub model ({first})"
        ) from None


class Chat:
    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        template_kwargs: dict | None = None,
        reasoning_tags=DEFAULT_REASONING_TAGS,
        processor=None,
    ):
        self.model, self.tok = model, tokenizer
        self.processor = processor  # a vision-language model's: renders turns that carry images
        self.system = system
        # as in training (model.chat_template_kwargs, data.reasoning_tags of the run's recipe)
        self.template_kwargs, self.reasoning_tags = dict(template_kwargs or {}), tuple(reasoning_tags)
        self.gen = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tokenizer.pad_token_id)
        if temperature > 0:
            self.gen.update(temperature=temperature, top_p=top_p)
        else:  # greedy: no sampling knobs (generation_config may carry some; they would only warn)
            self.gen.update(temperature=None, top_p=None, top_k=None)
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def answer(self, text: str, stream=None, images=()) -> str:
        """Generate the reply to `text` (printing it to `stream` as it comes) and add both to the history.
        `images` (PIL images) go with this turn, before its text; they stay in the history."""
        import torch
        from jinja2 import TemplateError

        if images and self.processor is None:
            raise FinetuneError("--image: this model takes no images (it has no image processor)")
        self.history.append(image_inputs.user_turn(text, list(images)))
        try:
            if image_inputs.has_images(self.history):
                messages, opened = image_inputs.with_images(template_messages(self.messages()), "chat")
                enc = image_inputs.render(self.processor, messages, self.template_kwargs, opened)
            else:
                enc = self.tok.apply_chat_template(
                    template_messages(self.messages()),
                    add_generation_prompt=True,
                    return_tensors="pt",
                    return_dict=True,
                    **self.template_kwargs,
                )
                enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        except TemplateError as e:  # e.g. a template that refuses system turns
            self.history.pop()
            raise FinetuneError(f"the model's chat template refused this conversation: {e}") from None
        enc = image_inputs.to_model(enc, self.model)
        streamer = _streamer(self.tok, stream) if stream is not None else None
        with torch.no_grad():
            out = generate(self.model, **enc, **self.gen, streamer=streamer)
        reply = whole_characters(self.tok, out[0, enc["input_ids"].shape[1] :].tolist(), skip_special_tokens=True)
        reply = reply.strip()
        reasoning, answer = split_inline_reasoning(reply, self.reasoning_tags)
        # the history holds the reasoning apart, as training data does: the template shows it as it shows it there
        turn = {"role": "assistant", "content": answer}
        if reasoning:
            turn["reasoning_content"] = reasoning
        self.history.append(turn)
        return reply


def _with(images: list) -> dict:
    """answer()'s images argument, only when there are images (a text chat calls it as it always did)."""
    return {"images": images} if images else {}


def _streamer(tok, stream):
    """transformers' TextStreamer, writing to `stream` instead of print()."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return StreamTo(tok, skip_prompt=True, skip_special_tokens=True)


def run_cli(args) -> int:
    from finetune.merge import quiet_progress

    quiet_progress()
    warnings.filterwarnings("ignore", message="Position ids are not supported")  # prompt-tuning adapters: harmless
    from finetune.outputs import OutputDir

    path = model_dir(args.model)
    model, tok, source = load_for_inference(path, args.base)
    processor = image_inputs.vision_processor(source)
    images = [image_inputs.open_image(p, "--image") for p in getattr(args, "image", None) or []]
    if images and processor is None:
        raise FinetuneError(f"--image: {args.model} takes no images (a text-only model: no image processor)")
    recipe = OutputDir(source.path).recipe_dict() if Path(str(source.path)).is_dir() else {}
    system = args.system if args.system is not None else recorded_system_prompt(path)
    chat = Chat(
        model,
        tok,
        system or None,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        template_kwargs=(recipe.get("model") or {}).get("chat_template_kwargs"),
        reasoning_tags=(recipe.get("data") or {}).get("reasoning_tags") or DEFAULT_REASONING_TAGS,
        processor=processor,
    )
    if args.prompt is not None:
        chat.answer(args.prompt, stream=sys.stdout, **_with(images))
        return 0
    what = f"{source.peft_type.lower()} adapter on {source.base}" if source.kind == "adapter" else "model"
    print(f"chatting with {source.path} ({what}); {HELP}", file=sys.stderr)
    if system and args.system is None:
        print(f"system prompt (the one it was trained with; --system replaces it): {system}", file=sys.stderr)
    if sys.stdin.isatty():
        enable_line_editing(history_file())
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            chat.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}; {HELP}", file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        try:
            chat.answer(text, stream=sys.stdout, **_with(images))
            images = []  # --image goes with the first message; the history keeps it
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            chat.history = chat.history[:-1] if chat.history and chat.history[-1]["role"] == "user" else chat.history
            print("\n(answer interrupted)", file=sys.stderr)
