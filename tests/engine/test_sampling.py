"""pick: every row's next token (and log-probs) with one transfer, matching the per-row definitions."""

import torch

from loramux.engine.sampling import RowSampling, pick, top_p_filter


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_their_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [RowSampling(), RowSampling(1.0, 0.9, torch.Generator().manual_seed(7)), RowSampling()]
    got = pick(logits, rows)
    assert [p.token for p in got][::2] == logits.argmax(-1).tolist()[::2]
    probs = torch.softmax(logits[1] - logits[1].max(), -1)
    alone = int(torch.multinomial(top_p_filter(probs, 0.9), 1, generator=torch.Generator().manual_seed(7)))
    assert got[1].token == alone and all(p.finite for p in got)


def test_logprobs_are_the_log_softmax_of_the_chosen_and_top_tokens():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    got = pick(logits, [RowSampling(logprobs=3), RowSampling(logprobs=0)])
    logp = torch.log_softmax(logits, -1)
    for b in range(2):
        assert abs(got[b].logprob - float(logp[b, got[b].token])) < 1e-6
    top = logp[0].topk(3)
    assert got[0].top == {int(i): float(v) for i, v in zip(top.indices, top.values)} and got[1].top == {}


def test_a_non_finite_row_is_flagged_not_sampled():
    logits = torch.randn(2, 20)
    logits[0, 3] = float("nan")
    got = pick(logits, [RowSampling(1.0, 1.0, torch.Generator().manual_seed(0)), RowSampling()])
    assert not got[0].finite and got[1].finite


def test_a_tiny_temperature_stays_finite():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert pick(logits, [RowSampling(1e-39, 1.0, torch.Generator().manual_seed(0))])[0].token == 1
