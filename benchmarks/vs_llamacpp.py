"""loramux serve next to llama.cpp's llama-server: the same weights, the same HTTP workload, one
server at a time, on this machine. Writes benchmarks/results/vs_llamacpp.json.

    python benchmarks/vs_llamacpp.py [--data-dir ../shared/data/bigbench] [--cache ~/.cache/loramux-bench]
        [--tokens 64] [--threads 2] [--quantize int8] [--rows sequential_base,...] [--rounds 3]
        [--library PATH | --stand-ins 14]

`--stand-ins K` serves K random r=8 adapters with the library's shapes in place of a trained
library: what these rows time does not depend on the adapters' values, and a bare machine then
needs no hour of training first (the agreement check below still compares both servers' texts).

What it builds, all cached outside the repository (--cache), each step skipped when its output is
there:
- llama.cpp from the source vendored in the llama-cpp-python 0.3.36 sdist (`pip download`), its
  `llama-server` target only, with cmake (Release, native CPU flags, no curl);
- the base model as GGUF with llama.cpp's own `convert_hf_to_gguf.py` from the safetensors loramux
  serves (f32, and q8_0 for the quantized rows), and the library's adapters (plus random stand-ins
  up to 100) with its `convert_lora_to_gguf.py`, in f32.

The workload, identical for both servers: POST /v1/completions, greedy, exactly --tokens new
tokens (end of sequence ignored), prompts from the shared tasks' test sets rendered with the
model's chat template (loramux's /v1/completions applies it; llama-server gets the rendered text,
so both prefill the same tokens: the usage's prompt_tokens are compared and reported). Mixtures
go in llama.cpp's per-request `lora` field, which loramux accepts too, by each server's own ids
(GET /lora-adapters); a base request names every adapter at scale 0 to llama-server, which
serves a request without a `lora` field with every loaded adapter at scale 1.0, even when started
with --lora-init-without-apply (benchmarks/llamacpp_probe.py). Each row reports how often both
servers' greedy completions agree (`agreement`), which shows they ran the same model. Rows:
  sequential_base, sequential_mixed (a 3-adapter mixture per request), concurrent16_base,
  concurrent16_distinct (16 clients, 16 distinct 3-adapter mixtures), library100_distinct (the
  same with 100 adapters loaded), prefill_heavy (prompts of about --long-prompt tokens, 8 new
  tokens, 4 clients);
each again with a quantized base (`quantized_` prefix) when --quantize is given: loramux's
`--quantize` against llama.cpp's nearest bit width (int8 and w8a8 -> q8_0; loramux offers no 4-bit
base), and only those with --quantized-only.
Tokens/s count generated tokens (prefill_heavy: prompt + generated) over the row's wall time.
Both servers run at once, each idle while the other is measured, and every row runs --rounds
times, alternating which server goes first, so that a slow spell of this shared machine lands on
both; a row reports its median round and keeps every round's figure. Every row and round has
its own prompts, so nothing is answered from the prompt cache another row or round filled
(both servers still reuse the chat template's shared system preamble, about 20 tokens, and any
longer shared start: llama-server's default `cache_prompt`, loramux's prefix cache
(`--prefix-cache-tokens`); `mean_prompt_tokens_computed` shows it for each), and a warm-up
at its own concurrency first. Each row also records where its time went by the server's own clock
(`split`): llama-server's per-reply `timings` (prefill ms, which excludes queueing, and ms per
generated token) and loramux's /metrics (time to first token, which includes queueing and
prefill, and time per later token). The per-token decode times compare directly; the first-token
times do so only for rows of one request at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROUND_PROMPTS = 600  # test prompts each round takes (its rows, its long prompts), disjoint from other rounds
SDIST = ("llama-cpp-python", "0.3.36")
# loramux --quantize -> llama.cpp type; q8_0's matmuls round activations to 8 bits too (per 32
# values), as w8a8 does per row
NEAREST = {"int8": "q8_0", "w8a8": "q8_0"}
ROWS = ("sequential_base", "sequential_mixed", "concurrent16_base", "concurrent16_distinct", "library100_distinct",
        "prefill_heavy")


def log(msg: str) -> None:
    print(f"[vs_llamacpp] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> None:
    log(" ".join(map(str, cmd)))
    subprocess.run(cmd, check=True, **kw)


def llama_source(cache: Path) -> Path:
    name, version = SDIST
    src = cache / f"{name.replace('-', '_')}-{version}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        # --no-binary for this package only: with ":all:" pip also builds each of its build
        # dependencies from source to read its metadata (CMake among them), which on a bare machine
        # ran for many minutes before the sdist was saved
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name, f"{name}=={version}",
             "-d", str(cache)])
        with tarfile.open(next(cache.glob(f"{name.replace('-', '_')}-{version}.tar.gz"))) as tar:
            tar.extractall(cache, filter="data")
    return src


def build_llama_server(cache: Path, jobs: int) -> Path:
    """llama-server built once into the cache (about 25 minutes on 2 cores); resumable."""
    build = cache / "llama.cpp-build"
    binary = build / "bin" / "llama-server"
    if not binary.is_file():
        src = llama_source(cache)
        run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON"])
        run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)])
    return binary


def _convert_env(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def base_gguf(cache: Path, model_dir: Path, outtype: str) -> Path:
    """The served base model as GGUF, converted by llama.cpp's own script."""
    out = cache / "gguf" / f"base-{outtype}.gguf"
    if not out.is_file():
        src = llama_source(cache)
        try:  # the converter reads the tokenizer with it
            import sentencepiece  # noqa: F401
        except ImportError:
            run([sys.executable, "-m", "pip", "install", "sentencepiece"])
        out.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
             "--outfile", str(out)], env=_convert_env(src))
    return out


def adapter_gguf(cache: Path, model_dir: Path, name: str, peft_dir: Path) -> Path:
    out = cache / "gguf" / "lora" / f"{name}.gguf"
    if not out.is_file():
        src = llama_source(cache)
        out.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, str(src / "convert_lora_to_gguf.py"), str(peft_dir), "--base", str(model_dir),
             "--outtype", "f32", "--outfile", str(out)], env=_convert_env(src))
    return out


def ensure_stand_ins(lib, base, prefix: str, count: int, seed: int) -> list[str]:
    """`count` random r=8 adapters named prefix00.. (seeds seed, seed+1, ..) in `lib`, made once."""
    from loramux.bench.speed import random_adapter

    names = [f"{prefix}{i:02d}" for i in range(count)]
    for i, name in enumerate(names):
        if name not in lib:
            lib.add(name, random_adapter(base, 8, seed + i), base=base, tasks=())
    return names


def loramux_version() -> str:
    """The package version and, in a git checkout, its commit (with "+changes" when the tree differs)."""
    import loramux

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return loramux.__version__
    return f"{loramux.__version__} (git {sha}{'+changes' if dirty else ''})"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def adapter_ids(url: str) -> dict[str, int]:
    """Adapter name -> the server's id for the per-request `lora` field."""
    import httpx

    out = {}
    for a in httpx.get(f"{url}/lora-adapters", timeout=30).json():
        out[a.get("name") or Path(a["path"]).stem] = a["id"]
    return out


def workload(url: str, ids: dict[str, int], prompts: list[str], mixes: list, tokens: int, concurrency: int,
             ignore_eos: dict, zero_lora: bool = False) -> dict:
    """`zero_lora`: a request without a mixture names every adapter at scale 0 (llama-server: a
    request without a `lora` field runs with every adapter loaded at its startup scale, 1.0 even
    under --lora-init-without-apply; benchmarks/results/llamacpp_probe.json)."""
    import httpx

    def one(i: int) -> dict:
        body = {"model": "base", "prompt": prompts[i], "max_tokens": tokens, "temperature": 0, **ignore_eos}
        if mixes[i]:
            body["lora"] = [{"id": ids[a], "scale": w} for a, w in mixes[i].items()]
        elif zero_lora and ids:
            body["lora"] = [{"id": j, "scale": 0.0} for j in ids.values()]
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=3600)
        r.raise_for_status()
        return r.json()

    before = server_split(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - started
    out_tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    in_tokens = sum(r["usage"]["prompt_tokens"] for r in replies)
    return {"requests": len(prompts), "concurrency": concurrency, "wall_seconds": round(wall, 2),
            "texts": [r["choices"][0]["text"] for r in replies],
            "completion_tokens": out_tokens, "prompt_tokens": in_tokens,
            "tokens_per_s": round(out_tokens / wall, 3), "all_tokens_per_s": round((in_tokens + out_tokens) / wall, 3),
            "split": split_of(replies, before, server_split(url))}


def server_split(url: str) -> dict[str, float]:
    """loramux's own counters (GET /metrics): time-to-first-token and time-per-output-token sums and
    counts. Empty for llama-server, which reports its timings in each reply instead."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    wanted = {f"loramux_{m}_seconds_{s}" for m in ("time_to_first_token", "time_per_output_token")
              for s in ("sum", "count")} | {"loramux_prompt_tokens_total", "loramux_prompt_tokens_reused_total"}
    fields = (line.split() for line in text.splitlines() if line and not line.startswith("#"))
    return {f[0]: float(f[1]) for f in fields if len(f) >= 2 and f[0] in wanted}


def split_of(replies: list[dict], before: dict, after: dict) -> dict:
    """Where a row's time went, by each server's own clock. llama-server: mean prompt (prefill) ms
    and mean ms per generated token, from every reply's `timings`. loramux: mean time to first token
    (queueing + prefill + the first token) and mean time per later token, from /metrics."""
    keys = ("prompt_ms", "prompt_n", "predicted_ms", "predicted_n")
    timings = [r["timings"] for r in replies if all(k in r.get("timings", {}) for k in keys)]
    if timings:
        n = len(timings)
        return {"clock": "llama-server timings", "mean_prompt_ms": round(sum(t["prompt_ms"] for t in timings) / n, 1),
                "mean_prompt_tokens_computed": round(sum(t["prompt_n"] for t in timings) / n, 1),
                "ms_per_output_token": round(sum(t["predicted_ms"] for t in timings)
                                             / max(1, sum(t["predicted_n"] for t in timings)), 2)}
    if after and before:
        def delta(m: str) -> float:
            return after.get(f"loramux_{m}_seconds_sum", 0) - before.get(f"loramux_{m}_seconds_sum", 0)

        def count(m: str) -> float:
            return max(1.0, after.get(f"loramux_{m}_seconds_count", 0) - before.get(f"loramux_{m}_seconds_count", 0))
        def tokens(m: str) -> float:
            return after.get(f"loramux_{m}_total", 0) - before.get(f"loramux_{m}_total", 0)
        n = count("time_to_first_token")
        return {"clock": "loramux /metrics",
                "mean_prompt_tokens_computed": round((tokens("prompt_tokens") - tokens("prompt_tokens_reused")) / n, 1),
                "mean_time_to_first_token_ms": round(1000 * delta("time_to_first_token") / n, 1),
                "ms_per_output_token": round(1000 * delta("time_per_output_token") / count("time_per_output_token"), 2)}
    return {}


def plan(rows: list[str], prompts: list[str], long_prompts: list[str], names: list[str], extra: list[str],
         tokens: int, rng: random.Random) -> dict:
    """Row -> (prompts, mixtures, new tokens, concurrency, adapters it needs loaded)."""
    def mixes(n: int, pool: list[str]) -> list[dict]:
        return [dict(zip(rng.sample(pool, 3), (0.5, 0.3, 0.2))) for _ in range(n)]

    # every row its own prompts, so that no server answers a row from the prompt cache of another
    table = {"sequential_base": (prompts[0:8], [None] * 8, tokens, 1, names),
             "sequential_mixed": (prompts[8:16], mixes(8, names), tokens, 1, names),
             "concurrent16_base": (prompts[16:48], [None] * 32, tokens, 16, names),
             "concurrent16_distinct": (prompts[48:80], mixes(16, names) * 2, tokens, 16, names),
             "library100_distinct": (prompts[80:112], mixes(16, names + extra) * 2, tokens, 16, names + extra),
             "prefill_heavy": (long_prompts, [None] * len(long_prompts), 8, 4, names)}
    return {r: table[r] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"))
    ap.add_argument("--library", default=None, help="default: $LORAMUX_HOME/library")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "loramux-bench"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel jobs for the llama.cpp build")
    ap.add_argument("--quantize", default=None, choices=sorted(NEAREST), help="also the quantized rows")
    ap.add_argument("--quantized-only", action="store_true", help="with --quantize: only the quantized rows")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--stand-ins", type=int, default=0, metavar="K",
                    help="serve K random r=8 adapters of the library's shapes instead of a trained library (speed "
                         "does not depend on the adapters' values; a bare machine then trains nothing); prompts "
                         "then come from every task under --data-dir")
    ap.add_argument("--max-batch", type=int, default=16,
                    help="loramux serve --max-batch (with --compile its warm-up compiles every power of two up to "
                         "it; rows of one request at a time use a batch of 1 whatever it is)")
    ap.add_argument("--long-prompt", type=int, default=1024, help="prefill_heavy: prompt tokens, about")
    ap.add_argument("--rounds", type=int, default=3, help="times each row runs on each server (median reported)")
    ap.add_argument("--build-only", action="store_true", help="build and convert, then stop")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="serve loramux with its eager decode (default: --compile, warmed up before /ready)")
    ap.add_argument("--output", default=str(RESULTS / "vs_llamacpp.json"))
    args = ap.parse_args()

    from loramux import Library, load_base, load_tasks
    from loramux._home import default_library_path
    from loramux.bench.load import wait_ready
    from loramux.bench.machine import machine
    from loramux.data import PromptFormatter
    from loramux.models import DEFAULT_MODEL, converted_model_dir

    rows = [r for r in args.rows.split(",") if r]
    if set(rows) - set(ROWS):
        raise SystemExit(f"--rows {sorted(set(rows) - set(ROWS))}: unknown; choose from {', '.join(ROWS)}")
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    binary = build_llama_server(cache, args.jobs)
    base = load_base()
    model_dir = converted_model_dir(DEFAULT_MODEL)
    if args.stand_ins:
        lib = Library(cache / f"stand-ins-{args.stand_ins}", create=True)
        ensure_stand_ins(lib, base, "standin", args.stand_ins, 2000)
    else:
        lib = Library(args.library or default_library_path())
    names = lib.names()
    stand_ins = Library(cache / "stand-ins", create=True)  # random r=8 adapters up to 100, for library100
    # each conversion takes seconds: only when the row runs
    extra = ensure_stand_ins(stand_ins, base, "extra", 100 - len(names), 1000) if "library100_distinct" in rows else []
    if args.quantized_only and not args.quantize:
        raise SystemExit("--quantized-only needs --quantize")
    precisions = [] if args.quantized_only else [("fp32", [], "f32")]
    if args.quantize:
        precisions.append((args.quantize, ["--quantize", args.quantize], NEAREST[args.quantize]))
    gguf = {a: adapter_gguf(cache, model_dir, a, lib.adapter_dir(a)) for a in names}
    gguf |= {a: adapter_gguf(cache, model_dir, a, stand_ins.adapter_dir(a)) for a in extra}
    bases = {p: base_gguf(cache, model_dir, outtype) for p, _, outtype in precisions}
    if args.build_only:
        log(f"built {binary}; {len(gguf)} adapters and {sorted(bases)} bases converted")
        return

    fmt = PromptFormatter(base.tokenizer)
    task_names = sorted(t for s in lib.list() for t in s.tasks) or sorted(
        p.name for p in Path(args.data_dir).iterdir() if (p / "test.json").is_file())
    tasks = load_tasks(args.data_dir, task_names, "test")
    rng = random.Random(0)
    pool = [fmt.prompt_text(e.prompt) for t in tasks for e in t.examples]
    rng.shuffle(pool)
    if len(pool) < args.rounds * ROUND_PROMPTS + 16:
        raise SystemExit(f"--rounds {args.rounds} needs {args.rounds * ROUND_PROMPTS + 16} test prompts; the library's "
                         f"tasks have {len(pool)}")
    def long_prompts(part: list[str]) -> list[str]:
        out = []
        for k in range(8):  # test prompts joined until about --long-prompt tokens
            text, n = "", 0
            for p in part[200 + 40 * k:]:  # after the other rows' prompts
                text, n = text + p, n + len(base.tokenizer(p)["input_ids"])
                if n >= args.long_prompt:
                    break
            out.append(text)
        return out

    # every round its own prompts and mixtures (no server answers a round from its prompt cache);
    # within a round both servers get the same ones
    rounds = [plan(rows, pool[r * ROUND_PROMPTS:], long_prompts(pool[r * ROUND_PROMPTS:]), names, extra, args.tokens,
                   random.Random(r)) for r in range(args.rounds)]
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "llama_cpp": f"llama-server from the {SDIST[0]} {SDIST[1]} sdist's vendored source",
              "loramux": loramux_version(),
              "threads": args.threads, "tokens": args.tokens, "loramux_compile": args.compile,
              "loramux_max_batch": args.max_batch, "rounds": args.rounds,
              "loramux_ready_seconds": {},  # start to /ready per server process: a cold compile only on a cold cache
              "adapters": (f"{args.stand_ins} random r=8 stand-ins" if args.stand_ins else f"the library at {lib.path}"),
              "how": "both servers up at once, each idle while the other runs; every row runs --rounds times, "
                     "alternating which server goes first; a row's figures are its median round's",
              "rows": {}, "ratios": {}, "complete": False}
    for precision, loramux_flags, outtype in precisions:
        prefix = "" if precision == "fp32" else "quantized_"
        for library_size in ("library", "library100"):
            todo = [r for r in rows if (r == "library100_distinct") == (library_size == "library100")]
            if not todo:
                continue
            loaded = names + (extra if library_size == "library100" else [])
            servers: dict[str, dict] = {}
            try:
                cmd = [str(binary), "-m", str(bases[precision]), "--port", "8432", "--host", "127.0.0.1",
                       "-t", str(args.threads), "-tb", str(args.threads), "-np", "16", "-c", str(16 * 2048),
                       "--lora-init-without-apply", "--no-webui"]
                for a in loaded:
                    cmd += ["--lora", str(gguf[a])]
                servers["llama.cpp"] = {"proc": subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                                        "url": "http://127.0.0.1:8432", "ready": "/health", "eos": {"ignore_eos": True}, "zero_lora": True,
                                        "precision": outtype}
                serve_lib = lib.path
                if library_size == "library100":  # the library plus the stand-ins, in a side library
                    serve_lib = cache / f"library100-{lib.path.name}"  # exactly `loaded`, per source library
                    side = Library(serve_lib, create=True)
                    for src, group in ((lib, names), (stand_ins, extra)):
                        for a in group:
                            if a not in side:
                                side.add(a, src.adapter_dir(a), base=base, tasks=src.get(a).tasks)
                cmd = [sys.executable, "-m", "loramux", "serve", "--library", str(serve_lib), "--port", "8431",
                       "--max-batch", str(args.max_batch), *loramux_flags, *(["--compile"] if args.compile else [])]
                started = time.perf_counter()
                servers["loramux"] = {"proc": subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                               env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}),
                                      "started": started,
                                      "url": "http://127.0.0.1:8431", "ready": "/ready",
                                      "eos": {"loramux": {"ignore_eos": True}}, "zero_lora": False,
                                      "precision": precision}
                for name, sv in servers.items():
                    wait_ready(sv["url"], 3600, path=sv["ready"], process=sv["proc"])  # a first compile takes minutes
                    if name == "loramux":  # load, quantize, and compile (or load from Inductor's disk cache)
                        result["loramux_ready_seconds"][f"{precision}/{library_size}"] = round(
                            time.perf_counter() - sv["started"], 1)
                    sv["ids"] = adapter_ids(sv["url"])
                for row in todo:
                    runs: dict[str, list[dict]] = {name: [] for name in servers}
                    for r, work in enumerate(rounds):
                        prompts, mixes, tokens, concurrency, _ = work[row]
                        for name in (("loramux", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "loramux")):
                            sv = servers[name]
                            if r == 0:  # warm-up at the row's concurrency, on prompts no row uses
                                workload(sv["url"], sv["ids"], pool[-concurrency:], mixes[:concurrency], 4, concurrency,
                                         sv["eos"], sv["zero_lora"])
                            runs[name].append(workload(sv["url"], sv["ids"], prompts, mixes, tokens, concurrency,
                                                       sv["eos"], sv["zero_lora"]))
                    key = "all_tokens_per_s" if row == "prefill_heavy" else "tokens_per_s"
                    # the same greedy text from both servers says they ran the same model and mixture
                    # (fp32 rounding differs between them, so a long completion may part late)
                    pairs = [(a, b) for x, y in zip(runs["loramux"], runs["llama.cpp"])
                             for a, b in zip(x["texts"], y["texts"])]
                    agree = {"same_text": round(sum(a == b for a, b in pairs) / max(1, len(pairs)), 3),
                             "same_first_8_chars": round(sum(a[:8] == b[:8] for a, b in pairs) / max(1, len(pairs)), 3)}
                    for got in runs.values():
                        for x in got:
                            x.pop("texts")
                    result["rows"].setdefault(prefix + row, {})["agreement"] = agree
                    for name, got in runs.items():
                        median = sorted(got, key=lambda x: x[key])[(len(got) - 1) // 2]
                        result["rows"].setdefault(prefix + row, {})[name] = {
                            **median, "rounds_" + key: [x[key] for x in got],
                            "rounds_prompt_tokens": [x["prompt_tokens"] for x in got],
                            "precision": servers[name]["precision"]}
                        log(f"{prefix}{row} {name}: {[x[key] for x in got]} {key} (median {median[key]})")
                    save(result, args.output)  # row by row: a run cut short keeps what it measured
            finally:
                for sv in servers.values():
                    stop(sv["proc"])
    result["complete"] = True
    save(result, args.output)
    print(json.dumps(result["ratios"], indent=1))


def save(result: dict, output: str) -> None:
    """Write the rows so far, with the ratio of every row both servers have run."""
    for row, by in result["rows"].items():
        if {"loramux", "llama.cpp"} <= set(by):
            key = "all_tokens_per_s" if row.endswith("prefill_heavy") else "tokens_per_s"
            result["ratios"][row] = round(by["loramux"][key] / by["llama.cpp"][key], 3)
            by["same_prompt_tokens"] = by["loramux"]["rounds_prompt_tokens"] == by["llama.cpp"]["rounds_prompt_tokens"]
    Path(output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
