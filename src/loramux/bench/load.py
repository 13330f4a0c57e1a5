"""Client-side HTTP load for the serving benchmarks: streamed completions through the official
`openai` client, with time to first token, time per output token and throughput."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor


def wait_ready(root_url: str, timeout: float = 600, *, path: str = "/ready", process=None) -> None:
    """Poll a server's `path` (/ready) until it answers 200 (a server process still loading its
    model); with `process` (a Popen), fail as soon as that process has exited."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {root_url}{path} answered")
        try:
            if httpx.get(f"{root_url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{root_url} not ready after {timeout} s")


def one(client, prompt: str, mix: dict | None, tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    extra = {"loramux": {"ignore_eos": True, **({"mix": mix} if mix else {})}}
    for chunk in client.completions.create(model="base", prompt=prompt, max_tokens=tokens, temperature=0,
                                           stream=True, extra_body=extra):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()  # the token count comes from `tokens` (ignore_eos)
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "tpot": (end - (first or end)) / max(1, tokens - 1), "seconds": end - t0}


def scenario(url: str, prompts: list[str], mixes: list, tokens: int, concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda i: one(client, prompts[i], mixes[i], tokens), range(len(prompts))))
    wall = time.perf_counter() - t0

    def pct(key, q):
        values = sorted(r[key] for r in runs)
        return values[min(len(values) - 1, int(q * len(values)))]
    return {"requests": len(runs), "concurrency": concurrency, "wall_seconds": round(wall, 2),
            "tokens_per_s": round(len(runs) * tokens / wall, 3),
            "ttft_p50": round(pct("ttft", 0.5), 3), "ttft_p99": round(pct("ttft", 0.99), 3),
            "tpot_p50": round(pct("tpot", 0.5), 4), "tpot_p99": round(pct("tpot", 0.99), 4),
            "seconds_p50": round(pct("seconds", 0.5), 3), "seconds_p99": round(pct("seconds", 0.99), 3)}
