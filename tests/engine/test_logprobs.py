import pytest
import torch

from loramux.data import Example
from loramux.engine.logprobs import prompt_logprobs
from loramux.evaluation import choice_logprobs

from .test_engine import engine, lib  # noqa: F401 (fixtures)


def test_prompt_logprobs_equal_a_plain_forward(engine):
    ids = engine.base.tokenizer("The quick brown fox jumps")["input_ids"]
    score = prompt_logprobs(engine, ids, {"b": 0.6, "c": 0.4}, top_n=2)
    with torch.no_grad(), engine.fused.mixture(engine.fused.sequence_mixture([{"b": 0.6, "c": 0.4}])):
        logp = torch.log_softmax(engine.base.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert score.entries[0] == (ids[0], None, None)
    assert [lp for _, lp, _ in score.entries[1:]] == pytest.approx([float(logp[j - 1, ids[j]]) for j in range(1, len(ids))],
                                                                   abs=1e-5)
    assert all(len(top) == 2 for _, _, top in score.entries[1:])


def test_the_scorer_agrees_with_the_servers_prompt_logprobs(engine, where):
    """The scorer's fast path (one prompt forward, its KV cache shared by every choice) against the
    function behind the server's echo (one forward over prompt + answer): same log-likelihoods, to
    fp32 rounding in fp32; in bf16 the two sum in different orders (conftest's `Where.tol`: on a
    CPU with native bf16 dot products they differed by 1.7e-4)."""
    examples = [Example(prompt="one two", targets=("yes",), choices=("yes", "no way"), choice_scores=(1, 0)),
                Example(prompt="The quick brown fox", targets=("b",), choices=("a", "b"), choice_scores=(0, 1))]
    mix = {"a": 0.5, "c": 0.5}
    with torch.no_grad(), engine.fused.mixture(engine.fused.sequence_mixture([mix])):
        fast = choice_logprobs(engine.base.model, engine.formatter, examples)
    engine.fused.release()
    for ex, row in zip(examples, fast):
        p = engine.formatter.encode_prompt(ex.prompt)
        for choice, got in zip(ex.choices, row):
            entries = prompt_logprobs(engine, p + engine.formatter.encode_answer(choice), mix).entries
            assert got == pytest.approx(sum(lp for _, lp, _ in entries[len(p):]), abs=where.tol(1e-4))
