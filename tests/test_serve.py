"""`finetune serve`, driven by the real `openai` client against a server on localhost: answers equal what
`finetune chat` gives (streamed or not), 16 concurrent requests are batched and all correct, adapters on one
base are served by name, a QLoRA adapter runs on its 4-bit base, the API key is enforced, malformed requests
get OpenAI-style JSON errors and the server goes on; reasoning and tool calls come back in their fields."""

import concurrent.futures
import copy
import os
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
from _support import MEMO_CHATS, REPO, free_port, run_cli
from peft import LoraConfig, PromptTuningConfig

from finetune import chat, loading, outputs, serve

KEY = "sk-test-key"
QUESTIONS = [c[0]["content"] for c in MEMO_CHATS]
ANSWERS = [c[1]["content"] for c in MEMO_CHATS]
RAND_SYSTEM = "你是一个乐于助人的助手。"


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
def server(adapters):
    others = [(name, str(adapters[name])) for name in ("rand", "qlora", "prompt")]
    served = serve.load_served(str(adapters["memo"]), others, name="memo")
    app = serve.create_app(served, api_key=KEY, limits=serve.Limits(max_tokens=64, max_body_bytes=20_000))
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
    r = run_cli(
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
    assert {m.id for m in c.models.list().data} == {"memo", "rand", "qlora", "prompt"}
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
    ("no messages", {"json": {"model": "memo"}}, 422, "messages"),
    ("empty messages", {"json": {"model": "memo", "messages": []}}, 422, "messages"),
    ("unknown role", {"json": {"model": "memo", "messages": [{"role": "wizard", "content": "hi"}]}}, 422, "role"),
    (
        "temperature not a number",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}},
        422,
        "temperature",
    ),
    (
        "temperature out of range",
        {"json": {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}},
        422,
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
        assert r.status_code == 422 and "prompt" in r.json()["error"]["message"]
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
    items = []
    row = serve.Row(served, [], prompt, serve.Sampling(200, 0, 1), items.append)
    row.start()
    for token in tok(answer, add_special_tokens=False)["input_ids"]:
        assert not row.step(token, {tok.eos_token_id})
    row.step(tok.eos_token_id, {tok.eos_token_id})
    assert "".join(i[1] for i in items if i[0] == "reasoning").strip() == "I should call the tool."
    assert "".join(i[1] for i in items if i[0] == "content") == "Let me check."
    calls = [i[1] for i in items if i[0] == "tool_call"]
    assert [(c.name, c.arguments) for c in calls] == [("weather", '{"city": "Paris"}')]
    assert items[-1][0] == "done"
    plain = copy.deepcopy(tiny_tokenizer)  # a template without such tags: plain text, no parser
    assert serve.response_schema(plain)[0] is None


def test_cli_serves_with_the_env_api_key_and_rejects_a_bad_dir(adapters, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), serve.API_KEY_ENV: KEY}
    bad = subprocess.run(
        [sys.executable, "-m", "finetune", "serve", str(tmp_path / "missing")],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no such directory" in bad.stderr and "Traceback" not in bad.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", "serve", str(adapters["memo"]), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
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
