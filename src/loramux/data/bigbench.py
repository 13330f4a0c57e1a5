"""Reader for BIG-bench's task.json format.

Follows `bigbench/api/json_task.py` (zero-shot): the prompt is
`task_prefix + example_input_prefix + input [+ choice_prefix + choices...] + example_output_prefix`,
with BIG-bench's defaults where a key is absent. When choices are appended to the input they are
permuted as BIG-bench does; the permutation is seeded by the example's own text so training and
evaluation see the same order regardless of file order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoramuxError
from .examples import Example, Task

# BIG-bench's own defaults (json_task.py) for keys a task file leaves out.
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "


def _choice_order(text: str, choices: list[str]) -> list[str]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return list(np.random.RandomState(seed).permutation(sorted(choices)))


def _example(raw: Any, i: int, meta: dict, where: str) -> Example:
    if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
        raise LoramuxError(f"{where}: example {i} needs a string 'input'; got {str(raw)[:120]!r}")
    text = content = raw["input"]
    choices: list[str] = []
    scores: list[float] = []
    if "target_scores" in raw:
        ts = raw["target_scores"]
        if not isinstance(ts, dict) or not ts:
            raise LoramuxError(f"{where}: example {i} has 'target_scores' {ts!r}; expected a non-empty "
                               f"mapping of choice -> score")
        choices = [str(c) for c in ts]
        scores = [float(s) for s in ts.values()]
        if meta.get("append_choices_to_input", True):
            prefix = str(meta.get("choice_prefix", DEFAULT_CHOICE_PREFIX))
            text = text + prefix + prefix.join(_choice_order(text, choices))
        top = max(scores)
        targets = tuple(c for c, s in zip(choices, scores) if s == top)
    elif "target" in raw:
        target = raw["target"]
        targets = tuple(str(t) for t in target) if isinstance(target, list) else (str(target),)
        if not targets:
            raise LoramuxError(f"{where}: example {i} has an empty 'target' list")
    else:
        raise LoramuxError(f"{where}: example {i} has neither 'target' nor 'target_scores'")
    prompt = (
        str(meta.get("task_prefix", ""))
        + str(meta.get("example_input_prefix", DEFAULT_INPUT_PREFIX))
        + text
        + str(meta.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX))
    )
    return Example(prompt=prompt, targets=targets, choices=tuple(choices), choice_scores=tuple(scores),
                   content=content)


def parse_bigbench(data: Any, *, name: str, where: str = "<task.json>", source: Path | None = None) -> Task:
    if not isinstance(data, dict):
        raise LoramuxError(f"{where}: expected a BIG-bench task object at the top level; got {type(data).__name__}")
    raw_examples = data.get("examples")
    if raw_examples is None and data.get("subtasks"):
        subs = [s.get("name", "?") for s in data["subtasks"] if isinstance(s, dict)]
        raise LoramuxError(f"{where}: task has subtasks {subs} and no examples of its own; point at one subtask")
    if not isinstance(raw_examples, list) or not raw_examples:
        raise LoramuxError(f"{where}: BIG-bench task needs a non-empty 'examples' list; got {str(raw_examples)[:80]!r}")
    examples = tuple(_example(raw, i, data, where) for i, raw in enumerate(raw_examples))
    n_mc = sum(e.is_multiple_choice for e in examples)
    if 0 < n_mc < len(examples):
        raise LoramuxError(f"{where}: mixes {n_mc} multiple-choice and {len(examples) - n_mc} generative "
                           f"examples; a task must be one kind")
    metrics = data.get("metrics") or (["multiple_choice_grade"] if n_mc else ["exact_str_match"])
    return Task(
        name=str(data.get("name") or name),
        examples=examples,
        kind="multiple_choice" if n_mc else "generative",
        metrics=tuple(metrics),
        stop_string=data.get("stop_string"),
        output_regex=data.get("output_regex"),
        source=source,
        preferred_score=data.get("preferred_score"),
    )


def read_bigbench(path: Path, name: str | None = None) -> Task:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise LoramuxError(f"task file {str(path)!r} is empty; expected a BIG-bench task.json object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoramuxError(f"task file {str(path)!r} is not valid JSON ({e}); expected a BIG-bench task.json") from None
    return parse_bigbench(data, name=name or path.parent.name, where=str(path), source=path)
