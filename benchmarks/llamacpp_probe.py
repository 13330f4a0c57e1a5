"""Why llama-server's base rows in a first vs_llamacpp.py run decoded slower than its mixture rows.

In that first run of `vs_llamacpp.py` (since fixed; docs/serving_cpu.md), requests without a
`lora` field took 48 ms per generated token (f32) on a llama-server started with the library's
adapters (`--lora ... --lora-init-without-apply`), against 28 ms for requests that name a 3-adapter mixture: applying adapters cannot make a step cheaper, so
something else differs. This probe times one request at a time (greedy, --tokens new tokens,
llama-server's own per-reply `timings`, the request vs_llamacpp.py sends) in each of these cases, and writes
benchmarks/results/llamacpp_probe.json:

  loaded_no_field     adapters loaded, request without a `lora` field (vs_llamacpp's base rows)
  loaded_zero_scales  adapters loaded, `lora` naming every adapter at scale 0
  loaded_mixture      adapters loaded, a 3-adapter mixture (vs_llamacpp's mixed rows)
  loaded_no_field_2   the first case again, after the others (an order effect shows here)
  bare_no_field       a second llama-server started without adapters, request without `lora`

    python benchmarks/llamacpp_probe.py [--cache ~/.cache/loramux-bench] [--requests 6] [--tokens 64]

It reuses vs_llamacpp.py's build and conversions (same cache) and three random r=8 stand-in
adapters (the question is how the server treats adapters, not what they hold). The cases run in
rounds (each case once per round, in the order above) so that a slow spell of this shared
machine lands on all of them; each case reports its median request and keeps every request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from vs_llamacpp import RESULTS, SDIST, adapter_gguf, base_gguf, build_llama_server, ensure_stand_ins, stop

CASES = ("loaded_no_field", "loaded_zero_scales", "loaded_mixture", "loaded_no_field_2", "bare_no_field")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "loramux-bench"))
    ap.add_argument("--requests", type=int, default=6, help="rounds: each case gets this many requests")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--outtype", default="f32", help="the base's GGUF type (f32, q8_0)")
    ap.add_argument("--output", default=str(RESULTS / "llamacpp_probe.json"))
    args = ap.parse_args()

    import httpx

    from loramux import Library, load_base
    from loramux.bench.load import wait_ready
    from loramux.bench.machine import machine
    from loramux.models import DEFAULT_MODEL, converted_model_dir

    cache = Path(args.cache).expanduser()
    binary = build_llama_server(cache, 2)
    base = load_base()
    model_dir = converted_model_dir(DEFAULT_MODEL)
    stand_ins = Library(cache / "stand-ins", create=True)  # vs_llamacpp.py's, for library100
    names = ensure_stand_ins(stand_ins, base, "extra", 3, 1000)
    gguf = [adapter_gguf(cache, model_dir, a, stand_ins.adapter_dir(a)) for a in names]
    model = base_gguf(cache, model_dir, args.outtype)
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nQ: {}\nA:<|im_end|>\n<|im_start|>assistant\n")

    def server(port: int, adapters: list[Path]) -> subprocess.Popen:
        cmd = [str(binary), "-m", str(model), "--port", str(port), "--host", "127.0.0.1", "-t", str(args.threads),
               "-tb", str(args.threads), "-np", "16", "-c", str(16 * 2048), "--no-webui"]
        if adapters:
            cmd.append("--lora-init-without-apply")
        for a in adapters:
            cmd += ["--lora", str(a)]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = {"loaded": server(8433, gguf), "bare": server(8434, [])}
    urls = {"loaded": "http://127.0.0.1:8433", "bare": "http://127.0.0.1:8434"}
    times: dict[str, list[float]] = {c: [] for c in CASES}
    try:
        for name, proc in procs.items():
            wait_ready(urls[name], 600, path="/health", process=proc)
        ids = [a["id"] for a in httpx.get(f"{urls['loaded']}/lora-adapters", timeout=30).json()]
        lora = {"loaded_no_field": None, "loaded_zero_scales": [{"id": i, "scale": 0.0} for i in ids],
                "loaded_mixture": [{"id": i, "scale": w} for i, w in zip(ids, (0.5, 0.3, 0.2))],
                "loaded_no_field_2": None, "bare_no_field": None}
        for r in range(-1, args.requests):  # round -1: a warm-up, not kept
            for case in CASES:
                # the request vs_llamacpp.py sends (its prompt cache left on, as there), a new prompt each time
                body = {"model": "base", "prompt": prompt.format(f"Question {r} for {case}: name three uses of a brick."),
                        "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
                if lora[case] is not None:
                    body["lora"] = lora[case]
                url = urls["bare" if case.startswith("bare") else "loaded"]
                t = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()["timings"]
                if r >= 0:
                    times[case].append(round(t["predicted_ms"] / max(1, t["predicted_n"]), 2))
        # what each case computes: one prompt, greedy, in every case; and the scales the server reports
        # (a plain-text prompt that the model continues freely: a chat answer can be too settled to move)
        same = {"model": "base", "prompt": "The capital of France is", "max_tokens": 48, "temperature": 0,
                "ignore_eos": True}
        texts = {}
        for case in CASES:
            body = {**same, **({"lora": lora[case]} if lora[case] is not None else {})}
            url = urls["bare" if case.startswith("bare") else "loaded"]
            texts[case] = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()["choices"][0]["text"]
        scales = {a["id"]: a["scale"] for a in httpx.get(f"{urls['loaded']}/lora-adapters", timeout=30).json()}
    finally:
        for proc in procs.values():
            stop(proc)
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "llama_cpp": f"llama-server from the {SDIST[0]} {SDIST[1]} sdist's vendored source",
              "base": args.outtype, "threads": args.threads, "tokens": args.tokens,
              "measures": "llama-server's own timings (predicted_ms / predicted_n), one request at a time",
              "ms_per_output_token": {c: statistics.median(v) for c, v in times.items()},
              "same_text_as_bare": {c: texts[c] == texts["bare_no_field"] for c in CASES},
              "texts": texts, "startup_scales_reported": scales,
              "all_requests": times}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ms_per_output_token", "same_text_as_bare")}, indent=1))


if __name__ == "__main__":
    main()
