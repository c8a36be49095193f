"""Training sequences for gate distillation: loading, chat formatting, assistant-only labels.

Sources (`data.source`):
- `synthetic`: the embedded task's generator (prompt + completion pairs).
- `jsonl`: a local JSONL file (`data.path`).
- `hub`: a Hugging Face dataset (`data.hub_path`, `data.hub_config`, `data.split`); the
  OpenR1-Math-220k preset is `data=openr1_math`.

Records may hold `messages` (a chat: a list of {role, content}), `prompt` + `completion`, or
`question` + `answer` (GSM8K style). Chat records and question/answer records go through the
tokenizer's chat template when it has one; the loss covers only assistant tokens (labels are
-100 elsewhere). In OpenR1-Math-220k records, the assistant turn of `messages` contains the
reasoning as `<think>...</think>` followed by the solution. Qwen3's template keeps that block for
the last assistant turn, so the reasoning is trained on.

With `data.packing=true` consecutive examples are concatenated into sequences of at most
`train.max_length` tokens; each keeps its own document id and positions restarting at 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from trimkv.utils.io import DataFileError, atomic_write_folder, read_jsonl

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TrainingExample:
    input_ids: Sequence[int]  # a list, or an int32 array once loaded for training
    labels: Sequence[int]  # IGNORE_INDEX where no loss is taken
    # Token counts of the packed documents, in order; None for a single document.
    document_lengths: list[int] | None = None

    @property
    def num_documents(self) -> int:
        return 1 if self.document_lengths is None else len(self.document_lengths)


def _messages_of(record: dict, where: str) -> list[dict] | None:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataFileError(f"{where}: `messages` must be a list of {{role, content}} objects")
        return messages
    if "question" in record and "answer" in record:
        return [{"role": "user", "content": str(record["question"])},
                {"role": "assistant", "content": str(record["answer"])}]
    return None


def encode_chat(tokenizer: Any, messages: list[dict], enable_thinking: bool = True) -> TrainingExample:
    """Tokenize a chat with the tokenizer's template; labels cover every assistant turn.

    Each assistant turn's text is the difference between the template rendered up to and
    including that turn and the template rendered up to the turn before with a generation prompt,
    so whatever the template writes for an answer (think blocks, end-of-turn tokens) is learned.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=enable_thinking)
        full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False, enable_thinking=enable_thinking)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render conversations incrementally, so assistant tokens cannot be "
                "located; use prompt/completion records instead"
            )
        context_ids = tokenizer(prompt[len(rendered):], add_special_tokens=not rendered)["input_ids"]
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        input_ids += context_ids + answer_ids
        labels += [IGNORE_INDEX] * len(context_ids) + answer_ids
        rendered = full
    if not input_ids:
        raise ValueError("a chat record has no assistant message to learn from")
    return TrainingExample(input_ids, labels)


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> TrainingExample:
    """Tokenize plain text: the prompt (with the tokenizer's special prefix), the completion and EOS."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return TrainingExample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def encode_record(record: dict, tokenizer: Any, use_chat_template: bool, enable_thinking: bool, where: str) -> TrainingExample:
    messages = _messages_of(record, where)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if messages is None and "prompt" in record and "completion" in record:
        if use_chat_template and has_template:
            messages = [{"role": "user", "content": str(record["prompt"])},
                        {"role": "assistant", "content": str(record["completion"])}]
        else:
            return encode_prompt_completion(tokenizer, str(record["prompt"]), str(record["completion"]))
    if messages is None:
        raise DataFileError(
            f"{where}: a training record needs `messages`, `prompt` + `completion`, or `question` + `answer`; "
            f"found keys {sorted(record)}"
        )
    if use_chat_template and has_template:
        return encode_chat(tokenizer, messages, enable_thinking)
    prompt = "\n".join(str(m.get("content", "")) for m in messages[:-1])
    return encode_prompt_completion(tokenizer, prompt, str(messages[-1].get("content", "")))


def _records(data_cfg: Any) -> Iterable[tuple[dict, str]]:
    source = data_cfg.source
    if source == "synthetic":
        from trimkv.tasks.synthetic import training_records

        records = training_records(data_cfg.task, int(data_cfg.num_examples), int(data_cfg.seed))
        return ((record, f"synthetic record {index}") for index, record in enumerate(records))
    if source == "jsonl":
        if not data_cfg.get("path"):
            raise ValueError("data.source=jsonl needs data.path=<file.jsonl>")
        path = Path(str(data_cfg.path)).expanduser()
        return ((record, f"{path}:{index + 1}") for index, record in enumerate(read_jsonl(path)))
    if source == "hub":
        import datasets

        try:
            dataset = datasets.load_dataset(data_cfg.hub_path, data_cfg.get("hub_config"), split=data_cfg.split)
        except Exception as error:  # offline, unknown name or split: all surface differently
            raise DataFileError(
                f"could not load Hub dataset {data_cfg.hub_path!r} (config {data_cfg.get('hub_config')!r}, "
                f"split {data_cfg.split!r}): {error}; for local files use data=jsonl data.path=<file>"
            ) from error
        return ((dict(record), f"{data_cfg.hub_path}[{index}]") for index, record in enumerate(dataset))
    raise ValueError(f"unknown data.source {source!r}; use synthetic, jsonl or hub")


def load_training_examples(data_cfg: Any, tokenizer: Any, max_length: int) -> list[TrainingExample]:
    """Tokenize the configured records, truncate or drop long ones, and return them in file order.

    `data.max_examples` caps the count (null = all); `data.drop_long` drops sequences longer than
    `max_length` instead of truncating them; `data.packing` packs them (see `pack_examples`).
    With `data.cache_dir` set, the tokenized examples are stored there as arrays and reused by
    later runs with the same data settings, tokenizer and `max_length`.
    """
    cache_dir = data_cfg.get("cache_dir")
    cache_path = _cache_path(data_cfg, tokenizer, max_length, cache_dir) if cache_dir else None
    if cache_path is not None and cache_path.is_dir():
        examples = _read_cache(cache_path)
        log.info("training examples: %d read from the cache %s", len(examples), cache_path)
    else:
        examples = _tokenize_examples(data_cfg, tokenizer, max_length)
        if bool(data_cfg.get("packing", False)):
            examples = pack_examples(examples, max_length)
            log.info("packed into %d sequences of at most %d tokens", len(examples), max_length)
        if cache_path is not None:
            _write_cache(cache_path, examples)
    return examples


def _tokenize_examples(data_cfg: Any, tokenizer: Any, max_length: int) -> list[TrainingExample]:
    use_chat = bool(data_cfg.get("chat_template", True))
    thinking = bool(data_cfg.get("enable_thinking", True))
    limit = data_cfg.get("max_examples")
    drop_long = bool(data_cfg.get("drop_long", False))
    examples: list[TrainingExample] = []
    dropped = 0
    for record, where in _records(data_cfg):
        if limit is not None and len(examples) >= int(limit):
            break
        example = encode_record(record, tokenizer, use_chat, thinking, where)
        if len(example.input_ids) > max_length:
            if drop_long:
                dropped += 1
                continue
            example = TrainingExample(example.input_ids[:max_length], example.labels[:max_length])
        labels = np.asarray(example.labels, dtype=np.int32)
        if not bool((labels[1:] != IGNORE_INDEX).any()):
            dropped += 1
            continue
        # int32 arrays: a Python list spends about 36 bytes per token id (pointer + int object), an array 4.
        examples.append(TrainingExample(np.asarray(example.input_ids, dtype=np.int32), labels))
    if not examples:
        raise ValueError("no training examples left after tokenization (check data.max_examples and max_length)")
    log.info("training examples: %d (dropped %d)", len(examples), dropped)
    return examples


def pack_examples(examples: Sequence[TrainingExample], max_length: int) -> list[TrainingExample]:
    """Concatenate consecutive examples into sequences of at most `max_length` tokens.

    Each document keeps its own tokens and labels, except that the label of its first token is
    IGNORE_INDEX: that token would otherwise be predicted from the previous document.
    """
    packed: list[TrainingExample] = []
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    lengths: list[int] = []

    def flush() -> None:
        if lengths:
            packed.append(TrainingExample(np.concatenate(ids), np.concatenate(labels), list(lengths)))
            ids.clear()
            labels.clear()
            lengths.clear()

    for example in examples:
        length = len(example.input_ids)
        if length > max_length:
            raise ValueError(f"an example of {length} tokens is longer than train.max_length={max_length}")
        if sum(lengths) + length > max_length:
            flush()
        document_labels = np.array(example.labels, dtype=np.int32)
        document_labels[0] = IGNORE_INDEX
        ids.append(np.asarray(example.input_ids, dtype=np.int32))
        labels.append(document_labels)
        lengths.append(length)
    flush()
    return packed


def _cache_path(data_cfg: Any, tokenizer: Any, max_length: int, cache_dir: str) -> Path:
    settings = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else dict(data_cfg)
    settings.pop("cache_dir", None)
    settings.pop("budget", None)
    key = json.dumps({"data": settings, "tokenizer": getattr(tokenizer, "name_or_path", ""),
                      "vocab": len(tokenizer), "max_length": max_length}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(str(cache_dir)).expanduser() / f"examples-{digest}"


def _write_cache(path: Path, examples: list[TrainingExample]) -> None:
    """Store examples as flat int32 arrays plus offsets, through a temporary folder and a rename."""

    def write_contents(folder: Path) -> None:
        lengths = np.array([len(example.input_ids) for example in examples], dtype=np.int64)
        documents = [example.document_lengths or [len(example.input_ids)] for example in examples]
        np.save(folder / "input_ids.npy", np.concatenate([np.asarray(e.input_ids, dtype=np.int32) for e in examples]))
        np.save(folder / "labels.npy", np.concatenate([np.asarray(e.labels, dtype=np.int32) for e in examples]))
        np.save(folder / "lengths.npy", lengths)
        (folder / "documents.json").write_text(json.dumps(documents))

    atomic_write_folder(path, write_contents)


def _read_cache(path: Path) -> list[TrainingExample]:
    input_ids = np.load(path / "input_ids.npy", mmap_mode="r")
    labels = np.load(path / "labels.npy", mmap_mode="r")
    lengths = np.load(path / "lengths.npy")
    documents = json.loads((path / "documents.json").read_text())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [
        TrainingExample(input_ids[start:end], labels[start:end], document if len(document) > 1 else None)
        for start, end, document in zip(offsets[:-1], offsets[1:], documents)
    ]


def collate(examples: list[TrainingExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row.

    Returns (batch, longest) tensors: input_ids, attention_mask, labels, position_ids (restarting
    at 0 in every document), document_ids (the document's index in its row, -1 at padding) and
    document_weights (1 / the document's length, 0 at padding).
    """
    longest = max(len(example.input_ids) for example in examples)
    shape = (len(examples), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.full(shape, -1, dtype=torch.long)
    document_weights = torch.zeros(shape, dtype=torch.float32)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.as_tensor(np.asarray(example.input_ids, dtype=np.int64))
        labels[row, :length] = torch.as_tensor(np.asarray(example.labels, dtype=np.int64))
        attention_mask[row, :length] = 1
        start = 0
        for index, document_length in enumerate(example.document_lengths or [length]):
            end = start + document_length
            position_ids[row, start:end] = torch.arange(document_length)
            document_ids[row, start:end] = index
            document_weights[row, start:end] = 1.0 / document_length
            start = end
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids,
            "document_ids": document_ids, "document_weights": document_weights}


def batch_order(num_examples: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Shuffled example indices grouped into batches, epoch after epoch (seeded)."""
    generator = random.Random(seed)
    batches = []
    for _ in range(epochs):
        order = list(range(num_examples))
        generator.shuffle(order)
        batches += [order[start : start + batch_size] for start in range(0, num_examples, batch_size)]
    return batches
