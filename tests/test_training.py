"""Gate distillation: the gated training attention, the losses, and short training runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tiny_models import tiny_model
from trimkv.cache.attention import trimkv_eager, trimkv_sdpa
from trimkv.training.data import IGNORE_INDEX, encode_chat
from trimkv.training.losses import capacity_loss, forward_kl, soft_occupancy

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def reference_gated_attention(query, key, value, log_beta, valid, scaling):
    """softmax(q k * scale + (t - i) log beta_i) with causal and padding masks, in plain torch."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    log_beta = log_beta.repeat_interleave(group, dim=1)  # (batch, heads, T)
    length = query.shape[2]
    t = torch.arange(length)[:, None]
    i = torch.arange(length)[None, :]
    logits = query @ key.transpose(-1, -2) * scaling + (t - i).clamp(min=0) * log_beta[:, :, None, :]
    allowed = (i <= t)[None, None] & valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(logits, dim=-1) @ value).transpose(1, 2)


@pytest.mark.parametrize("attention", [trimkv_sdpa, trimkv_eager])
def test_gated_training_attention_matches_reference(attention):
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 9, 8
    query = torch.randn(batch, heads, length, dim, requires_grad=True)
    key = torch.randn(batch, kv_heads, length, dim, requires_grad=True)
    value = torch.randn(batch, kv_heads, length, dim, requires_grad=True)
    log_beta = F.logsigmoid(torch.randn(batch, kv_heads, length)).requires_grad_(True)
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[1, 6:] = False  # right padding in the second row

    module = torch.nn.Module()
    module.trimkv_log_beta = log_beta
    module.trimkv_gate_mode = "train"
    output, _ = attention(module, query, key, value, padding, scaling=dim**-0.5)
    expected = reference_gated_attention(query, key, value, log_beta, padding, dim**-0.5)

    real = padding[:, :, None, None].expand_as(output)
    assert torch.allclose(output[real], expected[real], atol=1e-5)
    weights = torch.randn_like(expected) * real
    grads = torch.autograd.grad((output * weights).sum(), (query, key, value, log_beta))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value, log_beta))
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert float(grads[3].abs().sum()) > 0  # log beta receives a gradient


def test_soft_occupancy_and_capacity_match_direct_sums():
    torch.manual_seed(0)
    log_beta = F.logsigmoid(torch.randn(2, 3, 7) + 1.0)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    occupancy = soft_occupancy(log_beta, valid)
    budget = 2.0
    total = 0.0
    for b in range(2):
        per_head = 0.0
        length = int(valid[b].sum())
        for h in range(3):
            head_sum = 0.0
            for t in range(length):
                s_t = sum(math.exp((t - i) * float(log_beta[b, h, i])) for i in range(t + 1))
                assert abs(float(occupancy[b, h, t]) - s_t) < 1e-5
                head_sum += max(0.0, s_t - budget) / (t + 1)
            per_head += head_sum / length
        total += per_head / 3
    assert abs(float(capacity_loss(occupancy, valid, budget, "paper")) - total / 2) < 1e-5
    assert float(occupancy[1, :, 5:].abs().sum()) == 0.0


def test_forward_kl_is_zero_for_identical_models_and_positive_otherwise():
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, 6]])
    assert float(forward_kl(logits, logits, labels)) < 1e-6
    assert float(forward_kl(logits, logits + torch.randn_like(logits), labels)) > 1e-3


def test_chat_labels_cover_only_the_assistant_answer(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"}]
    example = encode_chat(tokenizer, messages)
    answer = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert answer.startswith("<think>") and "#### 5" in answer and answer.rstrip().endswith("<|im_end|>")
    prompt_part = tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l == IGNORE_INDEX])
    assert "What is 2 + 3?" in prompt_part and "#### 5" not in prompt_part
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def run_script(script, *overrides, check=True):
    result = subprocess.run([sys.executable, str(REPO / script), *overrides], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def test_training_lowers_loss_and_moves_beta(synthetic_model_dir, tmp_path):
    run_script("train.py", f"model.path={synthetic_model_dir}", f"hydra.run.dir={tmp_path}", "budget=4",
               "train.max_steps=30", "train.batch_size=4", "data.num_examples=120", "gate.bias_init=3.0",
               "gate.intermediate_size=32", "optim.lr=1e-2", "optim.warmup_steps=2", "train.log_every=10")
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30
    first = sum(entry["loss"] for entry in log[:5]) / 5
    last = sum(entry["loss"] for entry in log[-5:]) / 5
    assert last < first, (first, last)

    from safetensors.torch import load_file

    from trimkv.models.synthetic_tokenizer import build_synthetic_tokenizer
    from trimkv.gates import load_gates
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(tmp_path / "gates" / "gates.safetensors"))
    assert all(".retention_gate." in name for name in tensors)
    model = AutoModelForCausalLM.from_pretrained(synthetic_model_dir)
    load_gates(model, tmp_path / "gates")
    tokenizer = build_synthetic_tokenizer()
    ids = tokenizer("F Q C K | so the B 3 it C 1 then ? B 3 as K 4 >", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        beta = model.model.layers[0].self_attn.retention_gate(model.model.layers[0].input_layernorm(hidden)).exp()
    initial = torch.sigmoid(torch.tensor(3.0))
    assert float(beta.min()) < float(initial) - 0.02  # some tokens are forgotten faster than at the start


def test_train_script_runs_on_gsm8k_chat_records(qwen3_model_dir, qwen3_tokenizer_dir, shared_dir, tmp_path):
    run_script("train.py", "model=qwen3", f"model.path={qwen3_model_dir}", f"model.tokenizer={qwen3_tokenizer_dir}", "data=gsm8k",
               f"data.path={shared_dir / 'data' / 'gsm8k' / 'test.jsonl'}", "data.max_examples=4", "train.max_steps=2",
               "train.max_length=160", "budget=16", "num_threads=1", f"hydra.run.dir={tmp_path}")
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert all(math.isfinite(entry["loss"]) for entry in log)
    assert all(key in log[0] for key in ("loss/kl", "loss/ntp", "loss/capacity", "beta_mean/layer0", "occupancy/layer1"))
    config = json.loads((tmp_path / "gates" / "gate_config.json").read_text())
    assert config["budget"] == 16 and config["gate"]["num_layers"] == 2
