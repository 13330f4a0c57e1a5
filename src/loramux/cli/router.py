"""`loramux router train` and `loramux route`: train a router into the library, ask it about a prompt."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .options import DEVICE, DTYPE, NO_ABSTAIN
from ..routers.sentence.train import DlpTrainConfig
from ..routers.gating.train import MoleTrainConfig

app = typer.Typer(help="Routers that choose adapters per prompt (DLP-LoRA).", no_args_is_help=True)
LIBRARY = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library).")
_D = DlpTrainConfig()
_M = MoleTrainConfig()


def _parse_hidden(hidden: str) -> tuple[int, ...]:
    from ..errors import LoramuxError

    try:
        return tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        raise LoramuxError(f"--hidden {hidden!r} must be comma-separated integers, e.g. 2048,2048 ('' for none)") from None


@app.command("train")
def train(
    method: str = typer.Option("dlp", help="dlp (sentence classifier) or mole (gates over frozen LoRAs)."),
    library: Optional[str] = LIBRARY,
    data: Optional[str] = typer.Option(None, "--data", help="Dir of task dirs holding each adapter's tasks."),
    name: Optional[str] = typer.Option(None, help="Name to store the router under (default: the method)."),
    lr: Optional[float] = typer.Option(None, help=f"AdamW learning rate (dlp: {_D.lr}, mole: {_M.lr})."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per step (dlp: 64 prompts, mole: 8)."),
    seed: int = typer.Option(0, help="Random seed."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model (mole, and dlp with --encoder base)."),
    encoder: str = typer.Option(_D.encoder, help="dlp: minilm | base | base:LAYER | path to an HF encoder dir."),
    hidden: str = typer.Option(",".join(map(str, _D.hidden)), help="dlp: MLP hidden sizes ('' = linear probe)."),
    dropout: float = typer.Option(_D.dropout, help="dlp: dropout in the head."),
    max_epochs: int = typer.Option(_D.max_epochs, help="dlp: epoch limit."),
    patience: int = typer.Option(_D.patience, help="dlp: early stopping, epochs without a better validation loss."),
    val_fraction: float = typer.Option(_D.val_fraction, help="dlp: held-out share of each task's prompts."),
    max_per_task: Optional[int] = typer.Option(_D.max_per_task, help="dlp: cap on training prompts per task."),
    formats: str = typer.Option(",".join(_D.formats), help="dlp: formats each prompt is embedded in "
                                                           "(own, raw, stripped, qa, instruction, chat)."),
    abstain_recall: float = typer.Option(_D.abstain_recall, help="dlp: share of in-library validation prompts the "
                                                                 "out-of-library threshold keeps."),
    no_abstain: bool = typer.Option(False, "--no-abstain", help="dlp: store no out-of-library threshold."),
    warm_start: bool = typer.Option(True, help="dlp: when adapters were added since the stored router, start from "
                                               "its head (only new prompts are encoded)."),
    top_p: float = typer.Option(0.6, help="dlp: default selection threshold stored with the router."),
    granularity: str = typer.Option("layer", help="mole: layer | block | network."),
    balance_alpha: float = typer.Option(0.5, help="mole: weight of the balance loss (0 = off)."),
    route_alpha: float = typer.Option(_M.route_alpha, help="mole: weight of the routing term, which asks every "
                                                          "gate for the adapter trained on the example's task "
                                                          "(0 = off: the paper's objective)."),
    route_init_per_task: int = typer.Option(_M.route_init_per_task, help="mole: prompts per task each gate is "
                                                                        "first fitted to route to the task's adapter, "
                                                                        "before training (0 = off: start uniform, "
                                                                        "as the paper does)."),
    route_init_formats: str = typer.Option(",".join(_M.route_init_formats), help="mole: the formats each of those "
                                           "prompts is fitted in, comma-separated, of own, raw, stripped, qa, "
                                           "instruction, chat (own alone: the task's template)."),
    balance_over: str = typer.Option(_M.balance_over, help="mole: units (each gate balanced over the prompts it "
                                                           "sees) or pooled (one balance over all gates: the paper's)."),
    steps: int = typer.Option(_M.steps, help="mole: optimizer steps at most (training stops earlier when the "
                                              "validation loss flattens)."),
    gate_input: str = typer.Option(_M.gate_input, help="mole: what a gate reads: outputs (the adapters' outputs, "
                                                       "the paper's gating) or input (the hidden state)."),
    val_per_task: int = typer.Option(_M.val_per_task, help="mole: examples per task held out for the validation "
                                                           "curve (0: none, run every step)."),
    sharpen_grid: Optional[str] = typer.Option(None, help="mole: after training, choose a factor on the gate "
                                                          "logits from these (e.g. 1,1.5,2,3,4) by the held-out "
                                                          "validation loss, stored with the gates; with "
                                                          "--route-init-per-task, the routing start is weighed too "
                                                          "and kept if it is better sharpened."),
    device: str = DEVICE,  # mole: the base model; dlp: the sentence encoder (or the base with --encoder base)
    dtype: str = DTYPE,
) -> None:
    """Train a router on the library's tasks and store it in the library beside the adapters."""
    from ..data import load_tasks
    from ..errors import LoramuxError
    from .common import default_data_dir, open_library

    if method not in ("dlp", "mole"):
        hint = " (arrow needs no training: use it directly with --router arrow)" if method == "arrow" else ""
        raise LoramuxError(f"cannot train router method {method!r}; trainable: ['dlp', 'mole']{hint}")
    lib = open_library(library)
    wanted = sorted({t for spec in lib.routable_specs() for t in spec.tasks})
    tasks = load_tasks(data or default_data_dir(), wanted, "train") if wanted else []
    if method == "mole":
        from ..fusion import FusedModel
        from ..models import load_base
        from ..routers.gating import MoleTrainConfig, task_owners, train_mole

        config = MoleTrainConfig(granularity=granularity, gate_input=gate_input, balance_alpha=balance_alpha,
                                 balance_over=balance_over, route_alpha=route_alpha,
                                 route_init_per_task=route_init_per_task,
                                 route_init_formats=tuple(_names(route_init_formats) or ()),
                                 lr=lr or _M.lr,
                                 steps=steps, batch_size=batch_size or _M.batch_size, seed=seed,
                                 val_per_task=val_per_task)
        fused = FusedModel(load_base(model, device=device, dtype=dtype))
        for adapter in lib.routable():  # the gates weigh these; the general adapter is never gated
            fused.load(lib, adapter)
        grid = None
        if sharpen_grid:
            try:
                grid = tuple(float(g) for g in sharpen_grid.split(","))
            except ValueError:
                raise LoramuxError(f"--sharpen-grid {sharpen_grid!r} must be comma-separated numbers, e.g. "
                                   f"1,1.5,2,3,4") from None
        router = train_mole(fused, tasks, config, log=typer.echo, owners=task_owners(lib))
        if grid:
            from ..routers.gating import calibrate_sharpen

            calibrate_sharpen(router, tasks, grid, log=typer.echo)
    else:
        from ..routers.sentence import DlpConfig, train_dlp

        config = DlpTrainConfig(encoder=encoder, hidden=_parse_hidden(hidden), dropout=dropout, lr=lr or _D.lr,
                                batch_size=batch_size or _D.batch_size, max_epochs=max_epochs, patience=patience,
                                val_fraction=val_fraction, max_per_task=max_per_task, seed=seed,
                                formats=tuple(_names(formats) or ()), abstain_recall=None if no_abstain else abstain_recall)
        from ..models import resolve_device

        base = None
        if encoder == "base" or encoder.startswith("base:"):
            from ..models import load_base

            base = load_base(model, device=device, dtype=dtype)
        previous = None
        stored = _stored_meta(lib, name or method)
        if warm_start and stored is not None:
            from ..routers.sentence import DlpRouter

            # only for a grown library (the same adapters and more) and the same encoder: any other
            # retrain (new formats, seed, a replaced adapter) starts from scratch with full patience
            grown = set(stored.get("adapters", ())) < set(lib.routable()) and stored.get("encoder") == encoder
            if grown:
                try:  # the stored router, though adapters were added since: its head is a starting point
                    previous = DlpRouter.load(lib, name or method, base=base, device=resolve_device(device),
                                              adapters_may_differ=True)
                except LoramuxError as e:
                    typer.echo(f"router: not warm-starting ({e})", err=True)
        router = train_dlp(lib, tasks, config, base=base, selection=DlpConfig(top_p=top_p), log=typer.echo,
                           device=resolve_device(device), previous=previous)
    path = router.save(lib, name or method)
    typer.echo(f"router {name or method!r} saved to {path}")


def _selection(top_p, top_k, weighting, min_confidence, max_distance, abstain=None) -> dict:
    out = {"top_p": top_p, "top_k": top_k, "weighting": weighting, "min_confidence": min_confidence, "abstain": abstain}
    if max_distance is not None:
        out["max_distance"] = max_distance if max_distance == "auto" else float(max_distance)
    return {k: v for k, v in out.items() if v is not None}


def build_router(lib, method: str, *, name: str | None = None, model: str = DEFAULT_MODEL, base=None, fused=None,
                 where: tuple[str, str] = ("cpu", "float32"),
                 top_p=None, top_k=None, weighting=None, min_confidence=None, max_distance=None, abstain=None,
                 temperature=None, candidates: str | None = None, mask: list[str] | None = None,
                 gks: bool = False, general: str | None = None):
    """The router the CLI options describe. Arrow runs inside a fused model (built here unless
    given) with every library adapter, or only --candidates (and --general), loaded."""
    from ..errors import LoramuxError
    from ..routers import METHODS, load_router

    if method not in METHODS:
        raise LoramuxError(f"unknown router method {method!r}; available: {list(METHODS)}")
    if mask and method != "mole":
        raise LoramuxError("--mask is a MoLE option (--router mole)")
    if (gks or general) and method != "arrow":
        raise LoramuxError("--gks and --general are Arrow options (--router arrow)")
    if method == "arrow":
        from ..fusion import FusedModel
        from ..models import load_base

        if any(v is not None for v in (top_p, weighting, min_confidence, max_distance)):
            raise LoramuxError("--top-p, --weighting, --min-confidence and --max-distance are DLP options; Arrow "
                               "takes --top-k, --temperature, --candidates, --gks, --general and --no-abstain")
        fused = fused or FusedModel(base or load_base(model, device=where[0], dtype=where[1]))
        general_names = _names(general) or []
        names = _names(candidates) or [n for n in lib.routable() if n not in general_names]
        for n in [*names, *general_names]:
            if n not in fused.adapters:
                fused.load(lib, n)
        opts = {k: v for k, v in (("top_k", top_k), ("temperature", temperature)) if v is not None}
        if candidates:
            opts["candidates"] = tuple(names)
        return load_router(lib, "arrow", fused=fused, gks=bool(gks or general_names), general=tuple(general_names),
                           **opts)
    if method == "mole":
        from ..fusion import FusedModel
        from ..models import load_base

        if any(v is not None for v in (top_p, top_k, weighting, min_confidence, max_distance, temperature,
                                       candidates)):
            raise LoramuxError("MoLE's trained gates take only --name, --mask and --no-abstain")
        fused = fused or FusedModel(base or load_base(model, device=where[0], dtype=where[1]))
        return load_router(lib, "mole", name=name, fused=fused, mask=tuple(mask or ()))
    if temperature is not None or candidates is not None:
        raise LoramuxError("--temperature and --candidates are Arrow options")
    return load_router(lib, method, name=name, base=base or _base_if_needed(lib, method, name, model, where),
                       **_selection(top_p, top_k, weighting, min_confidence, max_distance, abstain))


def route(
    prompt: str = typer.Argument(..., help="The prompt to route."),
    library: Optional[str] = LIBRARY,
    router: str = typer.Option("dlp", help="Router: dlp (trained, per prompt), arrow (zero-shot, per token) or mole "
                                            "(trained gates per layer/block)."),
    name: Optional[str] = typer.Option(None, help="Stored router name (default: the method)."),
    top_p: Optional[float] = typer.Option(None, help="Override the stored top-p."),
    top_k: Optional[int] = typer.Option(None, help="DLP: cap on adapters fused; Arrow: adapters per token (4)."),
    temperature: Optional[float] = typer.Option(None, help="Arrow: softmax temperature T (1.0)."),
    candidates: Optional[str] = typer.Option(None, help="Arrow: route only between these adapters (a,b,...)."),
    gks: bool = typer.Option(False, "--gks", help="Arrow: subtract general knowledge (the routed adapters' mean "
                                                  "delta, or --general's) from every adapter (GenKnowSub)."),
    general: Optional[str] = typer.Option(None, help="Arrow: the general adapters to subtract (a,b,...); implies "
                                                     "--gks."),
    mask: Optional[str] = typer.Option(None, help="MoLE: switch these adapters off (a,b,...); the rest renormalise."),
    plot: Optional[str] = typer.Option(None, help="MoLE/Arrow: save a heatmap of the weights per unit (PNG)."),
    weighting: Optional[str] = typer.Option(None, help="renorm (default) or softmax."),
    min_confidence: Optional[float] = typer.Option(None, help="Abstain below this top probability."),
    max_distance: Optional[str] = typer.Option(None, help="Abstain beyond this centroid distance, or 'auto'."),
    no_abstain: bool = NO_ABSTAIN,
    model: str = typer.Option(DEFAULT_MODEL, help="Base model (only read for a base-encoder router)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = typer.Option(False, "--json", help="Print the routing as JSON."),
) -> None:
    """Show the router's ranking of the library's adapters and the mixture it chooses."""
    from ..routers.abstention import screen
    from .common import open_library

    lib = open_library(library)
    rt = build_router(lib, router, name=name, model=model, top_p=top_p, top_k=top_k, weighting=weighting,
                      min_confidence=min_confidence, max_distance=max_distance, temperature=temperature,
                      candidates=candidates, mask=_names(mask), where=(device, dtype),
                      abstain=False if no_abstain else None, gks=gks, general=general)
    (routing,) = screen(in_front(lib, rt, no_abstain), [prompt], rt)
    routing = routing or rt.route([prompt])[0]
    if plot and routing.abstained:
        typer.echo(f"no plot: the prompt goes to the {routing.served_by}, no routed adapter has weights", err=True)
    elif plot:
        from ..routers.plot import plot_layer_weights

        typer.echo(f"wrote {plot_layer_weights(routing, plot)}", err=True)
    if as_json:
        typer.echo(json.dumps(routing.to_dict(), indent=2))
        return
    for adapter, p in routing.ranked():
        mark = "*" if adapter in routing.adapters else " "
        typer.echo(f"{mark} {p:7.4f}  {adapter}")
    if routing.granularity in ("token", "layer"):
        typer.echo(f"per {routing.granularity}: {routing.reason}")
    elif routing.abstained:
        typer.echo(f"abstained: {routing.reason} -> {routing.served_by}")
    else:
        mix = ",".join(f"{a}={w:.4f}" for a, w in zip(routing.adapters, routing.weights))
        typer.echo(f"mixture: {mix}  ({routing.reason})")


def in_front(lib, rt, no_abstain: bool, base=None):
    """The out-of-library test in front of an in-forward router (routers/abstention.py): the
    library's stored DLP router when it carries one, unless --no-abstain; none for DLP itself. A
    stored router that cannot be used (e.g. trained before an adapter was added) is skipped with a
    warning, as the server skips it."""
    from ..errors import LoramuxError
    from ..routers.abstention import in_forward, stored_test

    if no_abstain or not in_forward(rt):
        return None
    try:
        return stored_test(lib, base=base if base is not None else rt.fused.base)
    except LoramuxError as e:
        typer.echo(f"warning: no out-of-library test in front of {rt.kind}: {e}", err=True)
        return None


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _base_if_needed(lib, method: str, name: str | None, model: str, where: tuple[str, str]):
    """A router with a base-model encoder needs the base model; others do not load it."""
    meta = _stored_meta(lib, name or method)
    if meta is None:
        return None
    if str(meta.get("encoder", "")).startswith("base"):
        from ..models import load_base

        return load_base(model, device=where[0], dtype=where[1])
    return None


def _stored_meta(lib, name: str) -> dict | None:
    """The router.json of the router stored under `name`, unchecked (None when there is none)."""
    entry = lib.routers().get(name)
    return json.loads((lib.path / "routers" / entry["dir"] / "router.json").read_text()) if entry else None
