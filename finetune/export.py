"""`finetune export`: a model dir (or an adapter dir, merged on the fly) to GGUF (+ Ollama Modelfile)
or safetensors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from finetune import gguf_export, gguf_mmproj, merge, ollama
from finetune.loading import ModelDirError, inspect, load_tokenizer
from finetune.outputs import recorded_system_prompt
from finetune.staging import Staged, check_free, publish_modes


def _not_foldable(source, fmt: str) -> ModelDirError:
    return ModelDirError(
        f"{source.path}: a {source.peft_type} adapter adds virtual tokens at run time, which a "
        f"{fmt} file cannot hold; keep the adapter dir and load it with peft (`finetune chat DIR` runs it)"
    )


def export_gguf(
    model_dir: str,
    out: str,
    outtype: str = "f16",
    ollama_file: bool = False,
    system: str | None = None,
    onto: str | None = None,
    base: str | None = None,
    overwrite: bool = False,
    modelfile: str | None = None,
) -> list[str]:
    """Write `out` (.gguf), and with `ollama_file` a Modelfile (`modelfile`, default `Modelfile` beside the
    GGUF; its FROM points at the GGUF relative to it); returns the report lines."""
    source = inspect(model_dir, base)
    if source.is_prompt_learning:
        raise _not_foldable(source, "GGUF")
    final = check_free(out, overwrite, file=True)
    if final.suffix != ".gguf":
        raise ModelDirError(f"--out: {out}: name the GGUF file *.gguf")
    if modelfile is not None and not ollama_file:
        raise ModelDirError("--modelfile: goes with --ollama")
    modelfile_path = Path(modelfile).expanduser().absolute() if modelfile else final.with_name("Modelfile")
    if ollama_file:
        check_free(modelfile_path, overwrite, file=True, flag="--modelfile")
        if modelfile_path == final:
            raise ModelDirError("--modelfile: must differ from --out")
    lines: list[str] = []
    # an unsupported architecture fails before anything is merged or written
    if source.kind == "model":
        cfg, _ = gguf_mmproj.model_config(source.path)
    else:
        from transformers import AutoConfig

        try:
            base_config = AutoConfig.from_pretrained(source.base).to_dict()
        except (OSError, ValueError) as e:
            raise ModelDirError(
                f"{source.base_field}: cannot load base {source.base}: {str(e).splitlines()[0]}; "
                "pass --base MODEL if it lives elsewhere"
            ) from None
        gguf_mmproj.check_config(base_config, f"{source.base_field}: {source.base}")
        cfg = base_config
    # a vision-language model: the language model in `final`, its vision tower + projector in a second file
    mmproj = gguf_mmproj.mmproj_path(final) if gguf_mmproj.is_vision_language(cfg) else None
    if mmproj is not None:
        check_free(mmproj, overwrite, file=True)
        if ollama_file:
            raise ModelDirError(
                f"--ollama: {source.path} is a vision-language model; the Modelfile is written for text models "
                f"(run the two GGUF files with llama.cpp: llama-server -m {final.name} --mmproj {mmproj.name})"
            )
    tok = load_tokenizer(source)
    if system is None:  # the system prompt the model was trained with, as chat and serve use it
        system = recorded_system_prompt(model_dir)
    gguf_ref = os.path.relpath(final, modelfile_path.parent)  # FROM, relative to the Modelfile
    modelfile_text = ollama.modelfile(gguf_ref, tok, system) if ollama_file else None  # fails before any work

    with Staged(final, overwrite, file=True) as tmp:
        model_path = source.path
        if source.kind == "adapter":
            merged = tmp / "merged"
            report = merge.merge(str(source.path), str(merged), "float32", "50GB", onto, base)
            lines += [f"merged on the fly: {line}" for line in report.lines()[1:]]
            model_path = merged
        if mmproj is not None:
            report = gguf_mmproj.convert(model_path, tmp / final.name, tmp / mmproj.name, outtype, source.path.name)
            report.mmproj = mmproj
        else:
            report = gguf_export.convert(model_path, tmp / final.name, outtype, name=source.path.name)
        report.path = final
        lines += report.lines()
        if modelfile_text is not None:
            (tmp / "Modelfile").write_text(modelfile_text, encoding="utf-8")
            lines.append(f"Ollama Modelfile written to {modelfile_path} (ollama create NAME -f {modelfile_path})")
            lines += [f"note: {note}" for note in ollama.modelfile_notes(modelfile_text)]
        if source.kind == "adapter":
            shutil.rmtree(model_path)
        if mmproj is not None:  # both files appear together: the mmproj goes in just before the language model
            publish_modes(tmp / mmproj.name)
            os.replace(tmp / mmproj.name, mmproj)
        if modelfile_text is not None:  # both files appear together: the Modelfile goes in just before the GGUF
            modelfile_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(tmp / "Modelfile", modelfile_path)
    return lines


def export_safetensors(
    model_dir: str,
    out: str,
    dtype: str = "auto",
    onto: str | None = None,
    base: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """An adapter dir -> a merged, verified HF model dir (what `finetune merge` writes)."""
    source = inspect(model_dir, base)
    if source.kind == "model":
        raise ModelDirError(
            f"{source.path}: already a plain safetensors model; `--format safetensors` merges an "
            "adapter dir (nothing to export here)"
        )
    if source.is_prompt_learning:
        raise _not_foldable(source, "plain safetensors model")
    return merge.merge(model_dir, out, dtype, "2GB", onto, base, overwrite).lines()


def run_cli(args) -> int:
    merge.quiet_progress()
    if args.format == "gguf":
        if args.dtype != "auto":
            raise ModelDirError("--dtype: applies to --format safetensors; for gguf use --outtype")
        lines = export_gguf(
            args.model,
            args.out,
            args.outtype,
            args.ollama,
            args.system,
            args.onto,
            args.base,
            args.overwrite,
            args.modelfile,
        )
    else:
        if args.ollama or args.system or args.modelfile:
            raise ModelDirError("--ollama / --system / --modelfile: apply to --format gguf")
        lines = export_safetensors(args.model, args.out, args.dtype, args.onto, args.base, args.overwrite)
    for line in lines:
        print(line)
    return 0
