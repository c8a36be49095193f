"""Gate-training data: OpenR1-Math-220k records through the real Qwen3 tokenizer, packing, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from training_helpers import compose_train_config
from trimkv.training.data import IGNORE_INDEX, collate, load_training_examples


def openr1_record(index: int, reasoning_words: int) -> dict:
    """A record in the OpenR1-Math-220k schema (the fields of the `default` config)."""
    problem = f"Problem {index}: find x if {index + 2}x = {2 * (index + 2)}."
    reasoning = " ".join(["We divide both sides by the coefficient."] * reasoning_words)
    answer = f"Dividing gives x = 2, so the answer is $\\boxed{{2}}$ for problem {index}."
    generation = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    return {
        "problem": problem, "solution": answer, "answer": "2", "problem_type": "Algebra", "question_type": "math-word-problem",
        "source": "olympiads", "uuid": f"uuid-{index}", "is_reasoning_complete": [True], "generations": [generation],
        "correctness_math_verify": [True], "correctness_llama": None, "finish_reasons": ["stop"], "correctness_count": 1,
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": generation}],
    }


@pytest.fixture
def openr1_file(tmp_path):
    path = tmp_path / "openr1.jsonl"
    lengths = [3, 40, 5, 8, 2]  # the second record is far longer than the others
    path.write_text("".join(json.dumps(openr1_record(index, words)) + "\n" for index, words in enumerate(lengths)))
    return path


def openr1_data_config(path, tokenizer_dir, *extra):
    cfg = compose_train_config(["model=qwen3", f"model.tokenizer={tokenizer_dir}", "data.source=jsonl",
                                f"data.path={path}", *extra])
    return cfg


def load(cfg, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer, load_training_examples(cfg.data, tokenizer, int(cfg.train.max_length))


def test_openr1_preset_labels_reasoning_and_answer_only(openr1_file, qwen3_tokenizer_dir):
    cfg = openr1_data_config(openr1_file, qwen3_tokenizer_dir)
    assert cfg.data.hub_path == "open-r1/OpenR1-Math-220k"
    assert cfg.data.drop_long
    tokenizer, examples = load(cfg, qwen3_tokenizer_dir)
    assert len(examples) == 5
    example = examples[0]
    labels = np.asarray(example.labels)
    learned = tokenizer.decode(np.asarray(example.input_ids)[labels != IGNORE_INDEX])
    context = tokenizer.decode(np.asarray(example.input_ids)[labels == IGNORE_INDEX])
    assert learned.startswith("<think>\nWe divide both sides")
    assert "</think>\n\nDividing gives x = 2" in learned
    assert learned.endswith("<|im_end|>\n")
    assert context.startswith("<|im_start|>user\nProblem 0")
    assert context.endswith("<|im_start|>assistant\n")
    assert "boxed" not in context
    assert "Problem 0" not in learned
    record = json.loads(openr1_file.read_text().splitlines()[0])
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered


def test_openr1_long_records_dropped_or_truncated(openr1_file, qwen3_tokenizer_dir):
    cfg = openr1_data_config(openr1_file, qwen3_tokenizer_dir, "train.max_length=200")
    _, dropped = load(cfg, qwen3_tokenizer_dir)
    assert len(dropped) == 4 and all(len(example.input_ids) <= 200 for example in dropped)

    cfg = openr1_data_config(openr1_file, qwen3_tokenizer_dir, "train.max_length=200", "data.drop_long=false")
    _, truncated = load(cfg, qwen3_tokenizer_dir)
    assert [len(example.input_ids) for example in truncated][1] == 200 and len(truncated) == 5


def test_openr1_packing_documents_and_positions(openr1_file, qwen3_tokenizer_dir):
    cfg = openr1_data_config(openr1_file, qwen3_tokenizer_dir, "train.max_length=512", "data.packing=true")
    tokenizer, packed = load(cfg, qwen3_tokenizer_dir)
    cfg_plain = openr1_data_config(openr1_file, qwen3_tokenizer_dir, "train.max_length=512")
    _, plain = load(cfg_plain, qwen3_tokenizer_dir)

    assert sum(example.num_documents for example in packed) == len(plain) and len(packed) < len(plain)
    assert all(len(example.input_ids) <= 512 for example in packed)
    batch = collate(packed, tokenizer.pad_token_id)
    offset = 0
    row = 0
    for document in plain:
        length = len(document.input_ids)
        if offset + length > len(packed[row].input_ids):
            row, offset = row + 1, 0
        span = slice(offset, offset + length)
        assert batch["input_ids"][row, span].tolist() == list(document.input_ids)
        assert batch["position_ids"][row, span].tolist() == list(range(length))
        assert len(set(batch["document_ids"][row, span].tolist())) == 1
        # Every label is kept except the first token's, which would be predicted across documents.
        assert batch["labels"][row, span].tolist()[1:] == list(document.labels)[1:]
        assert batch["labels"][row, offset].item() == IGNORE_INDEX
        offset += length
    assert (batch["document_ids"][batch["attention_mask"] == 0] == -1).all()


def test_tokenized_examples_cache_is_reused(openr1_file, qwen3_tokenizer_dir, tmp_path):
    cache = tmp_path / "cache"
    cfg = openr1_data_config(openr1_file, qwen3_tokenizer_dir, "data.packing=true", "train.max_length=512",
                             f"data.cache_dir={cache}")
    _, first = load(cfg, qwen3_tokenizer_dir)
    folders = list(cache.iterdir())
    assert len(folders) == 1
    assert (folders[0] / "input_ids.npy").is_file()
    openr1_file.write_text("")  # a cache hit must not read the data again
    _, second = load(cfg, qwen3_tokenizer_dir)
    assert [list(e.input_ids) for e in second] == [list(e.input_ids) for e in first]
    assert [e.document_lengths for e in second] == [e.document_lengths for e in first]
    assert OmegaConf.select(cfg, "data.cache_dir") == str(cache)
