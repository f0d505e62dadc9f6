"""The preference tasks of ``lorakit train`` (dpo, orpo, simpo, kto): each task's loss on a batch it built equals
TRL's trainer on the same token ids (loss, metrics, LoRA gradients); the reference is the base (or the frozen
--init-adapter); precomputed reference log-probs are kept for --resume; runs resume bit-exact; the built-in pairs;
the options and the data errors a user meets.

TRL is called as in test_preference.py: a bare trainer whose unmodified loss method runs on a copy of our model
patched with TRL's fused head.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from lorakit.training import train
from lorakit.training.builtin_task import builtin_pairs, near_miss
from lorakit.training.data import IGNORE, pad_batch
from lorakit.training.options import TrainConfig
from lorakit.training.preference import linear_token_logps
from lorakit.training.tasks import build_task

from .test_preference import _bare, _kto_trainer, _paired_batch, _Reference, _trl_metrics

trl = pytest.importorskip("trl", reason="TRL is the reference the tasks are compared with (pip install trl)")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}
CPU = torch.device("cpu")
PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello.", "Pick a fruit.", "Count to three.",
           "Name a month.", "What do cats say?", "Give me a number."]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"prompt": p, "chosen": f" a good answer {i} to it.", "rejected": f" bad {i}"} for i, p in
            enumerate(PROMPTS * 2)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory):
    rows = [{"prompt": p, "completion": f" answer {i} here", "label": i % 3 != 0} for i, p in enumerate(PROMPTS * 2)]
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task(model_dir, data, task="dpo", packing=True, **options):
    config = TrainConfig(model=model_dir, task=task, data=data, precision="fp32", progress=False, r=4, packing=packing,
                         task_options=options, max_eval=4, eval_batch_size=4, batch_size=3,
                         eval_fraction=0.25)
    torch.manual_seed(0)  # the same adapter in every task built here
    task = build_task(config, CPU, "fp32")
    torch.manual_seed(3)
    for name, p in task.model.named_parameters():  # a trained-looking adapter: B != 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    task.model.train()
    return task


def _trl_model(task):
    """A copy of the task's model with TRL's fused head, as TRL's trainers patch their model."""
    model = copy.deepcopy(task.model)
    add_fused_lm_head(model.model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _grads(model):
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    assert grads and any(g.abs().sum() > 0 for g in grads)
    return grads


def _same_grads(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


def _trl_pairs(task, indices):
    return [{"prompt_ids": task.train[i].prompt_ids, "chosen_ids": task.train[i].chosen_ids,
             "rejected_ids": task.train[i].rejected_ids} for i in indices]


def _our_step(task, indices):
    batch = task.batch(indices).tensors
    result = task.loss(task.model, batch)
    (result.sum / result.count).backward()
    return result, task.step_metrics(dict(result.metrics), result.count)


# --------------------------------------------------------------------------------------------------------------
# The scoring of answer tokens
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2, None])
def test_linear_token_logps_and_their_gradient_equal_log_softmax(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (7,))
    row_weights = torch.randn(7)
    logps, means = linear_token_logps(hidden, weight, targets, chunk)
    (logps * row_weights).sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    logits = hidden @ weight.t()
    full = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    (full * row_weights).sum().backward()
    torch.testing.assert_close(logps, full.detach(), **TOL)
    torch.testing.assert_close(means, logits.detach().mean(-1), **TOL)
    torch.testing.assert_close(ours, hidden.grad, **TOL)


@pytest.mark.parametrize("task,options", [("dpo", {}), ("orpo", {"nll_on_prompt": True}), ("orpo", {})])
def test_the_shared_prompt_layout_trains_as_two_padded_rows(tiny_llama_dir, pairs_file, task, options):
    """Packed, each pair's prompt is computed once (the rejected answer masked from the chosen one): loss, metrics
    and LoRA gradients equal those of the two padded rows."""
    shared = _task(tiny_llama_dir, pairs_file, task=task, **options)
    padded = _task(tiny_llama_dir, pairs_file, task=task, packing=False, **options)
    indices = [0, 5, 2, 7]
    batch = shared.batch(indices)
    assert batch.tensors["attention_mask"].dim() == 4 and len(batch.tensors["input_ids"]) < 2 * len(indices)
    assert batch.tokens == padded.batch(indices).tokens  # the same policy tokens, counted as two rows
    ours, ours_metrics = _our_step(shared, indices)
    theirs, theirs_metrics = _our_step(padded, indices)
    assert float(ours.sum) == pytest.approx(float(theirs.sum), abs=1e-5)
    assert ours_metrics == pytest.approx(theirs_metrics, abs=1e-5)
    _same_grads(_grads(shared.model), _grads(padded.model))


def test_an_empty_prompt_scores_no_first_answer_token_in_either_layout(tiny_llama_dir, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps({"prompt": "", "chosen": f"yes {i} it is", "rejected": f"no {i}"}) + "\n"
                            for i in range(8)))
    shared = _task(tiny_llama_dir, str(path))
    padded = _task(tiny_llama_dir, str(path), packing=False)
    assert not shared.train[0].prompt_ids  # this tokenizer adds no BOS: nothing to predict the first token from
    a, b = shared.batch([0, 1]).tensors, padded.batch([0, 1]).tensors
    assert len(a["score_positions"]) == len(b["score_positions"])
    torch.testing.assert_close(shared.reference_columns(a), padded.reference_columns(b), **TOL)


# --------------------------------------------------------------------------------------------------------------
# Each task's loss equals TRL's trainer
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss,packing", [("sigmoid", True), ("sigmoid", False), ("ipo", True), ("hinge", True),
                                          ("robust", False)])
def test_dpo_task_equals_trl_dpo_trainer(tiny_llama_dir, pairs_file, loss, packing):
    """Packed rows (the default) or padded ones (--no-packing): the same as TRL's padded batch."""
    smoothing = 0.1 if loss == "robust" else 0.0
    task = _task(tiny_llama_dir, pairs_file, packing=packing, loss=loss, beta=0.2, label_smoothing=smoothing)
    theirs_model = _trl_model(task)
    indices = [0, 4, 7]
    trl_batch = DataCollatorForPreference(pad_token_id=task.pad)(_trl_pairs(task, indices))
    trainer = _bare(DPOTrainer, model=theirs_model, ref_model=_Reference(theirs_model), beta=0.2, loss_types=[loss],
                    loss_weights=[1.0], label_smoothing=smoothing, precompute_ref_logps=False, ld_alpha=None,
                    f_divergence_type="reverse_kl", use_weighting=False)
    trl_loss = trainer._compute_loss(theirs_model, trl_batch, return_outputs=False)
    trl_loss.backward()
    result, metrics = _our_step(task, indices)
    assert float(result.sum / result.count) == pytest.approx(float(trl_loss), abs=1e-5)
    _same_grads(_grads(task.model), _grads(theirs_model))
    expected = _trl_metrics(trainer)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-5), name


def test_orpo_task_with_nll_on_prompt_equals_trl_orpo_trainer(tiny_llama_dir, pairs_file):
    """TRL's ORPOTrainer takes the NLL over the chosen rows' prompt and answer tokens: --nll-on-prompt does too."""
    task = _task(tiny_llama_dir, pairs_file, task="orpo", nll_on_prompt=True)
    theirs_model = _trl_model(task)
    indices = [1, 2, 5]
    trainer = _bare(ORPOTrainer, model=theirs_model, beta=0.1, is_encoder_decoder=False, padding_value=task.pad)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(theirs_model, _paired_batch(_trl_pairs(task, indices)))
    trl_loss.backward()
    result, metrics = _our_step(task, indices)
    assert float(result.sum / result.count) == pytest.approx(float(trl_loss), abs=1e-5)
    _same_grads(_grads(task.model), _grads(theirs_model))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_orpo_task_trains_no_prompt_token_by_default(tiny_llama_dir, pairs_file):
    """By default the NLL term is the chosen answers' mean token NLL: the odds-ratio part as TRL, the prompt never
    trained on."""
    task = _task(tiny_llama_dir, pairs_file, task="orpo")
    assert bool(task.batch([0, 3]).tensors["score_answer"].all())  # only answer tokens are scored
    result, metrics = _our_step(task, [0, 3])
    chosen = pad_batch([task.train[i].examples()[0] for i in (0, 3)], task.pad)
    with torch.no_grad():
        logits = task.model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits
        nll = F.cross_entropy(logits.flatten(0, 1), chosen["targets"].flatten(), ignore_index=IGNORE)
    assert metrics["nll_loss"] == pytest.approx(float(nll), abs=1e-5)
    assert float(result.sum / result.count) == pytest.approx(float(nll) - 0.1 * metrics["log_odds_ratio"], abs=1e-5)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_task_equals_trl_cpo_trainer(tiny_llama_dir, pairs_file, cpo_alpha):
    task = _task(tiny_llama_dir, pairs_file, task="simpo", cpo_alpha=cpo_alpha, simpo_gamma=0.7)
    theirs_model = _trl_model(task)
    indices = [0, 6, 2]
    trainer = _bare(CPOTrainer, model=theirs_model, beta=2.0, loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.0,
                    alpha=0.0, cpo_alpha=cpo_alpha, is_encoder_decoder=False, pad_token_id=task.pad)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(theirs_model, _paired_batch(_trl_pairs(task, indices)))
    trl_loss.backward()
    result, metrics = _our_step(task, indices)
    assert float(result.sum / result.count) == pytest.approx(float(trl_loss), abs=1e-5)
    _same_grads(_grads(task.model), _grads(theirs_model))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_kto_task_equals_trl_kto_trainer(tiny_llama_dir, kto_file):
    task = _task(tiny_llama_dir, kto_file, task="kto", desirable_weight=1.2, undesirable_weight=0.8)
    theirs_model = _trl_model(task)
    indices = [0, 1, 2, 3, 4]
    examples = [{"prompt_ids": task.train[i].prompt_ids, "completion_ids": task.train[i].completion_ids,
                 "KL_completion_ids": task.train[task.partners[i]].completion_ids, "label": task.train[i].desirable}
                for i in indices]
    assert len({e["label"] for e in examples}) == 2
    trl_batch = DataCollatorForUnpairedPreference(pad_token_id=task.pad)(examples)
    trainer = _kto_trainer(theirs_model, _Reference(theirs_model), wd=1.2, wu=0.8)
    trl_loss = trainer._compute_loss(theirs_model, trl_batch, return_outputs=False)
    trl_loss.backward()
    result, metrics = _our_step(task, indices)
    assert float(result.sum / result.count) == pytest.approx(float(trl_loss), abs=1e-5)
    _same_grads(_grads(task.model), _grads(theirs_model))
    expected = _trl_metrics(trainer)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                 "logits/chosen", "logits/rejected"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-5), name


# --------------------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------------------


def test_at_step_0_dpo_is_ln_2_and_the_reference_is_the_base_model(tiny_llama_dir, pairs_file):
    import transformers

    config = TrainConfig(model=tiny_llama_dir, task="dpo", data=pairs_file, precision="fp32", progress=False,
                         max_eval=4)
    task = build_task(config, CPU, "fp32")  # a new adapter: B = 0, the policy is the reference
    batch = task.batch([0, 1, 2, 3]).tensors
    result = task.loss(task.model, batch)
    assert float(result.sum / result.count) == pytest.approx(math.log(2), abs=1e-6)
    torch.manual_seed(1)
    for name, p in task.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    refs = task.reference_columns(batch)  # (4, 2); the packed layout, each prompt computed once
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    rows = [task.train[i].examples()[side] for side in (0, 1) for i in range(4)]  # two padded rows per pair
    padded = pad_batch(rows, task.pad)
    with torch.no_grad():
        logits = base(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    targets = padded["targets"]
    per_token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = (per_token * (targets != IGNORE)).sum(1).view(2, -1).t()
    torch.testing.assert_close(refs, expected, **TOL)
    with torch.no_grad():
        policy = task._by_row(task._scores(task.model, batch)[0], batch, batch["score_answer"])
    assert not torch.allclose(policy.view(2, -1).t(), refs)  # the adapter is not in the reference


def test_the_reference_of_an_init_adapter_is_that_adapter_frozen(tiny_llama_dir, pairs_file, tmp_path):
    from peft import PeftModel

    sft = train(model=tiny_llama_dir, task="dpo", data=pairs_file, steps=2, batch_size=2, precision="fp32",
                progress=False, output_dir=str(tmp_path / "sft"), max_eval=2, r=4)["output_dir"]
    config = TrainConfig(model=tiny_llama_dir, task="dpo", data=pairs_file, precision="fp32", progress=False,
                         init_adapter=sft, max_eval=4)
    task = build_task(config, CPU, "fp32")
    batch = task.batch([0, 1]).tensors
    with torch.no_grad():
        policy = task._by_row(task._scores(task.model, batch)[0], batch, batch["score_answer"]).view(2, -1).t()
    torch.testing.assert_close(task.reference_columns(batch), policy, **TOL)  # at the start: the same adapter
    result = task.loss(task.model, batch)
    assert float(result.sum / result.count) == pytest.approx(math.log(2), abs=1e-6)
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable and not any(".reference." in n for n in trainable)
    out = tmp_path / "dpo"
    out.mkdir()
    task.save(task.model, out)
    assert not (out / "reference").exists()
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert list(PeftModel.from_pretrained(base, str(out)).peft_config) == ["default"]


# --------------------------------------------------------------------------------------------------------------
# Runs: precomputed references, resume, the built-in pairs
# --------------------------------------------------------------------------------------------------------------


def _run(model_dir, data, out, **kw):
    settings = dict(model=model_dir, task="dpo", data=data, batch_size=2, precision="fp32", progress=False,
                    output_dir=str(out), max_eval=4, r=4, lr=1e-2, steps=4, eval_fraction=0.25)
    return train(**{**settings, **kw})


def test_precomputed_references_train_as_the_per_step_pass_and_are_reused(tiny_llama_dir, pairs_file, tmp_path,
                                                                          capsys):
    plain = _run(tiny_llama_dir, pairs_file, tmp_path / "plain")
    first = _run(tiny_llama_dir, pairs_file, tmp_path / "pre", task_options={"precompute_ref": True},
                 progress=True)  # with the progress bars the command line shows
    saved = tmp_path / "pre" / "reference_logps.safetensors"
    assert saved.is_file()
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        assert first["after"][key] == pytest.approx(plain["after"][key], abs=1e-5), key
    capsys.readouterr()
    again = _run(tiny_llama_dir, pairs_file, tmp_path / "pre", task_options={"precompute_ref": True})
    assert "reference log-probs of" in capsys.readouterr().err  # read back, not recomputed
    assert again["after"]["rewards/margins"] == pytest.approx(first["after"]["rewards/margins"], abs=1e-6)


@pytest.mark.parametrize("task,options", [("dpo", {"precompute_ref": True}), ("kto", {})])
def test_a_resumed_preference_run_ends_bit_exact(tiny_llama_dir, pairs_file, tmp_path, task, options):
    from safetensors.torch import load_file

    whole = _run(tiny_llama_dir, pairs_file, tmp_path / "whole", task=task, task_options=options)
    _run(tiny_llama_dir, pairs_file, tmp_path / "cut", task=task, task_options=options, steps=4, save_every=2)
    # The interrupted run: its final files removed, the checkpoint of step 2 kept; --resume goes on from it.
    import shutil

    ckpts = tmp_path / "cut" / "checkpoints"
    assert (ckpts / "step-2").is_dir() or any(ckpts.iterdir())
    for name in ("adapter_model.safetensors", "summary.json"):
        (tmp_path / "cut" / name).unlink()
    shutil.rmtree(ckpts / "step-4", ignore_errors=True)
    _run(tiny_llama_dir, pairs_file, tmp_path / "cut", task=task, task_options=options, steps=4, save_every=2,
         resume=True)
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["after"]


def test_the_builtin_pairs_are_trl_conversational_rows_with_a_near_miss():
    import random

    train_rows, held_out = builtin_pairs(n_train=200, n_eval=20)
    assert len(train_rows) == 200 and len(held_out) == 20
    for row in train_rows:
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and json.loads(chosen).keys() == {"name", "item", "size", "quantity", "day"}
    requests = {r["prompt"][1]["content"] for r in train_rows}
    assert not requests & {r["prompt"][1]["content"] for r in held_out}
    from lorakit.training.builtin_task import Order

    order = Order("Maya", "latte", "large", 3, "friday")
    rng = random.Random(0)
    assert all(near_miss(order, rng) != order.answer() for _ in range(50))


def test_dpo_without_data_trains_on_the_builtin_pairs(tiny_llama_dir, tmp_path):
    result = train(model=tiny_llama_dir, task="dpo", steps=2, batch_size=2, precision="fp32", progress=True,
                   output_dir=str(tmp_path), max_eval=4, r=4, max_new_tokens=4)
    assert result["task"] == "the built-in order-to-JSON preference pairs"
    own = json.loads((tmp_path / "builtin_rejected.json").read_text())  # the model's answers before training
    assert len(own) == 2 * 2 + 4 and all(isinstance(a, str) for a in own)  # the pairs trained on and held out
    assert isinstance(result["after"]["answers_changed"], int)
    assert result["headline_metric"] == "rewards/accuracies"
    assert {"rewards/accuracies", "rewards/margins", "exact_match"} <= set(result["after"])
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r and "eval" not in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected"} <= set(steps[0])


# --------------------------------------------------------------------------------------------------------------
# What a user meets
# --------------------------------------------------------------------------------------------------------------


def test_each_preference_task_lists_its_options_in_help(capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--beta", "--loss", "--label-smoothing", "--precompute-ref", "--simpo-gamma", "--cpo-alpha",
                 "--desirable-weight", "--undesirable-weight", "--max-prompt-length", "--bad-rows",
                 "--nll-on-prompt"):
        assert flag in text, flag
    assert "--task dpo" in text and "--task kto" in text


@pytest.mark.parametrize("options,message", [
    ({"loss": "exp"}, "loss='exp' is not allowed"),
    ({"beta": -1.0}, "beta must be a positive number"),
    ({"simpo_gamma": 1.0}, "has no option(s) simpo_gamma"),
])
def test_bad_preference_options_are_named(tiny_llama_dir, pairs_file, tmp_path, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(tiny_llama_dir, pairs_file, tmp_path, task_options=options, steps=1)


def test_bad_rows_error_refuses_the_file_naming_the_line(tiny_llama_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": p, "chosen": " yes", "rejected": " no"} for p in PROMPTS]
    rows[2] = {"prompt": "x", "chosen": " same", "rejected": " same"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"bad.jsonl:3: chosen and rejected are the same.*--bad-rows skip"):
        _run(tiny_llama_dir, str(path), tmp_path / "out", task_options={"bad_rows": "error"}, steps=1)
    result = _run(tiny_llama_dir, str(path), tmp_path / "out2", steps=1)  # skip: the others train
    assert result["steps"] == 1


def test_prompt_tuning_is_refused_for_preference_tasks(tiny_llama_dir, pairs_file, tmp_path):
    with pytest.raises(ValueError, match="prompt tuning is not supported"):
        _run(tiny_llama_dir, pairs_file, tmp_path, method="prompt", steps=1)


def test_the_preflight_counts_two_rows_per_pair_and_full_fine_tuning_s_reference_copy(tiny_llama_dir, pairs_file):
    from lorakit.training.preflight import estimate_run

    sft = estimate_run(TrainConfig(model=tiny_llama_dir, task="causal_lm", data=pairs_file, batch_size=4))
    dpo = estimate_run(TrainConfig(model=tiny_llama_dir, task="dpo", data=pairs_file, batch_size=4))
    assert dpo.batch == 2 * sft.batch and dpo.activations == pytest.approx(2 * sft.activations, rel=0.01)
    assert dpo.reference == 0  # LoRA: the reference is the base itself
    full = estimate_run(TrainConfig(model=tiny_llama_dir, task="dpo", data=pairs_file, batch_size=4, method="full"))
    assert full.reference == full.weights > 0
    simpo = estimate_run(TrainConfig(model=tiny_llama_dir, task="simpo", data=pairs_file, batch_size=4,
                                     method="full"))
    assert simpo.reference == 0  # no reference model


DATA = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / "preference"


@pytest.mark.parametrize("task,name", [("dpo", "dpo_en_demo.json"), ("kto", "kto_en_demo.json")])
def test_the_llama_factory_demo_files_train(tiny_llama_dir, tmp_path, capsys, task, name):
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    result = train(model=tiny_llama_dir, task=task, data=str(path), steps=1, batch_size=2, precision="fp32",
                   progress=False, output_dir=str(tmp_path), max_eval=4, r=4, max_length=128)
    said = capsys.readouterr().err
    assert re.search(rf"{name}: \d+ rows, \d+ truncated", said) and result["steps"] == 1


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dpo_under_ddp_and_fsdp_equals_one_process_with_the_global_batch(tiny_llama_dir, pairs_file, tmp_path, mode):
    from .test_fsdp import _adapter, _finish, _torchrun, train_cli

    common = ["--task", "dpo", "--model", tiny_llama_dir, "--data", pairs_file, "--steps", "2", "--max-eval", "2",
              "--no-progress", "--lr", "1e-2", "--warmup-steps", "0", "--precision", "fp32",
              "--eval-fraction", "0.25"]
    _finish(_torchrun(*common, "--batch-size", "2", *(["--fsdp"] if mode == "fsdp" else []),
                      "--output-dir", str(tmp_path / mode)))
    single = train_cli(*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one"))
    assert single.wait(timeout=300) == 0, single.stdout.read()[-2000:]
    parallel, one = _adapter(tmp_path / mode), _adapter(tmp_path / "one")
    assert parallel.keys() == one.keys()
    assert max((parallel[k] - one[k]).abs().max().item() for k in one) <= 1e-5


def test_qlora_dpo_with_gradient_checkpointing_trains(llama64_dir, pairs_file, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the qlora extra)")
    result = _run(llama64_dir, pairs_file, tmp_path, quantize="nf4", grad_checkpointing=True, steps=3)
    assert result["quantize"] == "nf4" and result["steps"] == 3
    assert result["after"]["rewards/margins"] != 0  # the adapter moved away from the reference (the 4-bit base)
