"""The prepared-data cache: a hit when nothing changed, a miss for each thing that changes the
encoding, never a half-built entry; parallel encoding equal to serial; one encoder for all ranks."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
from _support import REPO, ddp_launch, memo_recipe, missing_tool, run_cli, write_jsonl

from finetune import data
from finetune.config import DataSection
from finetune.data import cache
from finetune.data import encode as encode_module
from finetune.data.encode import EncodeOptions
from finetune.errors import DataError


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "data-cache"
    monkeypatch.setenv("FINETUNE_DATA_CACHE", str(root))
    return root


def _rows(n: int) -> list[dict]:
    """Alpaca rows that also carry a `messages` field and an alternative answer column, so that
    format and column map can change the encoding of the same file."""
    rows = []
    for i in range(n):
        question, answer = (
            (f"What is {i} plus one?", f"It is {i + 1}.") if i % 2 else (f"{i} 加一是多少？", f"是{i + 1}。")
        )
        rows.append(
            {
                "instruction": question,
                "input": "",
                "output": answer,
                "short": f"{i + 1}",
                "messages": [
                    {"role": "user", "content": question + " Briefly."},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return rows


def _ids(prepared) -> list[tuple]:
    return [(tuple(e.input_ids), tuple(e.labels)) for e in prepared.train.encoded]


def test_each_key_component_misses_and_nothing_else_does(tmp_path, cache_dir, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(12))
    base = {"train": str(path), "format": "alpaca"}

    def builds(tok=tiny_tokenizer, max_length=64, options=None, **cfg):
        before = cache.builds
        prepared = data.load(DataSection(**{**base, **cfg}), tok, max_length, options=options)
        return cache.builds - before, prepared

    n, cold = builds()
    assert n == 1 and len(cold.train.encoded) == 12
    n, warm = builds()
    assert n == 0 and _ids(warm) == _ids(cold)
    assert builds(num_proc=2)[0] == 0  # how it is encoded is not what it is
    assert builds(eval_ratio=0.25)[0] == 0  # the split is taken from the cached rows

    # the content, edited in place: same size, same mtime
    stat = path.stat()
    path.write_text(path.read_text(encoding="utf-8").replace("plus one", "plus 1!!"), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    n, edited = builds()
    assert n == 1 and _ids(edited) != _ids(cold)
    assert builds()[0] == 0

    assert builds(format="messages")[0] == 1
    assert builds(columns={"output": "short"})[0] == 1
    assert builds(system="Be brief.")[0] == 1
    assert builds(max_samples=5)[0] == 1
    assert builds(max_length=20)[0] == 1
    assert builds(options=EncodeOptions(train_on="last_turn"))[0] == 1
    assert builds(options=EncodeOptions(train_on="last_turn"))[0] == 0
    assert builds(options=EncodeOptions(train_on="last_turn", chat_template_kwargs={"enable_thinking": False}))[0] == 1
    assert builds(options=EncodeOptions(reasoning_tags=("<reason>", "</reason>")))[0] == 1
    other_template = copy.deepcopy(tiny_tokenizer)
    other_template.chat_template = tiny_tokenizer.chat_template.replace("<|user|>", "<|user|> ")
    assert builds(tok=other_template)[0] == 1
    other_tokens = copy.deepcopy(tiny_tokenizer)
    other_tokens.add_tokens(["<extra_token>"])
    assert builds(tok=other_tokens)[0] == 1
    monkeypatch.setattr(encode_module, "ENCODER_VERSION", 10**6, raising=False)
    assert builds()[0] == 1
    assert builds()[0] == 0
    assert builds(cache="refresh")[0] == 1
    entries = len(cache.entries())
    n, off = builds(cache="off")
    assert n == 0 and len(cache.entries()) == entries and _ids(off) == _ids(edited)


def test_two_processes_encode_exactly_what_one_does(tmp_path, cache_dir, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(40))
    one = data.load(DataSection(train=str(path), format="alpaca", cache="off", num_proc=1), tiny_tokenizer, 16)
    two = data.load(DataSection(train=str(path), format="alpaca", cache="off", num_proc=2), tiny_tokenizer, 16)
    for column in ("input_ids", "labels", "length", "n_trained", "truncated", "record"):
        assert two.train.table.with_format("arrow")[column].equals(one.train.table.with_format("arrow")[column])
    # what the length-grouped sampler reads: one list from the Arrow column, not a per-row lookup
    lengths = one.train.dataset(with_length=True)["length"]
    assert isinstance(lengths, list) and lengths == [len(e.input_ids) for e in one.train.encoded]
    assert one.train.n_truncated > 0 and (one.train.n_truncated, one.train.n_dropped) == (
        two.train.n_truncated,
        two.train.n_dropped,
    )
    # the Arrow rows are what encode() gives record by record
    from finetune.data.encode import encode

    for row, example in zip(
        one.train.encoded, data.read_examples(str(path), DataSection(train=str(path), format="alpaca"))[0]
    ):
        out = encode(tiny_tokenizer, example, 16)
        first = out[0] if isinstance(out, list) else out
        assert (row.input_ids, row.labels, row.truncated) == (first.input_ids, first.labels, first.truncated)


def test_interrupted_preparation_leaves_nothing_usable(tmp_path, cache_dir, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(10))
    cfg = DataSection(train=str(path), format="alpaca")
    real, calls = encode_module._plan_chat, []

    def dies_midway(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # like Ctrl-C or a kill: nothing after this line runs
        return real(*args, **kw)

    monkeypatch.setattr(encode_module, "_plan_chat", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        data.load(cfg, tiny_tokenizer, 64)
    assert cache.entries() == []
    leftovers = [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and not cache.is_complete(leftovers[0])
    # a temp dir of a dead process (this host) is cleaned up by the next preparation
    dead = cache_dir / leftovers[0].name.replace(f"-{os.getpid()}", "-999999999")
    leftovers[0].rename(dead)
    monkeypatch.setattr(encode_module, "_plan_chat", real)
    before = cache.builds
    prepared = data.load(cfg, tiny_tokenizer, 64)
    assert cache.builds == before + 1 and len(prepared.train.encoded) == 10
    assert not dead.exists() and [p.name for p in cache_dir.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_waiting_rank_raises_the_main_process_error(tmp_path, cache_dir, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Read: " + "words " * 40, "input": "", "output": "OK"}])
    cfg = DataSection(train=str(path), format="alpaca")
    with pytest.raises(DataError, match="all 1 records are longer than train.max_length=8") as main_error:
        data.load(cfg, tiny_tokenizer, 8)
    assert cache.entries() == []
    monkeypatch.setenv("LOCAL_RANK", "1")  # another rank of the same node, which never encodes
    monkeypatch.setattr(cache, "builds", cache.builds)
    with pytest.raises(DataError) as waiting_error:
        data.load(cfg, tiny_tokenizer, 8)
    assert str(waiting_error.value) == str(main_error.value)


RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
from finetune import data, loading
from finetune.config import DataSection, ModelSection
from finetune.data import cache
import hashlib
tok = loading.load_tokenizer(ModelSection(name_or_path="tiny-llama"))
prepared = data.load(DataSection(train={path!r}, format="alpaca", eval_ratio=0.2), tok, 64, seed=3)
digest = hashlib.sha256(
    repr([(e.input_ids, e.labels) for e in prepared.train.encoded + prepared.eval.encoded]).encode()
)
out = {{
    "rank": int(os.environ["RANK"]),
    "builds": cache.builds,
    "digest": digest.hexdigest(),
    "dir": str(prepared.train.cache_dir),
}}
with open(os.path.join({out!r}, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(out, f)
"""


def test_two_ranks_under_accelerate_share_one_encoding(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(30))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), path=str(path), out=str(tmp_path)))
    launch = ddp_launch(
        str(script),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["builds"] for r in ranks] == [1, 0]  # only the main process encoded
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["dir"] == ranks[1]["dir"]
    assert done.stderr.count("encode d.jsonl: 100%") == 1  # one progress bar: one encoder


def test_data_prepare_then_train_starts_from_the_cache(tmp_path, cache_dir, capsys):
    from finetune import cli

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(memo_recipe(tmp_path, steps=2))
    assert cli.main(["data", "prepare", str(recipe)]) == 0
    report = capsys.readouterr().out
    (entry,) = cache.entries()
    assert f"cache {entry[0]} (" in report and "4 examples from 4 records" in report
    assert entry[1]["examples"] == 4 and entry[1]["format"] == "messages"
    assert cli.main(["data", "prepare", str(recipe), "data.max_samples=2"]) == 0
    assert "2 examples from 2 records" in capsys.readouterr().out and len(cache.entries()) == 2
    before = cache.builds
    assert cli.main(["data", "prepare", str(recipe)]) == 0 and cache.builds == before  # a hit
    assert not (tmp_path / "out").exists()  # nothing but the cache was written


def test_a_record_may_become_several_sequences(tmp_path, cache_dir, tiny_tokenizer, monkeypatch):
    """encode() returns a list (one sequence per assistant turn, for templates that are not
    prefix-consistent): every sequence is a row, counted against its record, with the first note."""
    from types import SimpleNamespace

    path = write_jsonl(tmp_path / "d.jsonl", _rows(3))
    real = encode_module.encode_many

    def per_turn(tok, examples, max_length=None, *, options=None, where=None):
        out = []
        for [one] in real(tok, examples, max_length):
            two = SimpleNamespace(
                input_ids=one.input_ids + one.input_ids,
                labels=[-100] * len(one.labels) + one.labels,
                truncated=False,
                n_trained=one.n_trained,
                note="turn 1 renders differently",
            )
            out.append([one, two])
        return out

    monkeypatch.setattr(encode_module, "encode_many", per_turn)
    prepared = data.load(DataSection(train=str(path), format="alpaca"), tiny_tokenizer, 256)
    split = prepared.train
    assert (split.n_records, len(split.encoded)) == (3, 6)
    assert split.table["record"][:] == [0, 0, 1, 1, 2, 2]
    assert split.first_note == "record 0: turn 1 renders differently"
    assert [len(e.input_ids) for e in split.encoded][:2] == [
        len(split.encoded[0].input_ids),
        2 * len(split.encoded[0].input_ids),
    ]


def test_two_nodes_on_a_shared_cache_dir_encode_once(tmp_path, cache_dir):
    """The main processes of two nodes (both LOCAL_RANK 0) on one shared FINETUNE_DATA_CACHE:
    the file lock lets one encode; the other finds its entry."""
    path = write_jsonl(tmp_path / "d.jsonl", _rows(30))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), path=str(path), out=str(tmp_path)))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "RANK": str(rank)},
        )
        for rank in (0, 2)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 2)]
    assert sorted(r["builds"] for r in ranks) == [0, 1]
    assert ranks[0]["digest"] == ranks[1]["digest"] and len(cache.entries()) == 1


def _encodes(log: str) -> int:
    """Cache misses a command logged (`cache: SOURCE saved in ENTRY`: it encoded and saved an entry)."""
    return sum(" saved in " in line for line in log.splitlines() if "cache: " in line)


def test_data_prepare_is_what_train_starts_from_as_a_user_runs_them(tmp_path, cache_dir, tiny_path):
    """`finetune data prepare RECIPE`, then `finetune train RECIPE`, each a process of its own: train
    encodes nothing and uses the one entry prepare wrote (the reasoning recipe sets encode options)."""
    recipe = str(REPO / "recipes" / "tiny" / "sft_reasoning.yaml")
    prepared = run_cli(["data", "prepare", recipe], cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert _encodes(prepared.stderr) == 1
    (entry,) = cache.entries()
    trained = run_cli(
        ["train", recipe, f"output.dir={tmp_path / 'out'}", "train.max_steps=1", "train.report_to=[]"], cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert _encodes(trained.stderr) == 0 and f"24 examples from {entry[0]}" in trained.stderr
    assert cache.entries() == [entry]  # nothing else written, the entry untouched


@pytest.mark.parametrize("recipe", ["sft_lora.yaml", "sft_tools.yaml"])
def test_data_prepare_and_train_compute_one_key(tmp_path, cache_dir, tiny_path, recipe, capsys):
    from finetune import cli

    path = str(REPO / "recipes" / "tiny" / recipe)
    assert cli.main(["data", "prepare", path]) == 0
    entries = cache.entries()
    before = cache.builds
    assert cli.main(["train", path, "--dry-run", f"output.dir={tmp_path / 'out'}"]) == 0
    assert cache.builds == before and cache.entries() == entries


def test_data_cache_off_as_yaml_reads_it(tmp_path):
    """`data.cache: off` unquoted is the YAML boolean false: it means off (and true means auto)."""
    from finetune import config

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name_or_path: tiny-llama}\ndata: {train: alpaca_en_demo, cache: off}\noutput: {dir: o}\n"
    )
    assert config.load(str(recipe)).data.cache == "off"
    assert config.load(str(recipe), ["data.cache=on"]).data.cache == "auto"
    assert config.load(str(recipe), ["data.cache=refresh"]).data.cache == "refresh"
    assert config.load(str(recipe), ["data.cache=no"]).data.cache == "off"


SLOW_PREPARE = """
import sys, time
sys.path.insert(0, {repo!r})
from finetune import data, loading
from finetune.config import DataSection, ModelSection
from finetune.data import encode

tok = loading.load_tokenizer(ModelSection(name_or_path="tiny-llama"))
encode.encode_many = lambda *a, **kw: time.sleep(600)  # workers that would outlive a killed parent
data.load(DataSection(train={path!r}, format="alpaca", num_proc=2), tok, 64)
"""


def test_encoding_workers_die_with_a_killed_prepare(tmp_path, cache_dir, tiny_path):
    """kill -9 of the process that prepares the data leaves no encoding worker behind."""
    import signal
    import time

    import psutil

    path = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    script = tmp_path / "prepare.py"
    script.write_text(SLOW_PREPARE.format(repo=str(REPO), path=str(path)))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        workers = []
        while len(workers) < 2 and parent.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            workers = psutil.Process(parent.pid).children(recursive=True)
        assert len(workers) >= 2, "the preparation never started its 2 workers"
        time.sleep(0.5)  # the workers are in the encode function
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    orphans = [w.pid for w in workers if alive(w)]
    for pid in orphans:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert orphans == []


def test_a_damaged_entry_is_one_warning_and_a_rebuild(tmp_path, cache_dir, tiny_tokenizer, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(12))
    cfg = DataSection(train=str(path), format="alpaca")
    good = _ids(data.load(cfg, tiny_tokenizer, 64))
    (entry, meta) = cache.entries()[0]
    arrow = entry / meta["files"][0]
    damages = [
        lambda: os.truncate(arrow, arrow.stat().st_size // 2),  # a disk that filled up, a copy cut short
        lambda: (entry / "meta.json").write_text('{"files": ['),
        lambda: arrow.write_bytes(arrow.read_bytes()[:-8] + b"\0" * 8),  # same size, other bytes
        lambda: arrow.unlink(),
    ]
    import logging

    finetune_log = logging.getLogger("finetune")  # the CLI stops it propagating (an earlier test may have run it)
    finetune_log.addHandler(caplog.handler)
    try:
        for damage in damages:
            damage()
            caplog.clear()
            before = cache.builds
            assert _ids(data.load(cfg, tiny_tokenizer, 64)) == good
            assert cache.builds == before + 1 and len(cache.entries()) == 1
            warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert len(warnings) == 1 and f"{entry} is damaged" in warnings[0], warnings
            assert cache.damage(entry) is None
    finally:
        finetune_log.removeHandler(caplog.handler)


READ_ONLY = """
import json, sys
sys.path.insert(0, {repo!r})
from finetune import cli, data, loading
from finetune.config import DataSection, ModelSection
from finetune.data import cache
tok = loading.load_tokenizer(ModelSection(name_or_path="tiny-llama"))
out = {{}}
for max_length in (64, 32):  # the entry the root holds, then one it does not
    prepared = data.load(DataSection(train={path!r}, format="alpaca"), tok, max_length)
    out[max_length] = [str(prepared.train.cache_dir), [e.input_ids for e in prepared.train.encoded], cache.builds]
out["prepare"] = cli.main(["data", "prepare", {recipe!r}])
print(json.dumps(out))
"""


def test_a_read_only_cache_root(tmp_path, cache_dir, tiny_tokenizer, tiny_path):
    """A read-only root (a shared cache mounted ro): its intact entry is used as it is; data it lacks
    is encoded without caching (one warning); `data prepare` is refused in one line."""
    import shutil

    if not shutil.which("unshare"):
        missing_tool("unshare (util-linux) is needed to mount the cache read-only")
    path = write_jsonl(tmp_path / "d.jsonl", _rows(12))
    prepared = data.load(DataSection(train=str(path), format="alpaca"), tiny_tokenizer, 64)
    cached = [e.input_ids for e in prepared.train.encoded]
    uncached = [
        e.input_ids
        for e in data.load(
            DataSection(train=str(path), format="alpaca", cache="off"), tiny_tokenizer, 32
        ).train.encoded
    ]
    listing = sorted(str(p) for p in cache_dir.rglob("*"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(memo_recipe(tmp_path, steps=2))
    script = tmp_path / "ro.py"
    script.write_text(READ_ONLY.format(repo=str(REPO), path=str(path), recipe=str(recipe)))
    mount = f"mount --bind -o ro {cache_dir} {cache_dir} && exec {sys.executable} {script}"
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    if done.returncode and "mount" in done.stderr and "ro.py" not in done.stderr:
        missing_tool(f"no read-only bind mount in a user namespace here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["64"] == [str(prepared.train.cache_dir), cached, 0]  # the entry, read as it is
    assert not out["32"][0].startswith(str(cache_dir)) and out["32"][1:] == [uncached, 0]
    assert out["prepare"] == 2
    assert done.stderr.count(f"data cache: {cache_dir} is read-only") == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and f"{cache_dir} is not writable" in errors[0], errors
    assert sorted(str(p) for p in cache_dir.rglob("*")) == listing


def test_cache_list_and_prune(tmp_path, cache_dir, tiny_tokenizer, capsys):
    """`finetune cache list` shows each entry with its size and last use; `prune` removes by age, by
    size (least recently used first) and all, a dry run removes nothing, an entry being built is kept,
    a dead process's leftover always goes."""
    import socket
    import time
    from pathlib import Path

    from filelock import FileLock

    from finetune import caches, cli

    rows = _rows(12)
    for name, n in (("old", 12), ("new", 6), ("built", 3)):
        data.load(
            DataSection(train=str(write_jsonl(tmp_path / f"{name}.jsonl", rows[:n])), format="alpaca"),
            tiny_tokenizer,
            64,
        )
    entry = {Path(m["source"]).stem: p for p, m in cache.entries()}
    month_ago = time.time() - 30 * 86400
    os.utime(entry["old"], (month_ago, month_ago))
    os.utime(entry["built"], (month_ago - 60, month_ago - 60))
    dead = cache_dir / f".tmp-x-{socket.gethostname()}-999999999"
    elsewhere = cache_dir / ".tmp-x-otherhost-999999999"  # another node's build on a shared root: left alone
    dead.mkdir(), elsewhere.mkdir()

    assert cli.main(["cache", "list", "--kind", "data"]) == 0
    listing = capsys.readouterr().out
    for name, when in (("old", "30 days ago"), ("built", "30 days ago"), ("new", "just now")):
        (line,) = [x for x in listing.splitlines() if entry[name].name in x]
        assert (
            f"{name}.jsonl: alpaca" in line
            and when in line
            and caches.human_size(cache.size_on_disk(entry[name])) in line
        )

    with FileLock(str(cache_dir / f".{entry['built'].name}.lock")):  # as a process building it holds it
        assert cli.main(["cache", "prune", "--older-than", "7d", "--dry-run"]) == 0
        dry = capsys.readouterr().out
        assert all(p.exists() for p in entry.values()) and dead.exists()
        assert cli.main(["cache", "prune", "--older-than", "7d"]) == 0
        done = capsys.readouterr().out
    assert dry.replace("would remove", "removed").replace("would free", "freed") == done.replace(
        " entries)", " entries, dry run: nothing removed)"
    )
    assert not entry["old"].exists() and not dead.exists() and f"removed data   {entry['old'].name}" in done
    assert entry["new"].exists() and elsewhere.exists()
    assert entry["built"].exists() and f"kept   data   {entry['built'].name}" in done

    assert cli.main(["cache", "prune", "--max-size", f"{cache.size_on_disk(entry['new']) + 10}B"]) == 0
    assert not entry["built"].exists() and entry["new"].exists()  # the least recently used went first
    assert cli.main(["cache", "prune", "--all"]) == 0
    assert cache.entries() == []
    capsys.readouterr()
    assert cli.main(["cache", "prune"]) == 2  # nothing said: nothing removed
    assert "say what to remove" in capsys.readouterr().err
