"""Evaluation: scoring (choice log-likelihood, exact match, BLEU, ROUGE), the mixed-pool scorer, and
the harness that runs strategies side by side (`harness.evaluate`, plotted by `plots.plot_results`)."""

from .composite import MixtureScorer, compare_policies
from .scoring import (Prediction, ScoreResult, answer_budget, choice_logprobs, exact_match, grade, greedy_generate,
                      score_task)

__all__ = ["Prediction", "ScoreResult", "answer_budget", "choice_logprobs", "exact_match", "grade", "greedy_generate",
           "score_task", "MixtureScorer", "compare_policies"]
