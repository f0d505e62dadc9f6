"""seq2seq (PEFT's SEQ_2_SEQ_LM) on tiny random T5 and BART models: the default targets are PEFT's, the loss is on
the target only (equal to transformers' own loss), a short run lowers the loss and generates, and PEFT reads
lorakit's adapter (and lorakit PEFT's) with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.files.io import read_adapter_config
from lorakit.training.data import IGNORE, DataError
from lorakit.training.loop import train
from lorakit.training.options import TrainConfig
from lorakit.training.tasks import Seq2SeqTask, build_task
from lorakit.training.tasks.seq2seq import encode_pairs, pad_pairs, read_pairs, seq2seq_loss
from lorakit.workflows.inference import generate

CPU = torch.device("cpu")


def tiny_t5(vocab: int = 128, pad: int = 0, eos: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, pad_token_id=pad, eos_token_id=eos,
                                   decoder_start_token_id=pad)
    return transformers.T5ForConditionalGeneration(config).eval()


def tiny_bart(vocab: int = 128, pad: int = 1, eos: int = 2, bos: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=pad,
                                     bos_token_id=bos, eos_token_id=eos, decoder_start_token_id=eos,
                                     init_std=0.3)  # at BART's 0.02 the frozen tied head keeps logits near uniform
    return transformers.BartForConditionalGeneration(config).eval()


MAKERS = {"t5": tiny_t5, "bart": tiny_bart}


@pytest.fixture(scope="module")
def tokenizer():
    from lorakit.models.embedded_models import minilm_dir

    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(scope="module", params=sorted(MAKERS))
def model_dir(request, tmp_path_factory, tokenizer) -> str:
    """A tiny random T5 or BART folder with MiniLM's (WordPiece) tokenizer: inputs and targets end with [SEP],
    which the model's config takes as its EOS."""
    folder = tmp_path_factory.mktemp(request.param)
    special = {"pad": tokenizer.pad_token_id, "eos": tokenizer.sep_token_id}
    if request.param == "bart":
        special["bos"] = tokenizer.cls_token_id
    MAKERS[request.param](vocab=len(tokenizer), **special).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def pairs(tmp_path):
    """A copy task: the target is the input's words after 'copy:'."""
    words = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three"]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(48):
        picked = [words[i] for i in torch.randperm(len(words), generator=generator)[:3].tolist()]
        rows.append({"input": "copy: " + " ".join(picked), "target": " ".join(picked)})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wrapped(model: LoraModel) -> set[str]:
    return {name for name, _ in model.lora_layers()}


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_the_default_targets_are_peft_s_attention_names(arch, peft):
    ours = get_lora_model(MAKERS[arch](), LoraConfig(task_type="SEQ_2_SEQ_LM"))
    theirs = peft.get_peft_model(MAKERS[arch](), peft.LoraConfig(task_type="SEQ_2_SEQ_LM"))
    assert _wrapped(ours) == set(theirs.base_model.targeted_module_names)
    leaves = {name.rsplit(".", 1)[-1] for name in _wrapped(ours)}
    assert leaves == ({"q", "v"} if arch == "t5" else {"q_proj", "v_proj"})


def test_the_loss_is_on_the_target_and_equals_transformers_loss(tokenizer):
    model = tiny_t5(vocab=len(tokenizer), pad=tokenizer.pad_token_id, eos=tokenizer.sep_token_id)
    pairs = encode_pairs(tokenizer, [(1, "copy: red cat", "red cat"), (2, "copy: a much longer input here", "x")],
                         max_length=32)
    batch = pad_pairs(pairs, tokenizer.pad_token_id)
    assert batch["labels"][1].tolist().count(IGNORE) == len(pairs[0].labels) - len(pairs[1].labels)
    loss_sum, count = seq2seq_loss(model, batch)
    assert int(count) == sum(len(p.labels) for p in pairs)  # the target tokens, nothing of the input
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss_sum / count, expected)
    assert pairs[0].target == "red cat"  # the reference exact match compares with


def test_a_short_run_lowers_the_loss_saves_a_seq2seq_adapter_and_generates(model_dir, pairs, tmp_path, peft):
    out = tmp_path / "run"
    result = train(model=model_dir, task="seq2seq", data=str(pairs), steps=25, batch_size=8, lr=1e-2,
                   warmup_steps=0, max_eval=6, max_new_tokens=6, output_dir=str(out), progress=False)
    assert result["last_loss"] < result["first_loss"]
    after = result["after"]
    assert after["loss"] < 0.9 * result["before"]["loss"] and after["n"] == 2 and 0 <= after["exact_match"] <= 1
    assert all(isinstance(s["prediction"], str) for s in after["samples"])
    assert read_adapter_config(out)["task_type"] == "SEQ_2_SEQ_LM"
    # The saved adapter generates on PEFT as it does on lorakit (greedy, the same tokens).
    task = build_task(TrainConfig(model=model_dir, task="seq2seq", data=str(pairs), max_eval=3), CPU, "fp32",
                      adapter=str(out))
    assert type(task) is Seq2SeqTask
    batch = task.eval_batches[0]
    with torch.no_grad():
        ours = task.model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=6,
                                   do_sample=False)
        base = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
        theirs = peft.PeftModel.from_pretrained(base, str(out)).generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)
    # `lorakit generate` with the adapter gives the same answer to the first held-out input.
    first = json.loads(pairs.read_text().splitlines()[-2])["input"]  # the last 2 of 48 rows are held out
    expected = task.tokenizer.decode(ours[0], skip_special_tokens=True).strip()
    assert generate(first, adapter=str(out), max_new_tokens=6) == expected


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_peft_reads_our_seq2seq_adapter_with_the_same_logits(arch, tmp_path, peft):
    torch.manual_seed(1)
    ours = get_lora_model(MAKERS[arch](), LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8,
                                                     init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(MAKERS[arch](), str(tmp_path))
    assert type(theirs).__name__ == "PeftModelForSeq2SeqLM"
    _assert_same_logits(ours, theirs)


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_we_read_peft_s_seq2seq_adapter_with_the_same_logits(arch, tmp_path, peft):
    torch.manual_seed(2)
    theirs = peft.get_peft_model(MAKERS[arch](), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8,
                                                                 init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(MAKERS[arch](), tmp_path)
    assert ours.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    _assert_same_logits(ours, theirs)


def _assert_same_logits(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    torch.manual_seed(0)
    input_ids = torch.randint(3, 128, (2, 7))
    decoder_input_ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        got = ours(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    assert not torch.allclose(base, got, atol=1e-4)  # the adapter changes the output: the check can fail
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_rows_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'target'"):
        read_pairs(path)
    path.write_text('{"input": "a", "target": ""}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'target' must be a non-empty string"):
        read_pairs(path)


def test_prompt_tuning_is_refused_for_seq2seq(tmp_path):
    with pytest.raises(ValueError, match="--method prompt is for causal language models.*not seq2seq"):
        TrainConfig(task="seq2seq", data=str(tmp_path / "x.jsonl"), method="prompt")
