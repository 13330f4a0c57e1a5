"""Reader for jsonl task files, one example per line, in one of two schemas:

- generative:       {"prompt": str, "completion": str}
- multiple choice:  {"input": str, "choices": [str, ...], "target": str | int}

The prompt is used exactly as written (no prefixes are added).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LoramuxError
from .examples import Example, Task

SCHEMAS = ('{"prompt", "completion"}', '{"input", "choices", "target"}')


def _example(row: Any, where: str) -> Example:
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return Example(prompt=row["prompt"], targets=(row["completion"],))
    if isinstance(row, dict) and {"input", "choices", "target"} <= row.keys():
        choices = row["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise LoramuxError(f"{where}: 'choices' must be a non-empty list of strings; got {choices!r}")
        target = row["target"]
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
            target = choices[target]
        if target not in choices:
            raise LoramuxError(f"{where}: 'target' {row['target']!r} is neither one of the choices "
                               f"{choices} nor an index into them")
        return Example(prompt=str(row["input"]), targets=(target,), choices=tuple(choices), content=str(row["input"]),
                       choice_scores=tuple(1.0 if c == target else 0.0 for c in choices))
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise LoramuxError(f"{where}: unknown jsonl schema with keys {keys}; accepted schemas: {', '.join(SCHEMAS)}")


def read_jsonl(path: Path, name: str | None = None) -> Task:
    path = Path(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoramuxError(f"{where}: not valid JSON ({e}); expected one object per line") from None
            examples.append(_example(row, where))
    if not examples:
        raise LoramuxError(f"task file {str(path)!r} has no examples; expected one JSON object per line "
                           f"in one of the schemas {', '.join(SCHEMAS)}")
    n_mc = sum(e.is_multiple_choice for e in examples)
    if 0 < n_mc < len(examples):
        raise LoramuxError(f"{path}: mixes both jsonl schemas; a task file must use one")
    return Task(
        name=name or path.stem,
        examples=tuple(examples),
        kind="multiple_choice" if n_mc else "generative",
        metrics=("multiple_choice_grade",) if n_mc else ("exact_str_match",),
        source=path,
    )
