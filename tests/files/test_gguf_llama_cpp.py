"""GGUF exports run in llama.cpp itself (the ``xllamacpp`` wheel): the embedded SmolLM2 with an adapter merged in,
written as f32 and as f16, answers five chat prompts with lorakit's greedy text (32 new tokens each; for f16, the
text of lorakit's model holding the same f16-rounded weights); the adapter alone, applied by llama.cpp to an f32
GGUF of the base, answers with the merged f32 file's text; and a tiny random Mistral with an adapter merged in
answers as lorakit does.
"""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_lora_model
from lorakit.files.gguf_export import write_gguf_model
from lorakit.models.chat import prompt_ids
from lorakit.models.embedded_models import load_default_model, load_default_tokenizer, smollm2_gguf
from lorakit.training.builtin_task import SYSTEM
from lorakit.workflows.inference import export_adapter

xllamacpp = pytest.importorskip("xllamacpp", reason="the llama.cpp checks need xllamacpp (pip install -e '.[dev]')")

QUESTIONS = ["Hi, Maya here: two large lattes for Friday please.", "What is the capital of France?",
             "Omar wants one small espresso on monday.", "Write a haiku about the sea.",
             "Three medium bagels for Sunday, it's Lena."]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An adapter on the default model (random, nonzero update, seeded), its GGUF exports, and lorakit's answers."""
    folder = tmp_path_factory.mktemp("gguf-llama-cpp")
    tokenizer = load_default_tokenizer()
    torch.manual_seed(0)
    lora = get_lora_model(load_default_model(torch.float32),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            for adapter in layer.adapters.values():
                adapter.lora_B.normal_(0, 0.02)  # as if trained: the update changes the answers
    lora.save_pretrained(folder / "adapter")
    prompts = [prompt_ids(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
               for q in QUESTIONS]
    files = {quant: export_adapter(folder / "adapter", folder / f"merged-{quant}.gguf", format="gguf", quant=quant)
             for quant in ("f32", "f16")}
    files["lora"] = export_adapter(folder / "adapter", folder / "lora-f32.gguf", format="gguf", adapter_only=True)
    base = load_default_model(torch.float32)
    files["base"] = write_gguf_model(base, base.state_dict(), folder / "base-f32.gguf", tokenizer=smollm2_gguf(),
                                     quant="f32")
    merged = lora.merge_and_unload().eval()
    answers = {"f32": greedy(merged, tokenizer, prompts)}
    with torch.no_grad():  # the f16 file's weights: every matrix rounded to f16 (vectors stay f32, as written)
        for parameter in merged.parameters():
            if parameter.dim() == 2:
                parameter.copy_(parameter.half().float())
    answers["f16"] = greedy(merged, tokenizer, prompts)
    return files, prompts, answers


def greedy(model, tokenizer, prompts: list[list[int]]) -> list[str]:
    """lorakit's greedy text for each prompt, all of them in one left-padded batch."""
    from lorakit.serve.batch import left_padded

    ids, mask, _ = left_padded(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def llama_cpp(model, prompts: list[list[int]], lora=None) -> list[str]:
    """llama.cpp's greedy text for each prompt (given as token ids: the same prompt, not re-tokenized)."""
    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.n_ctx = 512
    params.n_parallel = 1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = torch.get_num_threads()
    if lora is not None:
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(lora), 1.0)]
    server = xllamacpp.Server(params)
    texts = []
    for ids in prompts:
        answer = server.handle_completions({"prompt": ids, "n_predict": NEW_TOKENS, "temperature": 0,
                                            "cache_prompt": False})
        assert "error" not in answer, answer
        texts.append(answer["choices"][0]["text"])
    return texts


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_llama_cpp_answers_as_lorakit_does(exported, quant):
    files, prompts, answers = exported
    assert llama_cpp(files[quant], prompts) == answers[quant]


def test_the_adapter_alone_on_the_base_answers_as_the_merged_file(exported):
    files, prompts, answers = exported
    assert len(set(answers["f32"])) == len(QUESTIONS)  # five different answers: the check is not trivial
    assert llama_cpp(files["base"], prompts, lora=files["lora"]) == answers["f32"]
    assert llama_cpp(files["base"], prompts) != answers["f32"]  # the adapter is what makes them


def test_a_mistral_export_answers_as_lorakit_does(tmp_path):
    """Mistral is written as llama.cpp's converter writes it (the llama architecture), with the context capped at
    its sliding window, within which full attention is the same."""
    import gguf
    import transformers

    from lorakit.files.export import export_merged

    tokenizer = load_default_tokenizer()
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                        max_position_embeddings=8192, sliding_window=1024, initializer_range=0.2,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    lora = get_lora_model(transformers.MistralForCausalLM(config).eval(),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    path = export_merged(lora, tmp_path / "mistral.gguf", tokenizer, format="gguf", quant="f32")
    reader = gguf.GGUFReader(path)
    assert int(reader.fields["llama.context_length"].parts[-1][0]) == 1024  # the window, not 8192
    prompts = [tokenizer(text)["input_ids"] for text in ("Hello there, how are", "The capital of France is",
                                                         "1 2 3 4", "Once upon a time")]
    ours = greedy(lora, tokenizer, prompts)
    assert len(set(ours)) == len(prompts)
    assert llama_cpp(path, prompts) == ours
