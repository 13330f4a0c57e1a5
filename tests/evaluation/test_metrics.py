import pytest

from loramux.data import Example, Task
from loramux.evaluation.metrics import bleu, generative_metrics, primary_metric, rouge
from loramux.evaluation.scoring import Prediction, result_of


def test_bleu_is_sacrebleus_corpus_score_with_every_reference():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog barks loudly"]
    refs = [("the cat sat on the mat",), ("the dog barks loudly", "a dog is barking")]
    expected = sacrebleu.corpus_bleu(preds, [["the cat sat on the mat", "the dog barks loudly"],
                                            ["the cat sat on the mat", "a dog is barking"]]).score / 100
    assert bleu(preds, refs) == pytest.approx(expected)
    assert bleu(["exactly this one here"], [("exactly this one here",)]) == pytest.approx(1.0)
    assert bleu(["too short"], [("too short",)]) == 0.0  # no 4-grams: sacrebleu's corpus BLEU is 0, as in BIG-bench


def test_rouge_takes_the_best_reference_per_example():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    preds = ["paris is the capital", "blue"]
    refs = [("berlin", "the capital is paris"), ("red",)]
    best = max(scorer.score(r, preds[0])["rouge1"].fmeasure for r in refs[0])
    got = rouge(preds, refs)
    assert got["rouge1"] == pytest.approx((best + 0.0) / 2)
    assert set(got) == {"rouge1", "rouge2", "rougeLsum"}


def test_metrics_and_primary_metric_follow_the_task():
    ipa = Task("ipa", (Example("p", ("a b c d",)),), "generative", metrics=("bleu", "rouge", "exact_str_match"),
               preferred_score="bleu")
    qa = Task("qa", (Example("p", ("x",)),), "generative", metrics=("bleu", "bleurt", "rouge", "exact_str_match"),
              preferred_score="rougeLsum")
    mc = Task("mc", (Example("p", ("y",), ("y", "n"), (1, 0)),), "multiple_choice",
              metrics=("multiple_choice_grade", "rouge", "bleu"), preferred_score="multiple_choice_grade")
    assert (primary_metric(ipa), primary_metric(qa), primary_metric(mc)) == ("bleu", "rougeLsum", "multiple_choice_grade")
    assert primary_metric(Task("t", (), "generative", metrics=("bleurt",))) == "exact_str_match"
    m = generative_metrics(qa, ["x", "z"], [("x",), ("y",)])
    assert m["exact_str_match"] == 0.5 and "bleurt" not in m and "rougeLsum" in m
    r = result_of(ipa, [Prediction("p", "a b c d", ("a b c d",), True)])
    assert r.metric == "bleu" and r.score == pytest.approx(1.0) and r.metrics["exact_str_match"] == 1.0
