"""Training sequences for gate distillation: loading, chat formatting, assistant-only labels.

Sources (`data.source`):
- `synthetic`: the embedded task's generator (prompt + completion pairs).
- `jsonl`: a local JSONL file (`data.path`).
- `hub`: a Hugging Face dataset (`data.hub_path`, `data.hub_config`, `data.split`); the
  OpenR1-Math-220k preset is `data=openr1_math`.

Records may hold `messages` (a chat: a list of {role, content}), `prompt` + `completion`, or
`question` + `answer` (GSM8K style). Chat records and question/answer records go through the
tokenizer's chat template when it has one; the loss covers only assistant tokens (labels are
-100 elsewhere).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from trimkv.utils.io import DataFileError, read_jsonl

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TrainingExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


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
    `max_length` instead of truncating them.
    """
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
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise ValueError("no training examples left after tokenization (check data.max_examples and max_length)")
    log.info("training examples: %d (dropped %d)", len(examples), dropped)
    return examples


def collate(examples: list[TrainingExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and labels of shape (batch, longest)."""
    longest = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_order(num_examples: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Shuffled example indices grouped into batches, epoch after epoch (seeded)."""
    generator = random.Random(seed)
    batches = []
    for _ in range(epochs):
        order = list(range(num_examples))
        generator.shuffle(order)
        batches += [order[start : start + batch_size] for start in range(0, num_examples, batch_size)]
    return batches
