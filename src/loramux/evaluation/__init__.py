"""Evaluation: the minimal scorer now (choice log-likelihood, exact match); the full harness later."""

from .composite import MixtureScorer, compare_policies
from .scoring import (Prediction, ScoreResult, answer_budget, choice_logprobs, exact_match, grade, greedy_generate,
                      score_task)

__all__ = ["Prediction", "ScoreResult", "answer_budget", "choice_logprobs", "exact_match", "grade", "greedy_generate",
           "score_task", "MixtureScorer", "compare_policies"]
