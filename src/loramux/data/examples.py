"""Typed task examples: what every reader produces and every trainer/scorer consumes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TaskKind = Literal["multiple_choice", "generative"]


@dataclass(frozen=True)
class Example:
    """One example, its prompt already formatted the task's way (prefixes, appended choices).

    `targets` are the acceptable answers: for a generative task every reference string, for a
    multiple-choice task the choices that carry the top score. The first target is the one
    trained on.
    """

    prompt: str
    targets: tuple[str, ...]
    choices: tuple[str, ...] = ()
    choice_scores: tuple[float, ...] = ()
    # The example's content before any template: BIG-bench's `input` without the task's prefixes
    # or appended choices. Routers train and are tested on it in other formats (formats.py).
    # Out of repr and ==: digests of a task's examples (recipes, caches) stay what they were.
    content: str = field(default="", repr=False, compare=False)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)

    @property
    def raw(self) -> str:
        """The content alone, or the prompt where the reader kept no separate content."""
        return self.content or self.prompt

    @property
    def answer(self) -> str:
        return self.targets[0]


@dataclass(frozen=True)
class Task:
    """A named list of examples plus the task-level settings scoring needs."""

    name: str
    examples: tuple[Example, ...]
    kind: TaskKind
    metrics: tuple[str, ...] = ()
    stop_string: str | None = None
    output_regex: str | None = None
    source: Path | None = field(default=None, compare=False)
    preferred_score: str | None = None  # BIG-bench's headline metric for the task

    def __len__(self) -> int:
        return len(self.examples)

    def postprocess(self, text: str) -> str:
        """Cut a generated answer the BIG-bench way: at the stop string, then by the regex."""
        if self.stop_string:
            text = text.split(self.stop_string)[0]
        if self.output_regex:
            found = re.findall(self.output_regex, text)
            text = found[0] if found else ""
        return text
