"""BIG-bench's generative metrics, computed by the libraries it uses: BLEU (sacrebleu, corpus level,
all references) and ROUGE-1/2/Lsum (rouge-score, best reference per example, then the mean).
Scores are in [0, 1] (BIG-bench reports BLEU and ROUGE x100)."""

from __future__ import annotations

from ..data import Task
from .scoring import exact_match

GENERATIVE = ("exact_str_match", "bleu", "rouge")


def bleu(predictions: list[str], references: list[tuple[str, ...]]) -> float:
    import sacrebleu

    width = max(len(r) for r in references)
    # sacrebleu takes reference *streams*; an example with fewer references repeats its first
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    return sacrebleu.corpus_bleu(predictions, streams).score / 100


def rouge(predictions: list[str], references: list[tuple[str, ...]]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for pred, refs in zip(predictions, references):
        # rougeLsum splits summaries at newlines
        scores = [scorer.score(ref.replace(". ", ".\n"), pred.replace(". ", ".\n")) for ref in refs]
        for k in kinds:
            totals[k] += max(s[k].fmeasure for s in scores)
    n = max(1, len(predictions))
    return {k: v / n for k, v in totals.items()}


def generative_metrics(task: Task, predictions: list[str], references: list[tuple[str, ...]]) -> dict[str, float]:
    """Every metric the task asks for that loramux computes (BLEURT is not: it needs a model)."""
    out = {"exact_str_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / max(1, len(predictions))}
    if "bleu" in task.metrics:
        out["bleu"] = bleu(predictions, references)
    if "rouge" in task.metrics:
        out.update(rouge(predictions, references))
    return out


def primary_metric(task: Task) -> str:
    """The task's preferred score where loramux computes it, else its first computable metric."""
    computed = {"multiple_choice_grade"} if task.kind == "multiple_choice" else {"exact_str_match", "bleu", "rouge1",
                                                                                  "rouge2", "rougeLsum"}
    if task.preferred_score in computed:
        return task.preferred_score
    for m in task.metrics:
        if m == "rouge" and task.kind == "generative":
            return "rougeLsum"
        if m in computed:
            return m
    return "multiple_choice_grade" if task.kind == "multiple_choice" else "exact_str_match"
