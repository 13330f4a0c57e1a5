"""lm-evaluation-harness's `local-completions` model scores a loramux server as users run it:
with its default tokenized requests (prompts as token-id lists, several per request) and with
plain-text prompts, the accuracy equals loramux's own scorer on the same examples."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

YAML = """task: loramux_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_matches_loramux_scoring(live, tmp_path, tiny_model_dir, monkeypatch):
    from lm_eval.tasks import TaskManager

    from loramux.data import PromptFormatter, load_task
    from loramux.evaluation import score_task

    from ..conftest import toy_mc_task

    engine, v1 = live
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = load_task(toy_mc_task(tmp_path / "toy.json", n=12))
    fmt = PromptFormatter(engine.base.tokenizer)
    rows = [{"context": fmt.prompt_text(ex.prompt), "choices": [c + fmt.answer_suffix for c in ex.choices],
             "gold": max(range(len(ex.choices)), key=lambda i: (ex.choice_scores[i], -i))} for ex in task.examples]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "loramux_toy.yaml").write_text(YAML.format(data=data))

    with engine.fused.mixture(engine.fused.sequence_mixture([{"a": 1.0}])):
        own = score_task(engine.base.model, engine.base.tokenizer, task, progress=False)

    accuracies = {}
    for name, extra in [("defaults", ""), ("text prompts", ",tokenized_requests=False")]:
        args = (f"model=a,base_url={v1}/completions,tokenizer_backend=huggingface,tokenizer={tiny_model_dir},"
                f"max_retries=1{extra}")
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["loramux_toy"],
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      batch_size=4 if name == "defaults" else 1, log_samples=True)
        accuracies[name] = out["results"]["loramux_toy"]["acc,none"]
        chosen = [max(range(len(s["filtered_resps"])), key=lambda i: (s["filtered_resps"][i][0], -i))
                  for s in sorted(out["samples"]["loramux_toy"], key=lambda s: s["doc_id"])]
        assert chosen == [ex.choices.index(p.prediction) for ex, p in zip(task.examples, own.predictions)], name
    assert accuracies["defaults"] == accuracies["text prompts"] == pytest.approx(own.score)
