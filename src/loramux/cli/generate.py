from __future__ import annotations

import dataclasses
from typing import List, Optional

import typer

from ..models import DEFAULT_MODEL
from .options import COMPILE, DEVICE, DTYPE, NO_ABSTAIN, QUANTIZE, Quantize


def parse_mix(mix: str) -> dict[str, float]:
    """'a=0.5,b=0.5' -> {'a': 0.5, 'b': 0.5}."""
    from ..errors import LoramuxError

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in mix.split(","))):
        name, sep, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise LoramuxError(f"--mix entry {part!r} is not name=weight (e.g. --mix hyperbaton=0.7,navigate=0.3)") from None
    if not out:
        raise LoramuxError(f"--mix {mix!r} names no adapter; expected name=weight,... (e.g. hyperbaton=0.7,navigate=0.3)")
    return out


def generate(
    prompt: str = typer.Argument(..., help="The prompt (sent as the user turn when the model has a chat template)."),
    adapter: Optional[str] = typer.Option(None, help="One library adapter (same as --mix NAME=1)."),
    mix: Optional[str] = typer.Option(None, help="A mixture of library adapters: name=weight,name=weight,..."),
    router: Optional[str] = typer.Option(None, help="Let a router choose: dlp (per prompt), arrow (per token) or mole "
                                                    "(trained gates)."),
    mask: Optional[str] = typer.Option(None, help="With --router mole: switch these adapters off (a,b,...)."),
    no_abstain: bool = NO_ABSTAIN,
    library: Optional[str] = typer.Option(None, "--library", "-l", help="Library dir (default: $LORAMUX_HOME/library)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name or HF model directory."),
    max_new_tokens: int = typer.Option(64, help="Maximum tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    stop: Optional[List[str]] = typer.Option(None, help="Stop string (repeatable)."),
    stream: bool = typer.Option(True, help="Print text as it is generated."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    compile: bool = COMPILE,
    quantize: Quantize = QUANTIZE,
) -> None:
    """Generate from the base model, one adapter, or a weighted mixture of adapters (fused engine)."""
    from ..engine import Engine, GenerationRequest, SamplingParams
    from ..errors import LoramuxError
    from ..models import load_base
    from .common import open_library

    if sum(x is not None for x in (adapter, mix, router)) > 1:
        raise LoramuxError("give one of --adapter, --mix and --router")
    mixture = parse_mix(mix) if mix else ({adapter: 1.0} if adapter else None)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop=tuple(stop or ()))
    base = load_base(model, device=device, dtype=dtype, quantize=quantize.value)
    lib = open_library(library) if (mixture or router) else None
    engine = Engine(base, lib, compile=compile)
    for name in mixture or {}:
        engine.load(name)
    request = GenerationRequest(prompt, mixture, sampling)
    rt = None
    if router:
        from ..routers.abstention import in_forward, routed, screen
        from .router import build_router, in_front

        rt = build_router(lib, router, model=model, base=base, fused=engine.fused,
                          mask=[m.strip() for m in mask.split(",") if m.strip()] if mask else None,
                          abstain=False if no_abstain else None)
        (abstained,) = screen(in_front(lib, rt, no_abstain, base), [prompt], rt)
        if abstained is not None:  # the out-of-library test in front of Arrow / MoLE
            typer.echo(f"[{router}] abstained: {abstained.reason} -> {abstained.served_by}", err=True)
            engine.ensure_loaded(abstained.mixture or ())  # the library's general adapter
            request, rt = dataclasses.replace(request, routing=abstained), None
        elif not in_forward(rt):
            request = engine.route([request], rt)[0]
            r = request.routing
            chosen = (f"abstained: {r.reason} -> {r.served_by}" if r.abstained else
                      ", ".join(f"{a}={w:.3f}" for a, w in zip(r.adapters, r.weights)))
            typer.echo(f"[{router}] {chosen}", err=True)
            rt = None
        else:
            typer.echo(f"[{router}] per {rt.granularity} over {len(routed(rt))} adapters", err=True)
    if stream:
        for piece in engine.stream(request, router=rt):
            typer.echo(piece, nl=False)
        typer.echo("")
    else:
        typer.echo(engine.generate([request], router=rt)[0].text)
