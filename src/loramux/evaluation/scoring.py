"""A minimal, reusable scorer: multiple-choice grade and generative exact match.

Multiple choice follows BIG-bench's `multiple_choice_grade`: every choice is scored by the
summed log-likelihood of its tokens after the prompt, and an example counts as correct when the
highest-scoring choice carries the top target score (ties go to the first choice in file order).
The prompt is run once per example and its KV cache shared by all of that example's choices.

Generative tasks are greedy-decoded, cut at the task's stop string (BIG-bench postprocessing),
stripped of surrounding whitespace, and compared exactly with each reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..data import Example, PromptFormatter, Task
from ..errors import LoramuxError
from ..padding import length_groups
from ..training.batching import left_pad

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Prediction:
    prompt: str
    prediction: str  # the chosen choice, or the generated (post-processed) text
    targets: tuple[str, ...]
    correct: bool
    choice_logprobs: list[float] = field(default_factory=list)


@dataclass
class ScoreResult:
    task: str
    metric: str  # the task's primary metric (see metrics.primary_metric)
    score: float
    n: int
    seconds: float
    predictions: list[Prediction] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # every metric computed, in [0, 1]

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = {"task": self.task, "metric": self.metric, "score": self.score, "n": self.n, "seconds": round(self.seconds, 2),
             "metrics": {k: round(v, 4) for k, v in self.metrics.items()}}
        if with_predictions:
            d["predictions"] = [p.__dict__ for p in self.predictions]
        return d


def choice_logprobs(model: "PreTrainedModel", formatter: PromptFormatter, examples: list[Example], *,
                    prompt_router=None) -> list[list[float]]:
    """Summed log p(choice + end-of-turn | prompt) for every choice of every example (one batch).

    Pass 1 runs the left-padded prompts once and keeps their KV cache; pass 2 copies each
    prompt's cache once per choice and runs all choices (right-padded) in one batch.
    `prompt_router`: an in-forward router whose weights come from the prompt (MoLE); it records
    them in pass 1 and hands each choice row its prompt's weights in pass 2.
    """
    import contextlib

    import torch

    pad = formatter.tokenizer.pad_token_id
    device = next(model.parameters()).device
    prompts = [formatter.encode_prompt(ex.prompt) for ex in examples]
    answers = [[formatter.encode_answer(c) for c in ex.choices] for ex in examples]
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with prompt_router.prefill_context(mask) if prompt_router else contextlib.nullcontext():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): predicts each choice's 1st token
    cache = out.cache

    owner = [i for i, ex in enumerate(examples) for _ in ex.choices]  # example of each flat choice
    flat = [a for per in answers for a in per]
    cache.reorder_cache(torch.tensor(owner, device=device))  # (N_choices, heads, T, d)
    if prompt_router is not None:
        prompt_router.select_rows(owner)  # each choice row keeps its prompt's gate weights
    width = max(len(a) for a in flat)
    cids = torch.tensor([a + [pad] * (width - len(a)) for a in flat], dtype=torch.long, device=device)
    cmask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in flat], dtype=torch.long, device=device)
    start = mask.sum(-1)[owner]  # next position after each prompt
    cpos = start[:, None] + torch.arange(width, device=device)[None]
    out2 = model(input_ids=cids, attention_mask=torch.cat([mask[owner], cmask], dim=-1), position_ids=cpos,
                 cache=cache, use_cache=False)
    logp = torch.log_softmax(out2.logits.float(), dim=-1)  # (N, width, V): position j predicts token j+1

    scores: list[list[float]] = [[] for _ in examples]
    for n, (a, ex_i) in enumerate(zip(flat, owner)):
        total = first[ex_i, a[0]]
        if len(a) > 1:
            total = total + logp[n, torch.arange(len(a) - 1, device=device), torch.tensor(a[1:], device=device)].sum()
        scores[ex_i].append(float(total))
    return scores


def grade(example: Example, logprobs: list[float]) -> tuple[int, bool]:
    """BIG-bench multiple_choice_grade for one example: (chosen index, whether it carries the top score)."""
    best = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
    return best, example.choice_scores[best] == max(example.choice_scores)


def exact_match(prediction: str, targets: tuple[str, ...]) -> bool:
    return prediction.strip() in {t.strip() for t in targets}


def greedy_generate(model: "PreTrainedModel", formatter: PromptFormatter, prompts: list[str],
                    max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (left-padded batch), decoded without special tokens."""
    import torch

    tok = formatter.tokenizer
    device = next(model.parameters()).device
    ids, mask = left_pad([formatter.encode_prompt(p) for p in prompts], tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=formatter.stop_token_ids(), pad_token_id=tok.pad_token_id)
    return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def answer_budget(tokenizer: "PreTrainedTokenizerBase", examples: list[Example] | tuple[Example, ...]) -> int:
    """Greedy-decoding budget for a generative task: its longest reference plus 8 tokens, at most 128."""
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for ex in examples for t in ex.targets)
    return min(128, longest + 8)


def score_task(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    task: Task,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    prompt_router=None,
    generate=None,
) -> ScoreResult:
    """Score `model` (a base model, or a PeftModel with its adapter active) on `task`.

    `prompt_router` (MoLE) is handed to `choice_logprobs`; `generate(prompts, max_new_tokens)`
    replaces HF greedy decoding (the fused engine, for routers that hold per-row state).
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise LoramuxError(f"--batch-size must be a positive integer; got {batch_size!r}")
    examples = list(task.examples[:limit] if limit else task.examples)
    formatter = PromptFormatter(tokenizer)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    predictions: list[Prediction] = []
    bar = tqdm(total=len(examples), desc=f"score {task.name}"[:50], disable=not progress, unit="ex")
    if max_new_tokens is None and task.kind == "generative":
        max_new_tokens = answer_budget(tokenizer, examples)
    # Batches of similar prompt length (padding positions cost as much as tokens on this CPU);
    # predictions come back in the examples' order.
    lengths = [len(formatter.encode_prompt(ex.prompt)) for ex in examples]
    by_index: dict[int, Prediction] = {}
    with torch.no_grad():
        for group in length_groups(lengths, max_size=batch_size, slack=32):
            chunk = [examples[i] for i in group]
            if task.kind == "multiple_choice":
                for i, ex, lps in zip(group, chunk, choice_logprobs(model, formatter, chunk, prompt_router=prompt_router)):
                    best, ok = grade(ex, lps)
                    by_index[i] = Prediction(ex.prompt, ex.choices[best], ex.targets, ok, lps)
            else:
                prompts = [e.prompt for e in chunk]
                texts = (generate(prompts, max_new_tokens) if generate
                         else greedy_generate(model, formatter, prompts, max_new_tokens))
                for i, ex, text in zip(group, chunk, texts):
                    text = task.postprocess(text).strip()
                    by_index[i] = Prediction(ex.prompt, text, ex.targets, exact_match(text, ex.targets))
            bar.update(len(chunk))
    bar.close()
    predictions.extend(by_index[i] for i in range(len(examples)))
    model.train(was_training)
    return result_of(task, predictions, time.perf_counter() - started)


def result_of(task: Task, predictions: list[Prediction], seconds: float = 0.0) -> ScoreResult:
    """A task's ScoreResult from its predictions: every metric it asks for, and its primary one."""
    from .metrics import generative_metrics, primary_metric

    accuracy = sum(p.correct for p in predictions) / max(1, len(predictions))
    if task.kind == "multiple_choice":
        metrics = {"multiple_choice_grade": accuracy}
    else:
        metrics = generative_metrics(task, [p.prediction for p in predictions], [p.targets for p in predictions])
    metric = primary_metric(task)
    return ScoreResult(task=task.name, metric=metric, score=metrics[metric], n=len(predictions), seconds=seconds,
                       predictions=predictions, metrics=metrics)
