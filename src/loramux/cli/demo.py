from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .options import DEVICE, DTYPE

DEMO_TASKS = "strategyqa,qa_wikidata,intent_recognition"


def demo(
    tasks: str = typer.Option(DEMO_TASKS, help="Comma-separated task names in --data-dir: one adapter each."),
    data_dir: Optional[str] = typer.Option(None, help="Directory of task dirs (default: $LORAMUX_HOME/data/bigbench)."),
    library: Optional[str] = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name or HF model directory."),
    steps: int = typer.Option(30, help="Training steps for each adapter the library lacks."),
    show: int = typer.Option(2, help="Test prompts sent per task."),
    seed: int = typer.Option(0, help="Which test prompts (a seeded sample)."),
    router_prompts: int = typer.Option(200, help="Training prompts per task for the DLP router."),
    score_limit: int = typer.Option(40, help="Test examples per task in the closing adapter-vs-base scores (0: skip)."),
    output: Optional[str] = typer.Option(None, help="Write every prompt's routing and answers as JSON here."),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """The main job: build or reuse a library (one adapter per task) and its DLP router, start the
    OpenAI-compatible server, send test prompts of different tasks with the `openai` client, and
    print which adapters each prompt was routed to and the answers (routed vs base model)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from ..cpu_threads import on_passing_thread
    from ..data import load_tasks
    from ..data.fetch import ensure_bigbench, missing_tasks
    from ..engine import Engine
    from ..errors import LoramuxError
    from ..evaluation import score_task
    from ..evaluation.scoring import answer_budget, exact_match
    from ..models import load_base
    from ..routers import load_router
    from ..routers.sentence import DlpTrainConfig, train_dlp
    from ..server import ServerConfig, create_app
    from ..server.background import serve_in_background
    from ..training import LoraTrainConfig, train_adapters
    from ..training.estimate import estimate_seconds
    from .common import open_library

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    lib = open_library(library, create=True)

    def prepare():
        """Steps 0-3, up to a built app: all the torch work before serving."""
        # 0. the tasks: a given --data-dir that holds them, else $LORAMUX_HOME/data (fetched when missing)
        #    A download waits on the network and the model's first load converts its GGUF on the CPU:
        #    the two overlap (on a fresh 2-core machine, ~45 s and ~40 s).
        given = Path(data_dir).expanduser() if data_dir else None
        with ThreadPoolExecutor(1) as pool:
            fetched = None if given and not missing_tasks(given, names) else pool.submit(ensure_bigbench, names,
                                                                                        log=typer.echo)
            base = load_base(model, device=device, dtype=dtype)
            root = fetched.result() if fetched else given

        # 1. the library: train only what it lacks, after saying how long that will take
        missing = [n for n in names if n not in lib]
        if missing:
            config = LoraTrainConfig(steps=steps, warmup_steps=min(LoraTrainConfig.warmup_steps, steps // 10),
                                     target_modules=("auto",))  # every projection, whatever the family calls them
            train = load_tasks(root, missing, "train")
            typer.echo(f"[loramux] training {len(train)} adapter(s), {steps} steps of {config.batch_size} examples each; "
                       f"timing one step of each first ...")
            guess = estimate_seconds(base, train, config)
            typer.echo("[loramux] estimate on this machine: " + ", ".join(f"{n} ~{s:.0f}s" for n, s in guess.items())
                       + f"; about {sum(guess.values()) / 60:.1f} min in all (one measured step of each; errs high)")
            train_adapters(base, train, lib, config, log=typer.echo)
        typer.echo(f"[loramux] library {lib.path}: {len(lib.names())} adapters ({', '.join(lib.names())})")

        # 2. the DLP router over every adapter of the library (trained again when the library changed)
        try:
            load_router(lib, "dlp", base=base)
            typer.echo("[loramux] reusing the stored DLP router")
        except LoramuxError as e:
            covered = sorted({t for spec in lib.list() for t in spec.tasks})
            config = DlpTrainConfig(max_per_task=router_prompts)
            typer.echo(f"[loramux] training the DLP router on up to {router_prompts} prompts per task ({e})")
            if not given:  # a library from earlier runs may cover tasks this run did not fetch
                ensure_bigbench(covered, root, log=typer.echo)
            train_dlp(lib, load_tasks(root, covered, "train"), config, log=typer.echo,
                      device=str(base.model.device)).save(lib, "dlp")

        test_tasks = load_tasks(root, names, "test")  # read once: the conversation and the closing scores

        # 3. the server, on loopback, in this process
        engine = Engine(base, lib)
        for name in lib.names():
            engine.load(name)
        return base, engine, test_tasks, create_app(engine, lib, ServerConfig())

    # on a thread that ends, so that the server's scheduler thread runs the process's only OpenMP
    # team (cpu_threads.py: a second one, left by loading and training here, halves the decode)
    base, engine, test_tasks, app = on_passing_thread(prepare, name="loramux-demo-build")
    server, thread, root_url = serve_in_background(app)
    url = f"{root_url}/v1"
    typer.echo(f"[loramux] serving on {url}; sending {show} test prompts per task with the openai client\n")

    # 4. prompts of different tasks through the OpenAI API: model "auto" routes with DLP
    client = openai.OpenAI(base_url=url, api_key="none")
    rng = random.Random(seed)
    records, routed_right, routed_ok, base_ok = [], 0, 0, 0
    try:
        for task in test_tasks:
            for ex in rng.sample(list(task.examples), min(show, len(task.examples))):
                messages = [{"role": "user", "content": ex.prompt.strip()}]
                budget = answer_budget(base.tokenizer, [ex])
                routed = client.chat.completions.create(model="auto", messages=messages, max_tokens=budget,
                                                        temperature=0, extra_body={"loramux": {"explain": True}})
                plain = client.chat.completions.create(model="base", messages=messages, max_tokens=budget, temperature=0)
                echo = routed.model_extra["loramux"]
                answer = (routed.choices[0].message.content or "").strip()
                base_answer = (plain.choices[0].message.content or "").strip()
                right = bool(echo.get("adapters")) and echo["adapters"][0] == task.name
                ok, b_ok = exact_match(answer, ex.targets), exact_match(base_answer, ex.targets)
                routed_right, routed_ok, base_ok = routed_right + right, routed_ok + ok, base_ok + b_ok
                mixture = ", ".join(f"{a} {w:.2f}" for a, w in zip(echo.get("adapters", []), echo.get("weights", [])))
                typer.echo("-" * 72)
                typer.echo(f"[{task.name}] ...{ex.prompt.strip()[-160:]}")
                typer.echo(f"  routing: {mixture or (echo.get('general') or 'base model') + ' (abstained)'}")
                typer.echo(f"  target:  {ex.targets[0]!r}")
                typer.echo(f"  routed:  {answer!r} {'ok' if ok else 'wrong'}")
                typer.echo(f"  base:    {base_answer!r} {'ok' if b_ok else 'wrong'}")
                records.append({"task": task.name, "prompt": ex.prompt, "targets": list(ex.targets), "routing": echo,
                                "routed_answer": answer, "base_answer": base_answer, "routed_ok": ok, "base_ok": b_ok})
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    n = len(records)
    typer.echo("=" * 72)
    typer.echo(f"{n} prompts: routed to their own task's adapter first {routed_right}/{n}; "
               f"exact answers routed {routed_ok}/{n} vs base model {base_ok}/{n}")

    # 5. each task's adapter against the base model on held-out examples, with the task's metric
    scores = {}
    if score_limit > 0:
        typer.echo(f"scores on the first {score_limit} test examples of each task (the task's own metric):")
        fused = engine.fused
        for task in test_tasks:
            plain = score_task(base.model, base.tokenizer, task, limit=score_limit, progress=False)
            with fused.mixture(fused.sequence_mixture([{task.name: 1.0}])):  # one row's mixture, shared by all
                adapted = score_task(base.model, base.tokenizer, task, limit=score_limit, progress=False)
            scores[task.name] = {"metric": plain.metric, "n": plain.n, "base": plain.score, "adapter": adapted.score}
            typer.echo(f"  {task.name:28s} {plain.metric:22s} adapter {adapted.score:.3f}  base {plain.score:.3f}"
                       f"  (n={plain.n})")
    if output:
        Path(output).write_text(json.dumps({"library": str(lib.path), "prompts": records, "scores": scores}, indent=2))
