"""evaluate.py's work: generate completions under an eviction policy, grade them, write results.

Outputs in the run folder:
- `samples.jsonl`: one line per (problem, sample index), appended batch by batch.
- `metrics.json`: accuracy (pass@1: the mean over samples of each problem, then over problems),
  retained-token statistics and throughput; written atomically at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from trimkv.cache import build_cache, enable_eviction, validate_budget
from trimkv.evaluation.resume import check_run_config, finished_keys, load_finished, result_settings
from trimkv.compat import cache_kwargs
from trimkv.gates import load_gates, set_gate_mode
from trimkv.models.loading import load_model, load_tokenizer
from trimkv.policies import build_policy
from trimkv.tasks import Sample, build_task
from trimkv.utils.io import append_jsonl, atomic_write_json
from trimkv.utils.tracking import Tracker

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
METRICS_FILE = "metrics.json"


def check_settings(cfg: Any):
    """Validate budget, buffer, method settings and gates before any model is loaded.

    Returns (budget, buffer, policy).
    """
    budget, buffer = validate_budget(cfg.budget, cfg.buffer)
    params = cfg.method.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    policy = build_policy(cfg.method.name, **params)
    policy.validate(budget if policy.evicts else None, buffer)
    if cfg.method.name == "trimkv" and not cfg.get("gates"):
        raise ValueError("method=trimkv needs trained retention gates: set gates=<folder written by train.py>")
    if cfg.batch_size is None or int(cfg.batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {cfg.batch_size!r} (e.g. batch_size=8)")
    limit = cfg.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or null, got {limit!r} (e.g. limit=50; limit=null for all)")
    return budget, buffer, policy


def generation_kwargs(generation: Any, prompt_length: int, tokenizer: Any) -> dict[str, Any]:
    """Arguments for `model.generate` from the task's `generation` block."""
    max_length = generation.get("max_length")
    max_new_tokens = generation.get("max_new_tokens")
    limits = []
    if max_length is not None:
        limits.append(int(max_length) - prompt_length)
    if max_new_tokens is not None:
        limits.append(int(max_new_tokens))
    if not limits:
        raise ValueError("task.generation needs max_length or max_new_tokens")
    new_tokens = min(limits)
    if new_tokens <= 0:
        raise ValueError(
            f"the prompt has {prompt_length} tokens, which leaves no room under task.generation.max_length={max_length}; "
            "raise max_length or shorten the prompt"
        )
    kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "do_sample": bool(generation.get("do_sample", False)),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if kwargs["do_sample"]:
        kwargs["temperature"] = float(generation.get("temperature", 1.0))
        kwargs["top_p"] = float(generation.get("top_p", 1.0))
        if generation.get("top_k") is not None:
            kwargs["top_k"] = int(generation.top_k)
    else:
        # Neutral values so a model's own sampling defaults do not trigger warnings under greedy decoding.
        kwargs.update({"temperature": None, "top_p": None, "top_k": None})
    return kwargs


def completion_lengths(new_ids: torch.Tensor, eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Generated tokens per row, counting up to and including the first end-of-sequence token."""
    lengths = []
    for row in new_ids.tolist():
        length = 0
        for token in row:
            length += 1
            if token in eos_ids:
                break
        else:
            while length and pad_id is not None and row[length - 1] == pad_id and pad_id not in eos_ids:
                length -= 1
        lengths.append(length)
    return lengths


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]):
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def evaluate(cfg: Any, output_dir: str | Path) -> dict[str, Any]:
    """Run the configured evaluation and return its metrics (also written to metrics.json)."""
    output_dir = Path(output_dir)
    budget, buffer, policy = check_settings(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_run_config(output_dir, result_settings(resolved))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(int(cfg.seed))

    task = build_task(cfg.task)
    samples = task.load(cfg.limit)
    generation = cfg.task.generation
    n_samples = int(generation.get("n_samples", 1))
    jobs = [(sample, index) for sample in samples for index in range(n_samples)]
    log.info("task %s: %d problems x %d samples; method %s, budget %s, buffer %d",
             task.name, len(samples), n_samples, policy.name, budget, buffer)

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.device)
    enable_eviction(model, cfg.attn_implementation)
    if policy.name == "trimkv":
        gate_info = load_gates(model, cfg.gates)
        set_gate_mode(model, "score")
        log.info("loaded gates from %s (trained for %s, M=%s)", cfg.gates, gate_info.get("base_model"), gate_info.get("budget"))
    elif cfg.get("gates"):
        log.warning("gates=%s ignored: method %s does not use retention gates", cfg.gates, policy.name)

    tracker = Tracker(cfg.get("logger"), resolved, str(output_dir), job_type="evaluate")
    samples_path = output_dir / SAMPLES_FILE
    records = load_finished(samples_path)
    done = finished_keys(records)
    if done:
        log.info("resuming: %d of %d samples already in %s", len(done), len(jobs), samples_path)
    eos_ids = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    batch_size = int(cfg.batch_size)
    prefill_chunk = cfg.get("prefill_chunk")
    if prefill_chunk is not None and (int(prefill_chunk) < 1):
        raise ValueError(f"prefill_chunk must be a positive integer or null, got {prefill_chunk} (e.g. prefill_chunk=3072)")
    if prefill_chunk and batch_size > 1:
        # NOTE: generate cuts every row of a left-padded batch at the same stream offsets, so a
        # padded row's chunks (and thus its evictions) end at other positions than in a batch-1 run.
        log.warning("prefill_chunk with batch_size > 1: padded rows are chunked at different positions than alone")

    generated_tokens = 0
    generate_seconds = 0.0
    batches = [jobs[start : start + batch_size] for start in range(0, len(jobs), batch_size)]
    for batch_index, batch in enumerate(tqdm(batches, desc=f"{task.name}/{policy.name}", unit="batch")):
        if all((str(sample.id), index) in done for sample, index in batch):
            continue
        prompts = [task.format_prompt(sample, tokenizer) for sample, _ in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        prompt_length = encoded["input_ids"].shape[1]
        cache = build_cache(model, policy, budget if policy.evicts else None, buffer)
        kwargs = generation_kwargs(generation, prompt_length, tokenizer)
        if prefill_chunk:
            kwargs["prefill_chunk_size"] = int(prefill_chunk)
        # Seeding per batch makes a resumed run sample exactly what an uninterrupted run samples.
        torch.manual_seed(int(cfg.seed) * 1_000_003 + batch_index)
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**encoded, **kwargs, **cache_kwargs(cache))
        generate_seconds += time.perf_counter() - began

        new_ids = output[:, prompt_length:]
        lengths = completion_lengths(new_ids, eos_ids, tokenizer.pad_token_id)
        stats = cache.stats()
        batch_records = []
        for row, ((sample, sample_index), length) in enumerate(zip(batch, lengths)):
            if (str(sample.id), sample_index) in done:
                continue
            completion = tokenizer.decode(new_ids[row, :length], skip_special_tokens=True)
            result = task.grade(completion, sample)
            batch_records.append(_sample_record(task.name, sample, sample_index, completion, result, length,
                                                prompt_length, encoded["attention_mask"][row], stats, row))
            generated_tokens += length
        append_jsonl(samples_path, batch_records)
        records += batch_records

    metrics = summarize(records, generated_tokens, generate_seconds)
    metrics["samples_resumed"] = len(done)
    metrics.update(task_summary(task, records, metrics))
    metrics.update({"task": cfg.task.get("label", task.name), "method": policy.describe(), "budget": budget, "buffer": buffer,
                    "model": str(cfg.model.path)})
    atomic_write_json(output_dir / METRICS_FILE, metrics)
    tracker.summary({key: value for key, value in metrics.items() if isinstance(value, (int, float))})
    tracker.log_table("samples", ["id", "sample", "correct", "extracted", "tokens", "completion"],
                      [[r["id"], r["sample"], r["correct"], r["extracted"], r["tokens_generated"], r["completion"][:2000]]
                       for r in records[:200]])
    tracker.finish()
    log.info("accuracy %.4f over %d problems (%d samples); mean retained %.1f, peak %d; %.1f tokens/s",
             metrics["accuracy"], metrics["num_problems"], metrics["num_samples"], metrics["mean_retained"],
             metrics["peak_retained"], metrics["tokens_per_second"])
    return metrics


def _sample_record(task_name, sample: Sample, sample_index, completion, result, length, prompt_length,
                   attention_mask, stats, row) -> dict[str, Any]:
    record = {
        "task": task_name,
        "id": str(sample.id),
        "sample": sample_index,
        "completion": completion,
        "extracted": result.extracted,
        "answer": sample.answer,
        "correct": bool(result.correct),
        "tokens_generated": length,
        "prompt_tokens": int(attention_mask.sum()),
        "kv": {
            "retained_peak": int(stats["retained_peak"][row]) if stats["retained_peak"] else 0,
            "retained_mean": float(stats["retained_mean"][row]) if stats["retained_mean"] else 0.0,
            "peak_slots": stats["peak_slots"],
            "evictions": stats["evictions"],
        },
    }
    score = getattr(result, "score", None)
    if score is not None:
        record["score"] = float(score)
    metrics = getattr(result, "metrics", None)
    if metrics:
        record["metrics"] = metrics
    return record


def task_summary(task: Any, records: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """Return the task's own run metrics (judge accuracy, F1, ...) from the stored per-sample metrics.

    When the task names a primary metric, it replaces `accuracy` and the mean of `correct` moves
    to `correct_rate`.
    """
    results = [SimpleNamespace(metrics=record.get("metrics", {})) for record in records]
    summary = dict(task.summarize(results))
    primary = getattr(task, "primary_metric", None)
    if primary is not None and primary in summary:
        summary["correct_rate"] = metrics["accuracy"]
        summary["accuracy"] = summary[primary] if summary[primary] is not None else float("nan")
    return summary


def summarize(records: list[dict[str, Any]], generated_tokens: int, generate_seconds: float) -> dict[str, Any]:
    """Aggregate sample records into metrics (pass@1 = mean over samples, then over problems)."""
    by_problem: dict[str, list[float]] = {}
    for record in records:
        by_problem.setdefault(record["id"], []).append(float(record.get("score", record["correct"])))
    per_problem = [sum(values) / len(values) for values in by_problem.values()]
    retained = [record["kv"]["retained_mean"] for record in records]
    return {
        "accuracy": sum(per_problem) / len(per_problem) if per_problem else 0.0,
        "num_problems": len(by_problem),
        "num_samples": len(records),
        "mean_retained": sum(retained) / len(retained) if retained else 0.0,
        "peak_retained": max((record["kv"]["retained_peak"] for record in records), default=0),
        "mean_tokens_generated": generated_tokens / len(records) if records else 0.0,
        "tokens_per_second": generated_tokens / generate_seconds if generate_seconds > 0 else 0.0,
    }
