"""`finetune serve` speed: latency of one chat completion, and 16 concurrent requests vs the same 16 sent
one after another (the server batches concurrent requests into left-padded `generate` calls).

    python bench/serve.py                                  # tiny-llama, 16 requests, 32 new tokens each
    python bench/serve.py --model OUTPUT_DIR --requests 32 --max-tokens 64

Every request is greedy with --max-tokens as its limit; answers may end earlier at EOS, so the report counts
the tokens actually generated. Figures: median latency
of 5 single requests, wall seconds and completion tokens/s of each arm, the speed-up, and how many
concurrent answers equal the sequential ones (greedy; padding may flip a near-tie in rare cases).
"""

import argparse
import concurrent.futures
import statistics
import threading
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help="model or adapter dir (default: the tiny model)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    import openai
    import uvicorn

    from finetune import serve, tiny

    path = tiny.build_if_tiny(args.model) if tiny.is_tiny(args.model) else args.model
    served = serve.load_served(path, [], name="m")
    app = serve.create_app(served, limits=serve.Limits(max_tokens=max(args.max_tokens, 64)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    questions = ["What colour is the sky?", "Name three fruits.", "中国的首都是哪里？", "Tell me about the river."]
    prompts = [questions[i % len(questions)] for i in range(args.requests)]

    def ask(q):
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=args.max_tokens
        )
        return r.choices[0].message.content, r.usage.completion_tokens

    ask(prompts[0])  # warm-up
    latencies = []
    for _ in range(5):
        t = time.perf_counter()
        ask(prompts[0])
        latencies.append(time.perf_counter() - t)
    t = time.perf_counter()
    sequential = [ask(q) for q in prompts]
    t_seq = time.perf_counter() - t
    engine = app.state.engine
    before = len(engine.batch_sizes)
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
        concurrent_ = list(pool.map(ask, prompts))
    t_con = time.perf_counter() - t
    tokens = sum(n for _, n in sequential)
    same = sum(a[0] == b[0] for a, b in zip(sequential, concurrent_))
    print(f"model {path}; {args.requests} requests x up to {args.max_tokens} tokens")
    print(f"one chat completion: median {statistics.median(latencies) * 1000:.0f} ms")
    print(f"sequential: {t_seq:.2f} s ({tokens / t_seq:.0f} tokens/s)")
    print(
        f"concurrent: {t_con:.2f} s ({sum(n for _, n in concurrent_) / t_con:.0f} tokens/s); batches "
        f"{engine.batch_sizes[before:]}"
    )
    print(f"speed-up {t_seq / t_con:.1f}x; identical answers {same}/{args.requests}")
    server.should_exit = True


if __name__ == "__main__":
    main()
