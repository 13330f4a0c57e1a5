"""Prometheus metrics of one server (own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("loramux_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens", "Prompt tokens processed", registry=r)
        self.reused_tokens = Counter("loramux_prompt_tokens_reused", "Prompt tokens whose keys and values came "
                                     "from the prefix cache instead of the prefill", registry=r)
        self.output_tokens = Counter("loramux_output_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("loramux_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("loramux_running_rows", "Rows in the running batch", registry=r)
        self.batch_size = Histogram("loramux_batch_rows", "Rows per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Time to first token", registry=r)
        self.tpot = Histogram("loramux_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.adapter_use = Counter("loramux_adapter_requests", "Requests that used each adapter", ["adapter"],
                                   registry=r)
        self.router_weight = Histogram("loramux_router_weight", "Weights routers gave adapters", ["router"],
                                       registry=r, buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0))

    def observe(self, event: str, data: dict) -> None:
        """Scheduler hook."""
        if event == "step":
            self.batch_size.observe(data["rows"])
        elif event == "admitted":
            self.reused_tokens.inc(data.get("prefix_tokens_reused", 0))
        elif event == "finished":
            result = data["result"]
            self.output_tokens.inc(len(result.token_ids))
            self.prompt_tokens.inc(result.prompt_tokens)
            self.ttft.observe(result.seconds_to_first_token)
            if len(result.token_ids) > 1:
                self.tpot.observe((result.seconds - result.seconds_to_first_token) / (len(result.token_ids) - 1))
            for name, w in (result.mixture or {}).items():
                if w:
                    self.adapter_use.labels(name).inc()
            if result.routing is not None:
                for w in result.routing.weights:
                    self.router_weight.labels(result.routing.router).observe(w)

    def render(self, queue_depth: int, running: int) -> bytes:
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        return generate_latest(self.registry)
