"""The web view at `/`: plain HTML + JS, no build step, and the JSON endpoints it reads
(the library, live and recent requests, a routing preview)."""

from fastapi.responses import HTMLResponse

from ..routers.abstention import in_forward, screen
from .core import Server
from .protocol import ERRORS, RoutePreviewRequest, RoutingPreview

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loramux</title>
<style>
 body{font:14px system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
 h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em}
 table{border-collapse:collapse} td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}
 .bar{display:inline-block;height:.9em;background:#4a7bd0;vertical-align:middle;margin-right:.4em}
 .w{display:flex;align-items:center;gap:.4em} textarea{width:100%;height:5em}
 .muted{color:#777}
</style></head><body>
<h1>loramux</h1>
<p class="muted" id="base"></p>
<h2>Which adapters would a prompt get?</h2>
<textarea id="prompt" placeholder="Type a prompt"></textarea><br>
<select id="router"></select> <button id="go">route</button>
<div id="routing"></div>
<h2>Library</h2><table id="library"><tr><th>adapter</th><th>tasks</th><th>rank</th><th>version</th><th>loaded</th></tr></table>
<h2>Live requests</h2><table id="live"><tr><th>model</th><th>routing</th><th>tokens so far</th><th>seconds</th></tr></table>
<h2>Recent requests</h2><table id="recent"><tr><th>model</th><th>routing</th><th>tokens</th><th>seconds</th></tr></table>
<script>
const key = new URLSearchParams(location.search).get("key");
const H = key ? {"Authorization": "Bearer " + key, "Content-Type": "application/json"} : {"Content-Type": "application/json"};
function esc(s){return String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
function bars(names, weights){
  return names.map((n,i) => `<div class="w"><span class="bar" style="width:${Math.max(2, 200*Math.abs(weights[i]))}px"></span>${esc(n)} ${weights[i].toFixed(3)}</div>`).join("") || '<span class="muted">base model</span>';
}
async function get(p){const r = await fetch(p, {headers: H}); return r.json();}
async function refresh(){
  const lib = await get("/v1/loramux/library");
  document.getElementById("base").textContent = "base model: " + lib.base;
  const t = document.getElementById("library"); t.querySelectorAll("tr.row").forEach(r => r.remove());
  for (const a of lib.adapters) t.insertAdjacentHTML("beforeend",
    `<tr class="row"><td>${esc(a.name)}</td><td>${esc(a.tasks.join(", "))}</td><td>${a.rank}</td><td>${a.version}</td><td>${a.loaded ? "yes" : "no"}</td></tr>`);
  const sel = document.getElementById("router");
  if (!sel.options.length) for (const m of lib.routers) sel.insertAdjacentHTML("beforeend", `<option>${esc(m)}</option>`);
  const rec = await get("/v1/loramux/recent");
  fill("live", rec.live); fill("recent", rec.requests);
}
function fill(id, requests){
  const t = document.getElementById(id); t.querySelectorAll("tr.row").forEach(x => x.remove());
  for (const q of requests) t.insertAdjacentHTML("beforeend",
    `<tr class="row"><td>${esc(q.model)}</td><td>${bars(q.adapters, q.weights)}</td><td>${q.tokens}</td><td>${q.seconds.toFixed(2)}</td></tr>`);
}
document.getElementById("go").onclick = async () => {
  const body = {model: document.getElementById("router").value, prompt: document.getElementById("prompt").value};
  const r = await fetch("/v1/loramux/route", {method: "POST", headers: H, body: JSON.stringify(body)});
  const j = await r.json();
  document.getElementById("routing").innerHTML = j.error ? esc(j.error.message) :
    bars(j.adapters, j.weights) + `<p class="muted">${esc(j.reason || "")}</p>`;
};
refresh(); setInterval(refresh, 3000);
</script></body></html>
"""


def add_web_routes(app, server: Server) -> None:
    engine, library = server.engine, server.library

    @app.get("/", response_class=HTMLResponse)
    async def web_view():
        return PAGE

    @app.get("/v1/loramux/library")
    async def library_view():
        adapters = [{"name": spec.name, "tasks": list(spec.tasks), "rank": spec.rank, "version": spec.version,
                     "loaded": spec.name in engine.adapters} for spec in (library.list() if library is not None else [])]
        return {"base": server.base_id, "adapters": adapters, "routers": server.router_names() or ["base"],
                "general": library.general if library is not None else None}

    @app.get("/v1/loramux/recent")
    async def recent():
        return {"live": server.live_requests(), "requests": list(server.recent)}

    @app.post("/v1/loramux/route", response_model=RoutingPreview, responses=ERRORS)
    async def route_preview(body: RoutePreviewRequest):
        """What a router would choose for a prompt, and why, without generating."""
        def route():
            router = server.router(body.model)
            if in_forward(router):  # the out-of-library test in front of Arrow / MoLE
                (abstained,) = screen(server.out_of_library_test(), [body.prompt], router)
                if abstained is not None:
                    return server.servable(abstained).to_dict()
            return server.servable(router.route([body.prompt])[0]).to_dict()

        exclusive = body.model.partition(":")[0] in ("arrow", "mole")  # their gates hold per-batch state
        return await server.on_model_thread(route, exclusive=exclusive)
