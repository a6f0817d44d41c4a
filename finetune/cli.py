"""Argument parsing and dispatch only. `finetune --help` lists the commands."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings

from finetune.env import version_line
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")
# What Ctrl-C leaves behind, per command (every output is written atomically: nothing half-written remains).
INTERRUPTED = {
    "train": "run the same command again to resume from the last checkpoint (train.save_steps apart)",
    "pipeline": "run the same pipeline again: finished stages are skipped, the interrupted one resumes",
    "eval": "nothing was written to --out; run it again (evaluation has no checkpoints)",
    "merge": "nothing was written to --out",
    "export": "nothing was written to --out",
    "score": "nothing was written (with --out); run it again",
    "data": "nothing was written",
    "chat": "bye",
    "env": "nothing was written",
    "cache": "an entry being removed was renamed first: none is left half-removed under its name",
}
EXIT_GATE = (
    1  # eval.fail_on_regression: the run finished but its gate failed (as `finetune eval --fail-on-regression`)
)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (an in-process caller, such as the web UI
    or a test, may swap it), never to a stream that has since been closed."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _no_loading_bars(factory, args, kwargs):
    """transformers' tqdm hook: its "Loading weights" bar (one per model loaded) off, every other bar as it was."""
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def _no_mtime_notice(record) -> bool:
    """transformers' notice that checkpoints saved within a second (tiny runs) are ordered by number, not mtime:
    harmless, and it lands inside the progress bar."""
    return "mtime may not be reliable" not in record.getMessage()


def _quiet_libraries(debug: bool) -> None:
    """Keep the terminal for progress bars and our own messages."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # a pipe or a log file: no \r-redrawn bars (transformers and the hub read this)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # already imported (an in-process caller): tell it directly
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
    elif not debug:  # a terminal: the training and generation bars stay; the per-model "Loading weights" ones go
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_tqdm_hook(_no_loading_bars)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        logging.getLogger("transformers.trainer_utils").addFilter(_no_mtime_notice)
    try:
        import datasets

        datasets.disable_progress_bars()  # per-map bars over a few hundred rows are noise
    except ImportError:
        pass
    for old in [h for h in log.handlers if isinstance(h, _StderrHandler)]:  # an earlier in-process call's
        log.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("finetune: %(message)s"))
    log.addHandler(handler)
    # Other ranks of a distributed run say only what went wrong (the main process reports).
    log.setLevel(logging.DEBUG if debug else logging.INFO if _is_main_process() else logging.ERROR)
    log.propagate = False


class _Version(argparse.Action):
    """`--version` on one unwrapped line (argparse's own action wraps it at the terminal width)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


PICKLE_HELP = (
    "also load pickled weights (.bin/.pt), which can run code: only for files you trust (default: safetensors only)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune", description="Parameter-efficient fine-tuning of open LLMs from YAML recipes."
    )
    p.add_argument(
        "--version", action=_Version, nargs=0, help="show finetune's and its main libraries' versions and exit"
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train from a recipe", description="Train from a recipe YAML; key=value arguments override it."
    )
    train.add_argument("recipe", nargs="?", help="recipe YAML file (e.g. recipes/tiny/sft_lora.yaml)")
    train.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="override a recipe key, e.g. train.max_steps=10"
    )
    train.add_argument(
        "--dry-run", action="store_true", help="validate recipe, data and model config; print the plan; train nothing"
    )
    train.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="with --dry-run: the GPU the plan's will-it-fit verdict is for (e.g. 24GB)",
    )
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    fit = sub.add_parser(
        "fit",
        help="will it fit: estimate a recipe's peak GPU memory per device",
        description="Estimate the peak accelerator memory of one training process from the recipe and the "
        "model's config alone (weights, adapter, gradients, optimizer states, activations, framework), with a "
        "verdict against --gpu-memory (or the visible GPU) and the first change that would make it fit.",
    )
    fit.add_argument("recipe", help="recipe YAML file")
    fit.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a recipe key")
    fit.add_argument(
        "--gpu-memory", metavar="SIZE", help="memory of one GPU, e.g. 24GB or 80GiB (default: the visible GPU)"
    )
    fit.add_argument("--gpus", type=int, default=1, help="processes the run is launched with (default 1)")
    fit.add_argument(
        "--sharding",
        choices=["none", "zero1", "zero2", "zero3", "fsdp"],
        default="none",
        help="what the accelerate config shards: none (DDP), DeepSpeed ZeRO-1/2/3, FSDP full shard",
    )
    fit.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    pipe = sub.add_parser(
        "pipeline",
        help="run a multi-stage pipeline (sft -> rm -> ppo, sft -> dpo, ...)",
        description="Run the stages of a pipeline file in order, each into <output.dir>/<stage>; "
        "finished stages with the same recipe are skipped, an interrupted one resumes.",
    )
    pipe.add_argument("pipeline", nargs="?", help="pipeline YAML file (e.g. recipes/pipelines/dpo.yaml)")
    pipe.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="output.dir=DIR, STAGE.section.key=value (one stage) or section.key=value (every stage)",
    )
    pipe.add_argument("--dry-run", action="store_true", help="validate every stage's recipe and show what would run")
    pipe.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prev = data_sub.add_parser(
        "preview",
        help="show one training example as the model sees it, trained tokens marked",
        description="finetune data preview RECIPE [--index N] [section.key=value ...]: record N of the recipe's "
        "training data exactly as `finetune train` reads, converts and encodes it (its tokenizer, chat template, "
        "data.* settings, model.chat_template_kwargs, train.max_length). Quick look at a file: "
        "finetune data preview FILE --model MODEL [data.key=value ...].",
    )
    prev.add_argument("dataset", help="a recipe YAML, or a registry name, data file or hub dataset id")
    prev.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override a recipe key, e.g. data.encoding=gb18030 (the file form takes data.* and model.* keys)",
    )
    prev.add_argument("--model", help="file form: model (tokenizer + chat template): hub id, path or tiny-llama")
    prev.add_argument(
        "--format",
        help="record format (alpaca, sharegpt, messages, prompt_completion, text, preference, alpaca_preference, "
        "sharegpt_preference, kto, prompt)",
    )
    prev.add_argument("--index", type=int, default=0, help="which record (default 0)")
    prev.add_argument("--max-length", type=int, default=None, help="truncate as train.max_length would")
    prev.add_argument("--tokens", action="store_true", help="also list every token with its label")
    prev.add_argument(
        "--chat-template-kwargs",
        default=None,
        metavar="JSON",
        help="extra chat template variables, as model.chat_template_kwargs (e.g. '{\"enable_thinking\": true}')",
    )
    prev.add_argument(
        "--train-on",
        choices=["all_turns", "last_turn"],
        default=None,
        help="chat data: train every assistant turn or only the last (data.train_on)",
    )
    prev.add_argument(
        "--chat-template", default=None, help="a Jinja chat template or .jinja file replacing the model's"
    )
    prev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    prep = data_sub.add_parser(
        "prepare",
        help="encode a recipe's data into the prepared-data cache (no model, no training)",
        description="Read, convert and encode the recipe's data once into the cache that "
        "`finetune train` (every rank, every re-run) reuses; print where it is and what it holds.",
    )
    prep.add_argument("recipe", help="recipe YAML file")
    prep.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="override a recipe key, e.g. data.num_proc=8"
    )
    prep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    from finetune.eval import command as eval_command

    eval_command.add_parser(sub)

    score = sub.add_parser(
        "score",
        help="score records with a reward model (JSONL)",
        description="Score every record of a dataset with an `rm` output dir: chosen/rejected/margin "
        "for pairs, score for chats and KTO examples. JSONL to --out or stdout; a summary to stderr.",
    )
    score.add_argument("rm_dir", help="output dir of a `stage: rm` run")
    score.add_argument("--data", required=True, help="registry name or file (preference, kto or chat formats)")
    score.add_argument("--format", help="record format, when the file does not make it clear")
    score.add_argument("--out", help="write the JSONL here (atomically) instead of stdout")
    score.add_argument("--batch-size", type=int, default=16, help="records per forward pass (default 16)")
    score.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    score.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_merge_export_chat(sub)
    _add_cache(sub)
    env = sub.add_parser(
        "env",
        help="versions, device and caches, for a bug report",
        description="Print finetune's and its libraries' versions, the device (CUDA, GPUs, CPU "
        "features, threads) and the cache dirs: paste it into a bug report.",
    )
    env.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _add_cache(sub) -> None:
    caches = sub.add_parser(
        "cache",
        help="show or remove what finetune's caches hold (encoded data, merged bases, tiny models)",
        description="`list`: every entry of the data cache, the merged-base cache and the tiny models, with "
        "size on disk and last use. `prune`: remove by age, by total size (least recently used first) "
        "or all, with --dry-run; entries being built are kept. See docs/caching.md.",
    )
    cache_sub = caches.add_subparsers(dest="cache_command", metavar="{list,prune}", required=True)
    kinds = "data, merged, tiny (repeatable)"
    listing = cache_sub.add_parser("list", help="what each cache holds, with sizes")
    listing.add_argument("--kind", action="append", choices=("data", "merged", "tiny"), help=f"only these: {kinds}")
    listing.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    prune = cache_sub.add_parser(
        "prune",
        help="remove cache entries by age, size or all (--dry-run first)",
        description="Remove cache entries. Leftovers of dead processes always go; then those last used "
        "before --older-than, then the least recently used until the rest fits --max-size, or --all.",
    )
    prune.add_argument(
        "--kind", action="append", choices=("data", "merged", "tiny"), help=f"{kinds}; default data and merged"
    )
    prune.add_argument("--older-than", metavar="AGE", help="last used longer ago than AGE: 30d, 12h, 90m, 2w")
    prune.add_argument("--max-size", metavar="SIZE", help="keep at most SIZE in total: 500MB, 20GB, 1.5TiB")
    prune.add_argument("--all", action="store_true", help="remove every entry of the kinds")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    prune.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_cache(args) -> int:
    from finetune import caches

    if args.cache_command == "list":
        print(caches.render(caches.scan(tuple(dict.fromkeys(args.kind or caches.KINDS)))))
        return 0
    kinds = tuple(dict.fromkeys(args.kind or caches.PRUNED_BY_DEFAULT))
    print(caches.prune(kinds, args.older_than, args.max_size, args.all, args.dry_run))
    return 0


def _no_file_given(command: str, kind: str, folder: str) -> int:
    """`finetune train` with no recipe: say what to give, with the shipped examples."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "recipes" / folder
    examples = [str(p.relative_to(shipped.parents[1])) for p in shipped.glob("*.yaml")] if shipped.is_dir() else []
    # the README's quickstart first, then the other SFT recipes: where users start
    examples = sorted(examples, key=lambda name: (not name.endswith("sft_lora.yaml"), "sft" not in name, name))[:6]
    print(
        f"finetune {command}: give a {kind} YAML file, e.g. finetune {command} "
        f"{examples[0] if examples else 'recipe.yaml'} [section.key=value ...] [--dry-run]",
        file=sys.stderr,
    )
    if examples:
        print(f"shipped {kind}s include: {', '.join(examples)}", file=sys.stderr)
    return 2


def _add_merge_export_chat(sub) -> None:
    dtypes = ("auto", "float32", "float16", "bfloat16")
    merge = sub.add_parser(
        "merge",
        help="merge adapter(s) into the base, verified",
        description="Merge an adapter into its base (or combine several adapters) and verify the "
        "written model's logits against the adapter model's.",
    )
    merge.add_argument(
        "adapter", nargs="?", metavar="ADAPTER_DIR", help="adapter dir (a finetune output or any PEFT adapter)"
    )
    merge.add_argument("--out", required=True, help="output dir (written atomically)")
    merge.add_argument("--adapters", nargs="+", metavar="DIR", help="combine several adapters of one base instead")
    merge.add_argument(
        "--method",
        choices=("linear", "cat", "ties", "dare_ties", "dare_linear", "magnitude_prune"),
        default="linear",
        help="--adapters: how to combine (default linear)",
    )
    merge.add_argument(
        "--weights",
        nargs="+",
        type=float,
        help="--adapters: one weight per adapter (default 1/n for linear/cat, 1.0 for the others)",
    )
    merge.add_argument(
        "--density", type=float, help="--adapters: share of weights kept by ties/dare/magnitude_prune (0.5)"
    )
    merge.add_argument(
        "--into-base", action="store_true", help="--adapters: write a merged model instead of an adapter"
    )
    merge.add_argument("--seed", type=int, default=0, help="--adapters: seed of DARE's random drop")
    merge.add_argument(
        "--onto",
        choices=("dequantized", "original"),
        help="QLoRA: merge onto the dequantized 4-bit "
        "weights it was trained on (default) or the original full-precision ones",
    )
    merge.add_argument(
        "--dtype",
        choices=dtypes,
        default="auto",
        help="weight dtype of the merged model (default auto: the base model's)",
    )
    merge.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    merge.add_argument("--base", help="base model (path, hub id or tiny name) when the adapter's recorded one moved")
    merge.add_argument(
        "--tolerance", type=float, help="allowed max |Δlogit| (default: per dtype, scaled by max |logit|)"
    )
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    export = sub.add_parser(
        "export",
        help="export a model or adapter to GGUF (llama.cpp / Ollama) or safetensors",
        description="Export a model dir (or an adapter dir, merged on the fly) and verify the file.",
    )
    export.add_argument("model", metavar="MODEL_DIR", help="model dir or adapter dir")
    export.add_argument(
        "--format", choices=("gguf", "safetensors"), default="gguf", help="output format (default gguf)"
    )
    export.add_argument("--out", required=True, help="output file (.gguf) or dir (safetensors)")
    export.add_argument(
        "--outtype", choices=("f32", "f16", "q8_0"), default="f16", help="gguf: tensor type (default f16)"
    )
    export.add_argument("--ollama", action="store_true", help="gguf: also write an Ollama Modelfile beside it")
    export.add_argument(
        "--system",
        help="--ollama: the Modelfile's SYSTEM prompt (default: the data.system the model was trained with, "
        "else the chat template's own)",
    )
    export.add_argument(
        "--modelfile",
        metavar="PATH",
        help="--ollama: where to write the Modelfile (default: Modelfile beside the GGUF)",
    )
    export.add_argument(
        "--dtype", choices=dtypes, default="auto", help="safetensors: weight dtype (default: the base's)"
    )
    export.add_argument("--onto", choices=("dequantized", "original"), help="QLoRA adapter: which merge (see merge)")
    export.add_argument("--base", help="an adapter's base model when the recorded one moved")
    export.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    chat = sub.add_parser(
        "chat",
        help="chat with a model or adapter in the terminal",
        description="Chat in the terminal (/reset clears the history, /exit quits), or answer one --prompt and exit.",
    )
    chat.add_argument(
        "model",
        metavar="MODEL_OR_ADAPTER_DIR",
        help="model dir or adapter dir (an adapter runs on its base, "
        "4-bit for QLoRA), a tiny model name (tiny-llama) or a hub id",
    )
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="a vision-language model: an image file that goes with the first message (repeatable)",
    )
    chat.add_argument(
        "--system", help="system prompt (default: the data.system the model was trained with; '' for none)"
    )
    chat.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when temperature > 0")
    chat.add_argument("--base", help="an adapter's base model when the recorded one moved")
    for p in (merge, export, chat):
        p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_serve_webui(sub)


def _add_serve_webui(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve models / adapters over an OpenAI-compatible HTTP API",
        description="Serve a model or adapter dir (and more adapters by name) at /v1/chat/completions, "
        "/v1/completions, /v1/models and /health. Needs finetune[serve].",
    )
    serve.add_argument(
        "model",
        metavar="MODEL_OR_ADAPTER_DIR",
        help="model dir or adapter dir (an adapter runs on its base, 4-bit for QLoRA)",
    )
    serve.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="also serve this adapter as model NAME (repeatable; adapters on the same base share it)",
    )
    serve.add_argument("--name", help="model name of MODEL_OR_ADAPTER_DIR in requests (default: the dir's name)")
    serve.add_argument("--base", help="an adapter's base model when the recorded one moved")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $FINETUNE_API_KEY, if set)")
    serve.add_argument(
        "--max-tokens", type=int, default=1024, help="cap on a request's max_tokens, and its default (1024)"
    )
    serve.add_argument("--max-batch-size", type=int, default=16, help="rows generated together (default 16)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    serve.add_argument("--max-n", type=int, default=8, help="cap on a request's n (default 8)")
    serve.add_argument(
        "--max-sequences", type=int, default=64, help="cap on the sequences one request generates, prompts x n (64)"
    )
    serve.add_argument(
        "--max-request-tokens",
        type=int,
        default=131_072,
        help="cap on one request's tokens: prompt + max_tokens, summed over its sequences (131072)",
    )
    serve.add_argument(
        "--render-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time budget for rendering and tokenizing a request's prompts (default 10)",
    )
    serve.add_argument(
        "--max-images", type=int, default=4, help="a vision-language model: image parts per request (default 4)"
    )
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=1024 * 1024,
        help="a vision-language model: width x height of each image in a request (default 1048576)",
    )

    webui = sub.add_parser(
        "webui",
        help="the web UI: train, data, chat, evaluate, export (Gradio)",
        description="A Gradio web UI over the same commands. Needs finetune[webui].",
    )
    webui.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --auth)"
    )
    webui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    webui.add_argument(
        "--lang", choices=("en", "zh"), default="en", help="UI language at start (switchable in the UI)"
    )
    webui.add_argument(
        "--root",
        default=".",
        help="workspace: every path the UI reads or writes must lie inside it (default: the current dir)",
    )
    webui.add_argument(
        "--runs-dir", default="runs", help="where the UI writes its recipes and logs, inside --root (default runs)"
    )
    webui.add_argument(
        "--auth", metavar="USER:PASS", help="require this login (default: $FINETUNE_WEBUI_AUTH, if set)"
    )
    webui.add_argument("--auth-file", metavar="FILE", help="require one of the USER:PASS logins in FILE, one a line")
    webui.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let recipes run from the UI use model.trust_remote_code (never turned on by a recipe alone)",
    )
    webui.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let recipes run from the UI use model.allow_pickle (never turned on by a recipe alone)",
    )
    for p in (serve, webui):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _at_least(args, name: str, low: int) -> None:
    """A numeric option below its minimum is one line naming the option."""
    value = getattr(args, name)
    if value is not None and value < low:
        raise FinetuneError(f"--{name.replace('_', '-')}: must be at least {low}, got {value}")


def cmd_train(args) -> int:
    from finetune import config, security, stages

    if args.recipe is None:
        return _no_file_given("train", "recipe", "tiny")
    recipe = config.load(args.recipe, args.overrides)
    stage = stages.module(recipe.stage)
    with security.user_flags(recipe.model.trust_remote_code, recipe.model.allow_pickle):  # the recipe the user runs
        if args.dry_run:
            from finetune import fit

            print(stage.plan(recipe, fit.parse_size(args.gpu_memory) if args.gpu_memory else None).render())
            return 0
        out = stage.run(recipe)
    log.info("done: output in %s", out)
    from finetune.eval.hook import gate_failure

    failure = gate_failure(recipe, out)
    if failure:
        print(f"finetune: error: {failure}", file=sys.stderr)
        return EXIT_GATE
    return 0


def cmd_fit(args) -> int:
    from finetune import adapters, config, fit

    recipe = config.load(args.recipe, args.overrides)
    _at_least(args, "gpus", 1)
    capacity = fit.parse_size(args.gpu_memory) if args.gpu_memory else fit.visible_gpu_bytes()
    sharding = {"zero3": "full", "fsdp": "full"}.get(args.sharding, args.sharding)
    model = fit.meta_model(recipe)
    est = fit.estimate(recipe, on_gpu=True, world=args.gpus, sharding=sharding, model=model)
    where = f"{args.gpus} GPUs, {args.sharding}" if args.gpus > 1 else "1 GPU"
    print(f"will it fit: {recipe.source} ({recipe.model.name_or_path}, {adapters.describe(recipe.adapter)}; {where})")
    print("\n".join("  " + line for line in est.lines()))
    for note in est.notes:
        print(f"  note: {note}")
    print(fit.verdict(recipe, capacity, world=args.gpus, sharding=sharding, model=model))
    return 0


def cmd_pipeline(args) -> int:
    from finetune import pipeline

    if args.pipeline is None:
        return _no_file_given("pipeline", "pipeline", "pipelines")
    pipe = pipeline.load(args.pipeline, args.overrides)
    if args.dry_run:
        print(pipeline.plan(pipe))
        return 0
    pipeline.run(pipe)
    log.info("done: pipeline outputs in %s", pipe.dir)
    return 0


def cmd_data(args) -> int:
    if args.data_command == "prepare":
        from finetune import config
        from finetune.data.prepare import prepare

        print(prepare(config.load(args.recipe, args.overrides)))
        return 0
    from finetune import security
    from finetune.data.preview import preview_recipe

    _at_least(args, "max_length", 1)
    recipe, stage = _preview_recipe(args)
    with security.user_flags(recipe.model.trust_remote_code, recipe.model.allow_pickle):
        text = preview_recipe(
            recipe,
            stage=stage,
            index=args.index,
            max_length=args.max_length,
            color=sys.stdout.isatty(),
            show_tokens=args.tokens,
        )
    print(text)
    return 0


RECIPE_SUFFIXES = (".yaml", ".yml")


def _preview_recipe(args):
    """The recipe `data preview` shows: the one named (recipe form), or one built from the file form's
    dataset, --model and options; either way with the key=value overrides, validated as `train` validates."""
    import json

    import yaml

    from finetune import config
    from finetune.errors import RecipeError

    flags = {  # file-form option -> the recipe key it stands for
        "--model": (args.model, "model.name_or_path"),
        "--format": (args.format, "data.format"),
        "--chat-template": (args.chat_template, "model.chat_template"),
        "--chat-template-kwargs": (args.chat_template_kwargs, "model.chat_template_kwargs"),
        "--train-on": (args.train_on, "data.train_on"),
    }
    if args.dataset.lower().endswith(RECIPE_SUFFIXES):
        given = [(flag, key) for flag, (value, key) in flags.items() if value is not None]
        if given:
            raise RecipeError(
                f"{given[0][0]}: the recipe form takes its settings from the recipe; override them as "
                f"{given[0][1]}=..."
            )
        recipe = config.load(args.dataset, args.overrides)
        return recipe, recipe.stage
    if not args.model:
        raise RecipeError(
            f"{args.dataset}: name the model whose tokenizer and chat template to use (--model), "
            "or preview a recipe: finetune data preview RECIPE.yaml"
        )
    for item in args.overrides:
        if not item.split("=", 1)[0].startswith(("data.", "model.")):
            raise RecipeError(
                f"override '{item}': the file form takes data.* and model.* keys; use a recipe for others"
            )
    kwargs = None
    if args.chat_template_kwargs:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as e:
            raise RecipeError(f"--chat-template-kwargs: not valid JSON ({e.msg})") from None
        if not isinstance(kwargs, dict):
            raise RecipeError("--chat-template-kwargs: expected a JSON object")
    model = {"name_or_path": args.model, "chat_template": args.chat_template, "chat_template_kwargs": kwargs}
    data = {"train": args.dataset, "train_on": args.train_on}
    raw = {
        "model": {k: v for k, v in model.items() if v is not None},
        "data": {k: v for k, v in data.items() if v is not None},
        "train": {"max_length": None},
        "output": {"dir": "unused-by-preview"},
    }
    recipe = config.load(text=yaml.safe_dump(raw, allow_unicode=True), overrides=args.overrides)
    if args.format:  # any format (a preference or KTO file too), not only the stage's
        recipe.data = dataclasses.replace(recipe.data, format=args.format)
    return recipe, None  # no stage: the file form previews records of any format


def cmd_eval(args) -> int:
    from finetune.eval import command

    return command.main(args)


def cmd_score(args) -> int:
    from finetune.reward_scoring import score_file

    _at_least(args, "batch_size", 1)
    summary = score_file(args.rm_dir, args.data, fmt=args.format, out=args.out, batch_size=args.batch_size)
    log.info(
        "scored: %s", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
    )
    return 0


def cmd_merge(args) -> int:
    from pathlib import Path

    from finetune import merge

    if args.tolerance is not None and not args.tolerance >= 0:
        raise FinetuneError(f"--tolerance: must be at least 0, got {args.tolerance}")
    out = Path(args.out).expanduser().resolve()
    for adapter in [args.adapter] if args.adapter else args.adapters or []:
        inside = Path(adapter).expanduser().resolve()
        if out == inside or inside in out.parents:
            raise FinetuneError(
                f"--out: {args.out} is inside the adapter dir {adapter} being merged; choose another --out"
            )
    return merge.run_cli(args)


def cmd_export(args) -> int:
    from finetune import export

    return export.run_cli(args)


def cmd_chat(args) -> int:
    from finetune import chat

    _at_least(args, "max_new_tokens", 1)
    if not args.temperature >= 0:
        raise FinetuneError(f"--temperature: must be at least 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise FinetuneError(f"--top-p: must be in (0, 1], got {args.top_p}")
    return chat.run_cli(args)


def cmd_serve(args) -> int:
    from finetune import serve

    return serve.run_cli(args)


def cmd_webui(args) -> int:
    from finetune import webui

    return webui.run_cli(args)


def cmd_env(args) -> int:
    from finetune.env import report

    print(report())
    return 0


def _disk_error(e: BaseException) -> str | None:
    """One line for a file-system or memory error (finetune.guards) or a file that is not UTF-8 text."""
    if isinstance(e, UnicodeDecodeError):
        return f"{_file_being_read(e) or 'a file'}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
    from finetune.guards import disk_error, memory_error

    return disk_error(e) or memory_error(e)


def _file_being_read(e: BaseException) -> str | None:
    """The `path` (or `f`) local of the innermost finetune frame: the file a decode error came from."""
    tb, found = e.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__", "").startswith("finetune"):
            for name in ("path", "file", "f", "p"):
                value = frame.f_locals.get(name)
                if isinstance(value, (str, os.PathLike)):
                    found = str(value)
                    break
                if hasattr(value, "name") and isinstance(getattr(value, "name", None), str):
                    found = value.name
                    break
        tb = tb.tb_next
    return found


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # `train RECIPE --dry-run k=v`: overrides after an option land in `extra`; they are still overrides.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries(args.debug)
    handler = {
        "train": cmd_train,
        "fit": cmd_fit,
        "pipeline": cmd_pipeline,
        "data": cmd_data,
        "score": cmd_score,
        "eval": cmd_eval,
        "merge": cmd_merge,
        "export": cmd_export,
        "chat": cmd_chat,
        "env": cmd_env,
        "cache": cmd_cache,
        "serve": cmd_serve,
        "webui": cmd_webui,
    }[args.command]
    from finetune import security

    failed = True
    try:
        with security.user_flags(getattr(args, "trust_remote_code", False), getattr(args, "allow_pickle", False)):
            code = handler(args)
        failed = False
        return code
    except FinetuneError as e:
        if args.debug:
            raise
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `finetune data preview ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"finetune: interrupted; {INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, MemoryError, UnicodeDecodeError) as e:  # disk, memory, not UTF-8: one line
        line = None if args.debug else _disk_error(e)
        if line is None:
            raise
        print(f"finetune: error: {line}", file=sys.stderr)
        return 2
    finally:
        from finetune import locks

        if failed and locks.held_targets():
            from finetune.guards import discard_unresumable

            discard_unresumable()
        locks.release_all()


if __name__ == "__main__":
    raise SystemExit(main())
