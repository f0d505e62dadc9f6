"""lorakit predict: a classifier's class and probabilities per text, a language model's greedy answer per prompt,
streamed to a JSONL file that only gets its name when complete."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.training.data import DataError, read_prompts
from lorakit.training.loop import train
from lorakit.workflows.inference import evaluate_adapter, generate
from lorakit.workflows.predict import predict, predictions


def test_a_classifier_predicts_each_text_with_its_probabilities(sentiment_run, tmp_path, capsys):
    new = sentiment_run / "new.csv"
    out = tmp_path / "preds.jsonl"
    code = main(["predict", str(sentiment_run / "run"), "--data", str(new), "--text-field", "text", "--label-map",
                 "neg=0,pos=1", "--output", str(out), "--batch-size", "5", "--no-progress"])
    assert code == 0 and "12 predictions in" in capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(2, 14))  # every row, in file order, across batches of 5
    assert not list(tmp_path.glob("*.partial"))
    for r in records:
        assert set(r["probabilities"]) == {"0", "1"} and sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)
    expected = evaluate_adapter(sentiment_run / "run", eval_data=str(new), text_field="text",
                                label_map=["neg=0", "pos=1"], progress=False)
    predicted = torch.zeros(2, 2, dtype=torch.long)  # the same classes as evaluation gives, row by row
    for r in records:
        predicted[int(r["reference"]), int(r["prediction"])] += 1
    assert predicted.tolist() == expected["confusion"]


def test_texts_without_labels_are_predicted_too(sentiment_run, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"sentence": "a fine film"}\n{"sentence": "so dull"}\n')
    records = list(predictions(sentiment_run / "run", texts, progress=False))
    assert [r["prediction"] for r in records] == ["1", "0"] and all("reference" not in r for r in records)


def test_a_language_model_answers_each_prompt_as_generate_does(tiny_llama_dir, tmp_path):
    train(model=tiny_llama_dir, steps=2, output_dir=str(tmp_path / "run"), max_eval=2, max_new_tokens=4,
          progress=False, warmup_steps=1, lr=1e-2, precision="fp32")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Order for Ada: 2 x scone (small), monday."},
        {"instruction": "Order for Bo:", "input": "1 x tea, friday.", "output": "{}"},
        {"messages": [{"role": "user", "content": "Order for Cy: 3 x bun, sunday."}]},
    ]) + "\n")
    out = tmp_path / "answers.jsonl"
    assert predict(tmp_path / "run", prompts, out, max_new_tokens=5, batch_size=2, progress=False) == 3
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("reference") for r in records] == [None, "{}", None]
    for r in records:
        assert r["prediction"] == generate(r["prompt"], adapter=tmp_path / "run", max_new_tokens=5)


def test_bad_input_is_an_error_and_leaves_no_output(sentiment_run, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    bad = tmp_path / "bad.csv"
    bad.write_text("review,label\nfine,pos\n")
    assert main(["predict", str(sentiment_run / "run"), "--data", str(bad), "--output", str(out)]) == 2
    assert "bad.csv:1: no column 'sentence' (columns: review, label)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    (tmp_path / "prompts.jsonl").write_text('{"question": "hi"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:1: missing field 'instruction'"):
        read_prompts(tmp_path / "prompts.jsonl")


def test_adapters_of_other_task_types_are_refused_by_name(sentiment_run, tmp_path):
    import shutil

    shutil.copytree(sentiment_run / "run", tmp_path / "qa")
    config = json.loads((tmp_path / "qa" / "adapter_config.json").read_text())
    (tmp_path / "qa" / "adapter_config.json").write_text(json.dumps(config | {"task_type": "QUESTION_ANS"}))
    with pytest.raises(ValueError, match="is a QUESTION_ANS adapter; lorakit predict handles sequence classifiers"):
        list(predictions(tmp_path / "qa", sentiment_run / "new.csv", progress=False))
