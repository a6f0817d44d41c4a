"""`finetune pipeline FILE`: several stages run in order, each one a recipe, the later ones
starting from (or scoring with) the outputs of the earlier ones.

    output:
      dir: outputs/rlhf            # stage NAME writes <dir>/NAME
    stages:
      sft:
        recipe: recipes/tiny/sft_lora.yaml    # a recipe file, or an inline mapping
        train: {max_steps: 60}                # recipe keys on top of it
      rm:
        recipe: recipes/tiny/rm_lora.yaml
        model:
          name_or_path: ${sft}                # -> <dir>/sft (merged first: finetune.chain)

`${NAME}` in a string value is the output dir of the earlier stage NAME: plain text
substitution, no code runs. Overrides on the command line: `output.dir=...`, `NAME.section.key=v`
(one stage) or `section.key=v` (every stage). Recipe paths are read relative to the current
directory, else to the pipeline file's.

Re-running skips each stage whose output dir is finished with the same recipe (`OutputDir.identity`,
the comparison `RunDir` resumes by), and resumes an interrupted one from its last checkpoint; once a
stage trains, every later stage trains too (its input changed). A finished stage of a different recipe is an error
unless `output.overwrite: true`. Every recipe is validated before the first stage trains.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune import config, locks, security
from finetune.errors import OutputError, RecipeError, closest
from finetune.outputs import OutputDir, _first_difference, write_text_atomic
from finetune.stages import module as stage_module

log = logging.getLogger("finetune")

REFERENCE = re.compile(r"\$\{([^}]*)\}")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
PIPELINE_KEYS = ("output", "stages")
OUTPUT_KEYS = ("dir", "overwrite")
SUMMARY = "pipeline.json"


@dataclass
class Stage:
    name: str
    recipe: config.Recipe

    @property
    def dir(self) -> Path:
        return Path(self.recipe.output.dir)


@dataclass
class Pipeline:
    source: str
    dir: Path
    overwrite: bool
    stages: list[Stage]


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read and validate a pipeline file and every stage's recipe (nothing is trained or written)."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{source}: pipeline file not found")
    text = p.read_text(encoding="utf-8")
    raw = config.parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a pipeline is a mapping with {' and '.join(PIPELINE_KEYS)}")
    lines = config.line_map(text)

    def where(*keys) -> str:
        for n in range(len(keys), 0, -1):
            if keys[:n] in lines:
                return f"{source}:{lines[keys[:n]]}: {'.'.join(keys)}"
        return f"{source}: {'.'.join(keys)}"

    for key in raw:
        if key not in PIPELINE_KEYS:
            raise RecipeError(
                f"{where(str(key))}: unknown key{closest(str(key), PIPELINE_KEYS)} (keys: {', '.join(PIPELINE_KEYS)})"
            )
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise RecipeError(f"{where('stages')}: expected a mapping of stage names to recipes")
    for name in stages:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RecipeError(
                f"{where('stages', str(name))}: a stage name is letters, digits, _ . - (it names its output dir)"
            )
    output = raw.get("output") or {}
    if not isinstance(output, dict):
        raise RecipeError(f"{where('output')}: expected a mapping with {' and '.join(OUTPUT_KEYS)}")
    per_stage, every_stage = _split_overrides(overrides, output, list(stages))
    if not output.get("dir"):
        raise RecipeError(f"{where('output', 'dir')}: missing: the dir every stage writes its own subdir in")
    for key in output:
        if key not in OUTPUT_KEYS:
            raise RecipeError(f"{where('output', str(key))}: unknown key{closest(str(key), OUTPUT_KEYS)}")
    root = Path(str(output["dir"])).expanduser().resolve()
    overwrite = output.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise RecipeError(f"{where('output', 'overwrite')}: expected true or false")

    dirs: dict[str, str] = {}
    loaded = []
    for name, spec in stages.items():
        label = f"{where('stages', name)}: stage {name}"
        try:
            recipe = _load_stage(spec, p.parent, dirs, overwrite, root / name, every_stage + per_stage.get(name, []))
        except RecipeError as e:
            raise RecipeError(f"{label}: {e}") from None
        dirs[name] = str(root / name)
        loaded.append(Stage(name, recipe))
    return Pipeline(source, root, overwrite, loaded)


def _split_overrides(overrides, output: dict, names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """CLI overrides -> (stage name -> its overrides, overrides for every stage); output.* applied here."""
    per_stage: dict[str, list[str]] = {}
    every: list[str] = []
    for item in overrides:
        keys, value = config._parse_override(item)
        if keys[0] == "output" and len(keys) == 2 and keys[1] in OUTPUT_KEYS:
            output[keys[1]] = value
        elif keys[0] in names and len(keys) >= 3:
            per_stage.setdefault(keys[0], []).append(item.split(".", 1)[1])
        elif keys[0] in config.TOP_LEVEL and keys[0] != "output":
            every.append(item)
        else:
            raise RecipeError(
                f"override '{item}': expected output.dir=..., STAGE.section.key=... (stages: "
                f"{', '.join(names)}) or section.key=... for every stage"
            )
    return per_stage, every


def _substitute(value, dirs: dict[str, str]):
    """`${name}` -> the output dir of the earlier stage `name`, in every string of `value`."""
    if isinstance(value, str):

        def one(match):
            ref = match.group(1)
            if ref not in dirs:
                hint = closest(ref, dirs) if dirs else ""
                raise RecipeError(
                    f"${{{ref}}}: no earlier stage named {ref!r}{hint} (earlier stages: {', '.join(dirs) or 'none'})"
                )
            return dirs[ref]

        return REFERENCE.sub(one, value)
    if isinstance(value, dict):
        return {k: _substitute(v, dirs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, dirs) for v in value]
    return value


def _flatten(value, prefix: str = "") -> list[str]:
    """{train: {max_steps: 5}} -> ['train.max_steps=5'] (values as JSON, which YAML reads back)."""
    if isinstance(value, dict) and value:
        out = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [f"{prefix}={json.dumps(value, ensure_ascii=False)}"]


def _find_recipe(ref: str, base: Path) -> Path:
    for candidate in (Path(ref), base / ref):
        if candidate.is_file():
            return candidate
    raise RecipeError(f"recipe: {ref}: no such file (read relative to the current directory or the pipeline file)")


def _load_stage(spec, base: Path, dirs: dict[str, str], overwrite: bool, out: Path, cli: list[str]):
    if not isinstance(spec, dict):
        raise RecipeError("expected a mapping: recipe (a file or an inline recipe) and recipe sections on top of it")
    spec = dict(spec)
    ref = spec.pop("recipe", None)
    for key in spec:
        if key not in config.TOP_LEVEL:
            raise RecipeError(f"{key}: unknown key{closest(str(key), ('recipe', *config.TOP_LEVEL))}")
    if "dir" in (spec.get("output") or {}):
        raise RecipeError(f"output.dir: set by the pipeline ({out}); remove it")
    spec = _substitute(spec, dirs)
    overrides = _flatten(spec) if spec else []
    overrides += [_substitute(item, dirs) for item in cli]
    overrides += [f"output.dir={json.dumps(str(out))}", f"output.overwrite={json.dumps(overwrite)}"]
    if isinstance(ref, dict):
        return config.load(None, overrides, text=yaml.safe_dump(_substitute(ref, dirs)))
    if ref is None:
        return config.load(None, overrides, text="{}")
    if not isinstance(ref, str):
        raise RecipeError("recipe: expected a recipe file path or an inline recipe mapping")
    return config.load(_find_recipe(ref, base), overrides)


# ----------------------------------------------------------------------------- running


def status(stage: Stage) -> str:
    """done (finished, same recipe) | changed (finished, another recipe) | resume | new."""
    out = OutputDir(stage.dir)
    if out.finished:
        return "done" if out.identity() == yaml.safe_load(stage.recipe.identity()) else "changed"
    if out.interrupted:
        return "resume"
    return "new"


def plan(pipe: Pipeline) -> str:
    """What a run would do with each stage (skip, resume, train), or why it would refuse to."""
    try:
        actions, refusal = _actions(pipe), None
    except OutputError as e:
        actions, refusal = [status(stage) for stage in pipe.stages], str(e)
    lines = [f"pipeline {pipe.source} -> {pipe.dir} (dry run: nothing trained, nothing written)"]
    for i, (stage, action) in enumerate(zip(pipe.stages, actions), 1):
        lines.append(f"  {i}. {stage.name:<10} stage {stage.recipe.stage:<5} {action:<8} {stage.dir}")
    if refusal:
        lines.append(f"  refused: {refusal}")
    return "\n".join(lines)


def _actions(pipe: Pipeline) -> list[str]:
    """Per stage: skip | train | resume. Raises before anything trains if a finished stage would be
    replaced without output.overwrite."""
    actions, upstream_trained = [], False
    for stage in pipe.stages:
        st = status(stage)
        if st == "done" and not upstream_trained:
            actions.append("skip")
            continue
        if st in ("done", "changed") and not pipe.overwrite:
            why = (
                "an earlier stage is retrained"
                if st == "done"
                else "it holds a finished run of another recipe: "
                + _first_difference(yaml.safe_dump(OutputDir(stage.dir).identity()), stage.recipe.identity())
            )
            raise OutputError(
                f"pipeline stage {stage.name}: {stage.dir} would be retrained ({why}); "
                "set output.overwrite=true to replace it, or choose another output.dir"
            )
        actions.append("resume" if st == "resume" else "train")
        upstream_trained = True
    return actions


def run(pipe: Pipeline) -> dict:
    """Run the stages in order; returns (and writes to <dir>/pipeline.json) what each one did."""
    from accelerate import PartialState

    state = PartialState()
    locks.hold(pipe.dir)  # one pipeline per output dir; each stage also locks its own (finetune.locks)
    summary = {"pipeline": pipe.source, "stages": {}}
    for i, (stage, action) in enumerate(zip(pipe.stages, _actions(pipe)), 1):
        head = f"pipeline: stage {i}/{len(pipe.stages)} {stage.name} ({stage.recipe.stage})"
        if action == "skip":
            log.info("%s: done with this recipe in %s, skipped", head, stage.dir)
            summary["stages"][stage.name] = {"dir": str(stage.dir), "status": "skipped"}
            continue
        log.info("%s: %s -> %s", head, "resuming" if action == "resume" else "training", stage.dir)
        start = time.time()
        with security.user_flags(stage.recipe.model.trust_remote_code, stage.recipe.model.allow_pickle):
            stage_module(stage.recipe.stage).run(stage.recipe)
        summary["stages"][stage.name] = {
            "dir": str(stage.dir),
            "status": "resumed" if action == "resume" else "trained",
            "seconds": round(time.time() - start, 1),
        }
        if state.is_main_process:
            write_text_atomic(pipe.dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    if state.is_main_process:
        pipe.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(pipe.dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
