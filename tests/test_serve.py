"""`finetune serve`, driven by the real `openai` client and plain HTTP against a server on localhost: answers
equal what `finetune chat` gives (streamed or not), 16 concurrent requests are batched and all correct, adapters
on one base are served by name, a QLoRA adapter runs on its 4-bit base, the API key is enforced, malformed
requests get OpenAI-style JSON errors and the server goes on; reasoning and tool calls come back in their
fields, tool_choice is honoured; every request is bounded (client templates refused, prompts x n and tokens
capped, rendering off the event loop, a client that leaves cancels its rows) and so is the CLI."""

import concurrent.futures
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
import yaml
from _merge_support import make_adapter
from _support import MEMO_CHATS, REPO, free_port, memo_recipe, run_cli_in_process, write_jsonl
from peft import LoraConfig, PromptTuningConfig

from finetune import chat, cli, config, loading, outputs, serve

KEY = "sk-test-key"
QUESTIONS = [c[0]["content"] for c in MEMO_CHATS]
ANSWERS = [c[1]["content"] for c in MEMO_CHATS]
RAND_SYSTEM = "你是一个乐于助人的助手。"
TOOLS_TEMPLATE = yaml.safe_load((REPO / "recipes" / "tiny" / "sft_tools.yaml").read_text())["model"]["chat_template"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
WEATHER_Q, SKY_Q = "What is the weather in Paris?", QUESTIONS[0]
PLAN = ("<plan>", "</plan>")  # the agent's data.reasoning_tags: not the default <think>, and not in its template


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_path, memo_lora_dir):
    """memo (trained) and rand (random LoRA) on the same fp32 base; qlora (random) on the 4-bit base;
    prompt (random prompt tuning: virtual tokens in the PeftModel's forward)."""
    root = tmp_path_factory.mktemp("serve_adapters")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    rand = make_adapter(tiny_path, root / "rand", lora, seed=1)
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": str(tiny_path)},
        "data": {"train": "x.jsonl", "system": RAND_SYSTEM},
    }
    (rand / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return {
        "memo": memo_lora_dir,
        "rand": rand,  # with a recorded system prompt (data.system), the default when a request has none
        "qlora": make_adapter(tiny_path, root / "qlora", copy.deepcopy(lora), seed=2, qlora=True),
        "prompt": make_adapter(tiny_path, root / "prompt", prompt, seed=3),
    }


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """A LoRA trained (as sft_tools.yaml and sft_reasoning.yaml train) to call get_weather when asked about the
    weather with the tool offered, and to think in <plan> tags (its data.reasoning_tags: the tools template has
    no reasoning support, so reasoning is trained inline) before answering about the sky."""
    root = tmp_path_factory.mktemp("agent")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    rows = [
        {"messages": [{"role": "user", "content": WEATHER_Q}, {"role": "assistant", "tool_calls": [call]}]},
        {
            "messages": [
                {"role": "user", "content": SKY_Q},
                {"role": "assistant", "reasoning_content": "It is day.", "content": ANSWERS[0]},
            ]
        },
    ]
    rows[0]["tools"] = [WEATHER]
    data = write_jsonl(root / "agent.jsonl", rows)
    recipe = memo_recipe(
        root,
        steps=30,
        model={"chat_template": TOOLS_TEMPLATE},
        data={"train": str(data), "reasoning_tags": list(PLAN)},
        train={"per_device_train_batch_size": 2},
    )
    (root / "recipe.yaml").write_text(recipe, encoding="utf-8")
    from finetune.stages import sft

    return sft.run(config.load(str(root / "recipe.yaml"), []))


LIMITS = serve.Limits(
    max_tokens=256, max_body_bytes=20_000, max_sequences=16, max_request_tokens=4096, render_timeout_s=2
)


@pytest.fixture(scope="module")
def server(adapters, agent):
    others = [(name, str(adapters[name])) for name in ("rand", "qlora", "prompt")] + [("agent", str(agent))]
    served = serve.load_served(str(adapters["memo"]), others, name="memo")
    app = serve.create_app(served, api_key=KEY, limits=LIMITS)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{port}", "app": app, "served": served}
    srv.should_exit = True
    thread.join(timeout=10)


def client(server, key=KEY):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0)


def ask(c, question, model="memo", **kw):
    kw = {"temperature": 0, "max_tokens": 24, **kw}
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def chat_answer(adapter_dir, question, n=24, system=None):
    """What `finetune chat` answers (the same Chat class the CLI runs, with the dir's recorded system
    prompt unless `system` is given), in-process."""
    model, tok, _ = loading.load_for_inference(adapter_dir)
    system = system if system is not None else outputs.recorded_system_prompt(adapter_dir)
    return chat.Chat(model, tok, system=system, max_new_tokens=n).answer(question)


def test_chat_completion_equals_finetune_chat_streamed_or_not(server, adapters, tmp_path):
    c = client(server)
    system = "You are a helpful assistant."
    r = run_cli_in_process(  # (test_chat runs `finetune chat --prompt` as a process of its own)
        ["chat", str(adapters["memo"]), "--prompt", QUESTIONS[0], "--system", system, "--max-new-tokens", "24"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    expected = r.stdout.strip()
    assert expected == ANSWERS[0]  # the memorised answer: the model and the comparison are real
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[0]}]
    done = c.chat.completions.create(model="memo", messages=messages, temperature=0, max_tokens=24)
    assert done.choices[0].message.content == expected
    assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens > 0
    chunks = list(
        c.chat.completions.create(
            model="memo",
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == expected
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 1  # it did stream, token by token
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    # max_tokens cuts (finish_reason length); a stop string ends the answer before it, exclusive
    short = ask(c, QUESTIONS[0], max_tokens=2).choices[0]
    assert short.finish_reason == "length" and expected.startswith(short.message.content)
    stopped = ask(c, QUESTIONS[0], stop=["blue"]).choices[0]
    assert stopped.message.content == expected[: expected.index("blue")].strip() and stopped.finish_reason == "stop"


def test_an_answer_cut_inside_a_character_is_the_same_served_and_in_chat(server, adapters):
    """max_tokens can fall between the byte tokens of one Chinese character: neither answer ends in U+FFFD."""
    memo = adapters["memo"]
    model, tok, _ = loading.load_for_inference(str(memo))
    system = outputs.recorded_system_prompt(str(memo))
    ids = tok.encode(ANSWERS[3], add_special_tokens=False)
    cuts = [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the memorised Chinese answer has a character of several byte tokens"
    c = client(server)
    for n in cuts[:3]:
        expected = chat.Chat(model, tok, system=system, max_new_tokens=n).answer(QUESTIONS[3])
        assert "\ufffd" not in expected and ANSWERS[3].startswith(expected)
        assert ask(c, QUESTIONS[3], max_tokens=n).choices[0].message.content == expected


def test_sixteen_concurrent_requests_are_batched_and_all_correct(server):
    c = client(server)
    engine = server["app"].state.engine
    questions = QUESTIONS * 4
    before = len(engine.batch_sizes)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda q: ask(c, q).choices[0].message.content, questions))
    assert answers == ANSWERS * 4
    assert max(engine.batch_sizes[before:]) > 1  # requests that arrived together were generated together


def test_two_adapters_on_one_base_are_served_by_name(server, adapters):
    c = client(server)
    assert {m.id for m in c.models.list().data} == {"memo", "rand", "qlora", "prompt", "agent"}
    memo, rand = server["served"]["memo"], server["served"]["rand"]
    assert memo.model is rand.model and memo.adapter != rand.adapter  # one base, peft's multi-adapter
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # interleaved requests for both names
        got = list(
            pool.map(
                lambda m: ask(c, QUESTIONS[1], model=m).choices[0].message.content, ["rand", "memo", "rand", "memo"]
            )
        )
    # a random adapter's answer may stop at max_tokens inside a character: the server holds back the
    # incomplete bytes, chat prints U+FFFD for them; compare the complete characters
    expected_rand = chat_answer(adapters["rand"], QUESTIONS[1]).rstrip("\ufffd")
    got = [g.rstrip("\ufffd") for g in got]
    assert got == [expected_rand, ANSWERS[1], expected_rand, ANSWERS[1]] and expected_rand != ANSWERS[1]
    assert server["served"]["rand"].system == RAND_SYSTEM and server["served"]["memo"].system is None
    own = c.chat.completions.create(
        model="rand",
        temperature=0,
        max_tokens=24,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[1]}],
    )  # a request's own system message replaces the recorded one
    own_expected = chat_answer(adapters["rand"], QUESTIONS[1], system="Be brief.").rstrip("\ufffd")
    assert own.choices[0].message.content.rstrip("\ufffd") == own_expected
    assert chat_answer(adapters["rand"], QUESTIONS[1], system="").rstrip("\ufffd") != expected_rand  # it mattered
    both = ask(c, QUESTIONS[1], model="rand", n=2)  # n choices
    assert [ch.message.content.rstrip("\ufffd") for ch in both.choices] == [expected_rand] * 2
    sampled = [
        ask(c, QUESTIONS[1], model="rand", temperature=1.0, top_p=0.9, seed=s).choices[0].message.content
        for s in (7, 7)
    ]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
    text = c.completions.create(model="memo", prompt="The farmer found", max_tokens=8, temperature=0).choices[0]
    model, tok, _ = loading.load_for_inference(adapters["memo"])
    from finetune.eval.generation import generate

    assert text.text.strip() == generate(model, tok, ["The farmer found"], max_new_tokens=8)[0]


def test_qlora_and_prompt_tuning_adapters_are_served_as_trained(server, adapters):
    served = server["served"]["qlora"]
    assert served.model.base_model.model.is_loaded_in_4bit  # on its 4-bit base, as QLoRA trains
    got = ask(client(server), QUESTIONS[2], model="qlora").choices[0].message.content
    assert got == chat_answer(adapters["qlora"], QUESTIONS[2])
    got = ask(client(server), QUESTIONS[2], model="prompt").choices[0].message.content
    assert got == chat_answer(adapters["prompt"], QUESTIONS[2])


def test_api_key_is_required_on_the_api_and_health_is_open(server):
    with pytest.raises(openai.AuthenticationError):
        ask(client(server, key="wrong"), QUESTIONS[0])
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": "memo", "messages": []})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


MALFORMED = [  # (what, request kwargs, status, words in the message)
    ("not JSON", {"content": b"{nope"}, 400, "not valid JSON"),
    ("not an object", {"json": [1, 2]}, 400, "JSON object"),
    ("no messages", {"json": {"model": "memo"}}, 400, "messages"),
    ("empty messages", {"json": {"model": "memo", "messages": []}}, 400, "messages"),
    ("unknown role", {"json": {"model": "memo", "messages": [{"role": "wizard", "content": "hi"}]}}, 400, "role"),
    (
        "temperature not a number",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}},
        400,
        "temperature",
    ),
    (
        "temperature out of range",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}},
        400,
        "temperature",
    ),
    ("unknown model", {"json": {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}}, 404, "gpt-9"),
    (
        "max_tokens over the cap",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}},
        400,
        "max_tokens",
    ),
    ("n over the cap", {"json": {"messages": [{"role": "user", "content": "hi"}], "n": 99}}, 400, "n:"),
    (
        "five stop strings",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}},
        400,
        "stop",
    ),
    (
        "template refuses a role",
        {"json": {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}},
        400,
        "chat template",
    ),
    ("prompt over the context", {"json": {"messages": [{"role": "user", "content": "sky " * 2000}]}}, 400, "context"),
    ("body too large", {"json": {"messages": [{"role": "user", "content": "x" * 30_000}]}}, 413, "body"),
    # strict types: no coercion of true to 1, nor of "2" to 2
    (
        "max_tokens true",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}},
        400,
        "max_tokens",
    ),
    ("n as a string", {"json": {"messages": [{"role": "user", "content": "hi"}], "n": "2"}}, 400, "n"),
    ("seed over int64", {"json": {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}}, 400, "seed"),
    ("JSON nested 9,000 deep", {"content": b'{"messages": ' + b"[" * 9000 + b"]" * 9000 + b"}"}, 400, "nested"),
    ("JSON nested 100 deep", {"content": b'{"tools": ' + b"[" * 100 + b"]" * 100 + b"}"}, 400, "nested"),
    (
        "a lone surrogate",
        {"content": b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'},
        400,
        "surrogate",
    ),
    (
        "tool call arguments not JSON",
        {
            "json": {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{nope"}}],
                    }
                ]
            }
        },
        400,
        "arguments",
    ),
    (
        "tool call without function",
        {"json": {"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "id": "1"}]}]}},
        400,
        "function",
    ),
    (
        "a client's own chat template",
        {
            "json": {
                "messages": [{"role": "user", "content": "hi"}],
                "chat_template_kwargs": {"chat_template": "{{ 1 }}"},
            }
        },
        400,
        "chat_template",
    ),
    (
        "a template kwarg that is not a switch",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": [1]}}},
        400,
        "chat_template_kwargs",
    ),
    (
        "tool_choice required without tools",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}},
        400,
        "tool_choice",
    ),
    (
        "tools for a template that cannot show them",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}},
        400,
        "tools",
    ),
    (
        "tool_choice names a function not offered",
        {
            "json": {
                "model": "agent",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            }
        },
        400,
        "get_time",
    ),
]


def test_malformed_requests_get_json_errors_and_the_server_goes_on(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server["url"], headers=headers) as http:
        for what, kwargs, status, words in MALFORMED:
            r = http.post("/v1/chat/completions", **kwargs)
            assert r.status_code == status, (what, r.status_code, r.text)
            error = r.json()["error"]
            assert words in error["message"] and error["type"], (what, error)
            assert "Traceback" not in r.text
        r = http.post("/v1/completions", json={"model": "memo"})
        assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
        assert http.get("/v1/nowhere").status_code == 404 and "error" in http.get("/v1/nowhere").json()
        assert http.get("/v1/chat/completions").status_code == 405
    assert ask(client(server), QUESTIONS[3]).choices[0].message.content == ANSWERS[3]  # still answering


def test_reasoning_and_tool_calls_come_back_in_their_fields(tiny_tokenizer):
    """A template that writes <think> and <tool_call> blocks: the generated text is split into
    reasoning_content, content and tool_calls (transformers' ResponseParser on a schema derived from the
    template's own tags), token by token as the server streams it."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m.get('reasoning_content') %}<think>"
        "{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}{% for t in m.get('tool_calls', []) %}"
        "<tool_call>{{ t['function'] | tojson }}</tool_call>{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}"
    )
    schema, _ = serve.response_schema(tok)
    assert set(schema["fields"]) == {"reasoning_content", "tool_calls", "content"}
    served = serve.Served("t", REPO, None, tok, None, schema)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"}], add_generation_prompt=True, tokenize=False
    )
    call = '{"name": "weather", "arguments": {"city": "Paris"}}'
    answer = f"I should call the tool.</think>Let me check. <tool_call>{call}</tool_call>"
    items = _feed(served, prompt, answer)
    assert "".join(i[1] for i in items if i[0] == "reasoning").strip() == "I should call the tool."
    assert "".join(i[1] for i in items if i[0] == "content") == "Let me check."
    calls = [i[1] for i in items if i[0] == "tool_call"]
    assert [(c.name, c.arguments) for c in calls] == [("weather", '{"city": "Paris"}')]
    assert items[-1][0] == "done"
    plain = copy.deepcopy(tiny_tokenizer)  # a template without such tags: plain text, no parser
    assert serve.response_schema(plain)[0] is None
    # ... unless the run recorded data.reasoning_tags: the shipped reasoning recipe's inline format
    served = serve.Served("t", REPO, None, plain, None, serve.response_schema(plain, ("<think>", "</think>"))[0])
    prompt = plain.apply_chat_template(
        [{"role": "user", "content": SKY_Q}], add_generation_prompt=True, tokenize=False
    )
    items = _feed(served, prompt, f"<think>\nIt is day.\n</think>\n\n{ANSWERS[0]}")
    assert "".join(i[1] for i in items if i[0] == "reasoning").strip() == "It is day."
    assert "".join(i[1] for i in items if i[0] == "content") == ANSWERS[0]


def _feed(served, prompt: str, answer: str) -> list:
    """What a Row emits for `answer`, generated token by token after `prompt`."""
    tok, items = served.tokenizer, []
    row = serve.Row(served, [], prompt, serve.Sampling(200, 0, 1), items.append)
    row.start()
    for token in tok(answer, add_special_tokens=False)["input_ids"]:
        assert not row.step(token, {tok.eos_token_id})
    row.step(tok.eos_token_id, {tok.eos_token_id})
    return items


# `finetune serve` (cli.main, as `python -m finetune` runs it) with a fault planted in the engine thread: a
# request whose prompt holds KILL kills the thread, as --max-batch-size 0 once did
KILLABLE = """
import sys
from finetune import cli
from finetune.serve import engine
real = engine.Engine._batches
def batches(self, rows):
    if any("KILL" in r.prompt_text for r in rows):
        raise ValueError("planted fault")
    return real(self, rows)
engine.Engine._batches = batches
sys.exit(cli.main(sys.argv[1:]))
"""


def test_cli_serves_with_the_env_api_key_and_rejects_a_bad_dir(adapters, tmp_path):
    """... and a dead engine thread takes the server down: the waiting request gets a 503, the process exits 1."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), serve.API_KEY_ENV: KEY}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, "serve", str(adapters["memo"]), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        bad = subprocess.run(  # while the server starts
            [sys.executable, "-m", "finetune", "serve", str(tmp_path / "missing")],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 2 and "no such directory" in bad.stderr and "Traceback" not in bad.stderr
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list().data] == [adapters["memo"].name]
        assert ask(c, QUESTIONS[2], model=adapters["memo"].name).choices[0].message.content == ANSWERS[2]
        with pytest.raises(openai.APIStatusError, match="generation thread died") as dead:
            ask(c, "KILL", model=adapters["memo"].name)
        assert dead.value.status_code == 503
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
        assert "finetune serve stopped: the generation thread died: ValueError: planted fault" in err, err[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fastapi(name, *args, **kw):
        if name == "fastapi":
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    with pytest.raises(serve.ServeError, match=r"needs fastapi: pip install 'finetune\[serve\]'"):
        serve.require_extra()


# ---------------------------------------------------------------- reasoning and tool_choice, as served


def agent_ask(server, question, **kw):
    kw = {"temperature": 0, "max_tokens": 64, **kw}
    return client(server).chat.completions.create(
        model="agent", messages=[{"role": "user", "content": question}], **kw
    )


def test_reasoning_in_the_runs_recorded_tags_comes_back_in_reasoning_content(server):
    """A model trained with reasoning inline in its data.reasoning_tags (the tools template has none of its
    own): reasoning_content holds the reasoning, content only the answer, streamed or not."""
    assert server["served"]["agent"].schema["fields"]["reasoning_content"]["open"] == PLAN[0]
    done = agent_ask(server, SKY_Q).choices[0]
    assert done.message.content == ANSWERS[0], done.message
    assert done.message.model_extra["reasoning_content"] == "It is day."
    chunks = list(agent_ask(server, SKY_Q, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == ANSWERS[0]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas).strip() == "It is day."


def test_tool_choice_auto_none_required_and_named_are_honoured(server):
    auto = agent_ask(server, WEATHER_Q, tools=[WEATHER]).choices[0]  # the model calls by itself
    assert auto.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in auto.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    # none: the tools are not shown; a question it answers in words is answered, one it calls for regardless
    # (it memorised the call) is refused, not passed off as honoured
    none = agent_ask(server, SKY_Q, tools=[WEATHER], tool_choice="none").choices[0]
    assert none.finish_reason == "stop" and none.message.content == ANSWERS[0] and not none.message.tool_calls
    with pytest.raises(openai.InternalServerError, match="tool_choice none: .* calls a tool anyway"):
        agent_ask(server, WEATHER_Q, tools=[WEATHER], tool_choice="none")
    # required with one tool / a named function: the prompt opens the call, the model writes the arguments
    required = agent_ask(server, SKY_Q, tools=[WEATHER], tool_choice="required").choices[0]
    assert required.finish_reason == "tool_calls", required
    assert [(c.function.name, json.loads(c.function.arguments)) for c in required.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    streamed = list(agent_ask(server, SKY_Q, tools=[WEATHER], tool_choice="required", stream=True))
    calls = [c for ch in streamed if ch.choices for c in ch.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices][-1] == "tool_calls"
    named = {"type": "function", "function": {"name": "get_time"}}
    got = agent_ask(server, WEATHER_Q, tools=[WEATHER, CLOCK], tool_choice=named).choices[0]
    assert got.finish_reason == "tool_calls" and [c.function.name for c in got.message.tool_calls] == ["get_time"]
    # required among two tools opens only the tag: this model then writes no valid call, and is refused
    with pytest.raises(openai.InternalServerError, match="tool_choice required: .* no valid call"):
        agent_ask(server, SKY_Q, tools=[WEATHER, CLOCK], tool_choice="required")


# ---------------------------------------------------------------- bounds


def test_streamed_completions_with_the_openai_client(server):
    c = client(server)
    whole = c.completions.create(model="memo", prompt=["The farmer found", "Once"], max_tokens=8, temperature=0)
    chunks = list(
        c.completions.create(
            model="memo",
            prompt=["The farmer found", "Once"],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for i in range(2):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert "".join(ch.text for ch in mine) == whole.choices[i].text
        assert [ch.finish_reason for ch in mine][-1] == whole.choices[i].finish_reason
        assert all(ch.finish_reason is None for ch in mine[:-1]) and len(mine) > 2
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0


def test_prompts_times_n_and_total_tokens_are_capped(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server["url"], headers=headers) as http:
        r = http.post("/v1/completions", json={"prompt": ["a"] * 9, "n": 2, "max_tokens": 1})
        assert r.status_code == 400 and "18 sequences" in r.json()["error"]["message"], r.text
        r = http.post("/v1/completions", json={"prompt": ["a"] * 2000, "max_tokens": 1})
        assert r.status_code == 400 and "2000 sequences" in r.json()["error"]["message"], r.text
        r = http.post("/v1/completions", json={"prompt": ["sky " * 250] * 16, "max_tokens": 8})
        assert r.status_code == 400 and "at most 4096" in r.json()["error"]["message"], r.text
        r = http.post("/v1/completions", json={"prompt": ["sky " * 250] * 2, "max_tokens": 8})
        assert r.status_code == 200  # the same prompts, fewer of them


def test_rendering_is_off_the_event_loop_within_a_time_budget(server, monkeypatch):
    """A render that hangs answers its request with 503 after the budget; /health answers meanwhile."""
    tok = server["served"]["memo"].tokenizer
    gate = threading.Event()
    real = tok.apply_chat_template

    def slow(messages, *args, **kw):
        if "SLOW" in str(messages):
            gate.wait(30)
        return real(messages, *args, **kw)

    monkeypatch.setattr(tok, "apply_chat_template", slow)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow_answer = pool.submit(
            lambda: httpx.post(
                server["url"] + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"messages": [{"role": "user", "content": "SLOW"}]},
                timeout=60,
            )
        )
        try:
            for _ in range(3):  # the loop is free while the render hangs
                assert httpx.get(server["url"] + "/health", timeout=1.5).json()["status"] == "ok"
            r = slow_answer.result(timeout=30)
        finally:
            gate.set()
    assert r.status_code == 503 and "took over 2 s" in r.json()["error"]["message"], r.text


def test_a_client_that_leaves_cancels_its_non_streamed_request(server):
    """Closed mid-generation: its rows stop at the next token instead of running to max_tokens."""
    engine = server["app"].state.engine
    before, batches = engine.finished.copy(), len(engine.batch_sizes)
    body = json.dumps({"model": "rand", "prompt": ["Once"] * 8, "n": 2, "max_tokens": 200, "temperature": 1.0})
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        for _ in range(600):  # generation has started
            if len(engine.batch_sizes) > batches:
                break
            time.sleep(0.01)
    for _ in range(600):  # until all 16 rows have finished (the count may hold a row of the test before)
        if (engine.finished - before).total() >= 16:
            break
        time.sleep(0.05)
    finished = engine.finished - before
    assert finished["cancelled"] > 0 and not finished["length"], finished  # none ran on to max_tokens


def test_cli_limits_are_checked_before_loading(capsys, tmp_path):
    for flags, words in [
        (["--max-batch-size", "0"], "--max-batch-size: must be a positive number, got 0"),
        (["--max-tokens", "0"], "--max-tokens: must be a positive number, got 0"),
        (["--max-tokens", "-5"], "--max-tokens: must be a positive number, got -5"),
        (["--max-body-bytes", "0"], "--max-body-bytes: must be a positive number, got 0"),
        (["--render-timeout", "0"], "--render-timeout: must be a positive number, got 0.0"),
        (["--port", "99999"], "--port: must be 1-65535, got 99999"),
    ]:
        assert cli.main(["serve", str(tmp_path / "not-loaded"), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err == f"finetune: error: {words}\n", (flags, err)
