"""The CUDA paths, where a CUDA device exists (skipped, saying so, elsewhere): a bf16 training step with the
chunked loss against fp32, the trainer end to end on the device, a QLoRA step on bitsandbytes' CUDA kernels, merge
and unmerge of a bf16 base, a mixed-adapter batch, the server answering from the device, and DDP (nccl) and FSDP
(its bf16 mixed-precision policy) on one device. ``bench/gpu_smoke.sh`` runs them."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from conftest import assert_rows_match_single_adapter_runs, random_lora, tiny_llama, tiny_llama_64

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.training.data import IGNORE
from lorakit.training.loss import causal_lm_loss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (torch.cuda.is_available() is False)")]
CUDA = torch.device("cuda", 0)


def _batch(seed: int = 0, vocab: int = 128) -> dict[str, torch.Tensor]:
    """Two rows of 24 tokens whose second half is the target (as a chat answer's loss mask makes it)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 25), generator=gen)
    targets = ids[:, 1:].clone()
    targets[:, :12] = IGNORE
    return {"input_ids": ids[:, :-1].to(CUDA), "targets": targets.to(CUDA)}


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_a_bf16_step_with_the_chunked_loss_follows_fp32():
    make = lambda: get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear",
                                                           init_lora_weights=False)).to(CUDA)
    batch = _batch()
    fp32 = make()
    loss32, count = causal_lm_loss(fp32, batch)
    loss32.backward()
    bf16 = make()
    bf16.model.to(torch.bfloat16)  # the trainer keeps a frozen base in bf16 under autocast ...
    for p in bf16.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # ... and the adapters in fp32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss16, _ = causal_lm_loss(bf16, batch)
    loss16.backward()
    assert count.item() == 24 and loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) <= 2e-2 * loss32.item()
    g32, g16 = _grads(fp32), _grads(bf16)
    assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_the_trainer_runs_on_the_device_and_decides_its_precision_by_measurement(tiny_llama_dir, tmp_path):
    from lorakit.training.loop import train

    result = train(model=tiny_llama_dir, device="cuda", precision="auto", steps=6, max_eval=4, max_new_tokens=4,
                   progress=False, warmup_steps=1, lr=1e-2, output_dir=str(tmp_path))
    assert result["device"] == "cuda:0" or result["device"] == "cuda"
    assert result["precision"] in ("bf16", "fp32") and "ms in fp32" in result["precision_reason"]
    assert result["last_loss"] < result["first_loss"] and result["peak_gpu_mib"] > 0
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "adapter_model.safetensors")).values())


def test_a_qlora_step_on_bitsandbytes_cuda_kernels():
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'lorakit[qlora]')")
    from lorakit import quantize
    from lorakit.core.layers import is_4bit

    reference = tiny_llama_64().to(CUDA)
    model = quantize(tiny_llama_64().to(CUDA), "nf4")  # quantized on the device: bitsandbytes' CUDA kernels
    assert any(is_4bit(m) and m.weight.device.type == "cuda" for m in model.modules())
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = _batch()
    loss, _ = causal_lm_loss(lora, batch)
    loss.backward()
    grads = _grads(lora)
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
    with torch.no_grad():  # 4-bit rounding moves the logits a little, not a lot
        ids = batch["input_ids"]
        with lora.disable_adapter():
            quantized = lora(input_ids=ids).logits
        full = reference(input_ids=ids).logits
    assert (quantized - full).abs().mean() < 0.3 * full.abs().mean()


def test_merge_and_unmerge_of_a_bf16_base_on_the_device():
    model = get_lora_model(tiny_llama().to(CUDA, torch.bfloat16), random_lora(target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 9), device=CUDA)
    layers = [layer for _, layer in model.lora_layers()]
    before = [layer.base.weight.detach().clone() for layer in layers]
    # Merging adds the fp32 update to the bf16 weight and rounds once: exactly this, on the device as on the CPU.
    expected = [(layer.base.weight.float() + layer.delta_weight("default")).to(torch.bfloat16) for layer in layers]
    assert all(layer.adapters["default"].lora_A.dtype == torch.float32 for layer in layers)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        assert all(torch.equal(layer.base.weight, e) for layer, e in zip(layers, expected))
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        again = model(input_ids=ids).logits
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=5e-2, rtol=5e-2)
    # Unmerging subtracts the same update and rounds again: the weights come back to within bf16's rounding.
    for layer, w in zip(layers, before):
        torch.testing.assert_close(layer.base.weight.float(), w.float(), atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(again.float(), unmerged.float(), atol=5e-2, rtol=5e-2)


def test_a_mixed_adapter_batch_on_the_device():
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", random_lora(target_modules="all-linear"))
    model.to(CUDA)
    ids = torch.randint(0, 128, (3, 9), device=CUDA)
    assert_rows_match_single_adapter_runs(model, ids, ["a", "__base__", "b"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_answers_from_the_device(tiny_llama_dir, tmp_path):
    httpx = pytest.importorskip("httpx", reason="the server test needs httpx")
    uvicorn = pytest.importorskip("uvicorn", reason="the server test needs uvicorn")
    import transformers

    from lorakit.serve import build_engine, create_app

    torch.manual_seed(1)
    lora = get_lora_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "a")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    engine = build_engine(tiny_llama_dir, {"a": tmp_path / "a"})  # as `lorakit serve`: --device auto
    assert next(engine.model.parameters()).device.type == "cuda"
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            body = client.post("/v1/completions", json={"model": "a", "prompt": "The capital of France is",
                                                        "max_tokens": 8, "temperature": 0}).json()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
    reference = LoraModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
                                          tmp_path / "a", "a").to(CUDA)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]], device=CUDA)
    with torch.no_grad():
        out = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert body["choices"][0]["text"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture
def nccl_group():
    """A one-process nccl group on the one device (DDP and FSDP need a process group even for one process)."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no nccl")
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_with_nccl_on_one_device_equals_a_plain_step(nccl_group):
    from lorakit.training.parallel import Objective

    batch = _batch()
    plain = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear",
                                                    init_lora_weights=False)).to(CUDA)
    ddp_model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear",
                                                        init_lora_weights=False)).to(CUDA)
    ddp_model.load_state_dict(plain.state_dict())
    causal_lm_loss(plain, batch)[0].backward()
    ddp = torch.nn.parallel.DistributedDataParallel(Objective(ddp_model, causal_lm_loss), device_ids=[CUDA.index])
    ddp(batch)[0].backward()  # an all-reduce over nccl, of one process: the mean is the gradient itself
    torch.testing.assert_close(_grads(ddp_model), _grads(plain))


def test_fsdp_with_its_bf16_policy_on_one_device_follows_a_plain_step(nccl_group):
    from lorakit.training.fsdp import gathered, grad_norm, local_bytes, shard
    from lorakit.training.parallel import Objective

    batch = _batch()
    plain = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear",
                                                    init_lora_weights=False)).to(CUDA)
    sharded = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear",
                                                      init_lora_weights=False)).to(CUDA)
    sharded.load_state_dict(plain.state_dict())
    causal_lm_loss(plain, batch)[0].backward()
    root = Objective(sharded, causal_lm_loss)
    units = shard(root, CUDA, "bf16")  # all-gathers in bf16, reduces in fp32, keeps fp32 shards
    assert len(units) == 2 and local_bytes(sharded) > 0
    loss, _ = root(batch)
    loss.backward()
    params = [p for p in sharded.parameters() if p.requires_grad]
    norm = grad_norm(params, 0.0)
    assert torch.isfinite(norm) and all(p.grad.dtype == torch.float32 for p in params)
    with gathered(root, keep=True):
        grads = torch.cat([p.grad.full_tensor().flatten() if hasattr(p.grad, "full_tensor") else p.grad.flatten()
                           for p in params])
        weights = {n: p for n, p in sharded.named_parameters()}
        assert all(p.dtype == torch.float32 for n, p in weights.items() if p.requires_grad)
    assert torch.nn.functional.cosine_similarity(grads.to(CUDA), _grads(plain), dim=0) > 0.99
