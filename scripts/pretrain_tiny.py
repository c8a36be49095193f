"""Pretrain the embedded tiny Qwen3 model on the synthetic task, on one CPU thread.

The model is a real `Qwen3ForCausalLM` built from a `Qwen3Config` and trained from scratch on
train-split samples generated on the fly (never the eval stream). The learning rate follows the
step count, not the wall clock. So a slow shared machine changes the run time but not the
weights after a given step, and `--max-minutes` only stops a run early.

Two things make the long-range lookup learnable in CPU minutes:
- a curriculum: body length and lookup distance grow linearly from short samples to the
  configured task lengths (plus `--length-margin` extra filler) over the first `--curriculum-frac`
  of the steps;
- dense lookup supervision: training samples carry every possible recall step, and by default the
  loss covers only the tokens that the prompt determines (recall keys and values, the answer and
  `<eos>`), so random filler words add no gradient noise.

Eviction-robust training: a model trained without it (same recipe, `--evict-prob 0`, 100% full-cache
exact match) relied on many tokens besides the needed ones. With a full prefill and each answer
step restricted to `<bos>`, the question (header, `|`, `>`), the needed assignments and the 8 most
recent tokens, its teacher-forced exact match fell to 31% (200 eval samples), so no eviction
policy could have matched the full cache. So a fraction `--evict-prob` of the sequences is trained
under a random eviction mask: from a random step on, each query attends only to the never-dropped
tokens (`<bos>`, question, needed assignments), a random share of the other tokens and a random
recent window. The loss of those sequences covers only the answer, whose needed tokens stay
visible. The monitor logs `needed_only_exact`, the exact match under that restriction.

Every `--eval-every` steps the script logs teacher-forced exact match on held-out samples of the
eval split with seed `--monitor-seed` (a different stream from the reported eval seed). Under
teacher forcing, all answer tokens being the argmax is the same event as greedy decoding
reproducing the answer. The final accuracy is measured with real greedy `model.generate` calls.

Example (the command that made the committed checkpoint is in its README):
    python scripts/pretrain_tiny.py --out-dir assets/tiny-qwen3-synthetic --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from trimkv.models.synthetic_tokenizer import build_synthetic_tokenizer  # noqa: E402
from trimkv.tasks.synthetic import (  # noqa: E402
    ROLE_RECALL_KEY,
    ROLE_RECALL_VALUE,
    SyntheticConfig,
    SyntheticExample,
    generate_example,
    generator_config,
)
from trimkv.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

logger = logging.getLogger("pretrain_tiny")

SUPERVISED_PROMPT_ROLES = frozenset({ROLE_RECALL_KEY, ROLE_RECALL_VALUE})
# Recent tokens the answer may see in the needed-only measurement.
NEEDED_ONLY_WINDOW = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="checkpoint folder to write (replaced atomically)")
    parser.add_argument(
        "--task-config",
        type=Path,
        default=REPO_ROOT / "conf" / "task" / "synthetic.yaml",
        help="task YAML whose `generator` block sets the target lengths",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the train-split stream")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="stop early after this much wall time")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.05, help="final LR as a fraction of --lr (cosine)")
    parser.add_argument("--warmup-steps", type=int, default=200, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--heads", type=int, default=4, help="query heads (head_dim = hidden / heads)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    parser.add_argument("--intermediate", type=int, default=512, help="MLP intermediate size")
    parser.add_argument("--curriculum-frac", type=float, default=0.3, help="fraction of steps over which lengths grow")
    parser.add_argument("--length-margin", type=int, default=2, help="extra filler_max beyond the task setting at the end")
    parser.add_argument(
        "--loss-on",
        choices=("targets", "all"),
        default="targets",
        help="targets: recall steps, answer and <eos> only; all: every next token",
    )
    parser.add_argument(
        "--evict-prob", type=float, default=0.5, help="fraction of training sequences under a random eviction mask"
    )
    parser.add_argument("--evict-max-window", type=int, default=16, help="largest recent window of a random eviction mask")
    parser.add_argument(
        "--bf16-autocast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run forward and backward under CPU bfloat16 autocast (weights and optimizer stay fp32)",
    )
    parser.add_argument("--eval-every", type=int, default=200, help="steps between held-out measurements")
    parser.add_argument("--monitor-samples", type=int, default=256, help="held-out samples per measurement")
    parser.add_argument("--monitor-seed", type=int, default=1, help="eval-split seed of the monitoring samples")
    parser.add_argument("--final-samples", type=int, default=500, help="samples for the final greedy generate check")
    parser.add_argument("--final-seed", type=int, default=0, help="eval-split seed of the final check")
    parser.add_argument("--curve-file", type=Path, default=None, help="learning-curve CSV (default: OUT_DIR/learning_curve.csv)")
    return parser.parse_args(argv)


def curriculum_config(target: SyntheticConfig, progress: float, margin: int, rng: random.Random) -> SyntheticConfig:
    """Return the generator settings for one training sample at training `progress` in [0, 1].

    Lengths grow from a short start to the target (plus `margin` extra filler). Once grown, each
    sample draws its scale uniformly, so short samples stay in the mix. Every sample has the most
    recall steps its assignments allow, for dense lookup supervision.
    """
    scale = rng.uniform(0.0, min(1.0, progress))
    filler_max = round(1 + scale * (target.filler_max + margin - 1))
    num_assignments = max(target.num_queries, round(target.num_queries + scale * (target.num_assignments - target.num_queries)))
    num_assignments = max(num_assignments, min(target.num_assignments, target.num_queries + 2))
    return replace(
        target,
        num_assignments=num_assignments,
        num_recalls=num_assignments - target.num_queries,
        filler_min=min(target.filler_min, filler_max),
        filler_max=filler_max,
        min_needed_distance=round(scale * (target.min_needed_distance + 8)),
    )


def encode_example(example: SyntheticExample, tokenizer, loss_on: str) -> tuple[list[int], list[int]]:
    """Return input ids (<bos> prompt answer <eos>) and labels (-100 where no loss is taken)."""
    prompt_ids = tokenizer(example.question)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    if loss_on == "all":
        labels = list(ids)
        labels[0] = -100
        return ids, labels
    labels = [-100] * len(prompt_ids) + answer_ids
    for word_index, role in enumerate(example.prompt_roles):
        if role in SUPERVISED_PROMPT_ROLES:
            labels[word_index + 1] = ids[word_index + 1]
    return ids, labels


def eviction_visibility(
    example: SyntheticExample, keep_share: float, window: int, start: int, rng: random.Random
) -> torch.Tensor:
    """Return the (seq_len, seq_len) bool matrix of which keys each query sees under an eviction.

    Queries before `start` attend to the whole causal prefix. From `start` on, a query attends to
    `<bos>`, the needed positions (question and needed assignments), each other prompt token with
    probability `keep_share` (drawn once per token, so an evicted token never comes back) and the
    `window` most recent tokens.
    """
    length = example.answer_start + len(example.answer_words) + 1
    kept = torch.zeros(length, dtype=torch.bool)
    kept[0] = True
    for position in example.needed_positions:
        kept[position] = True
    for position in range(1, example.answer_start):
        if not kept[position] and rng.random() < keep_share:
            kept[position] = True
    positions = torch.arange(length)
    causal = positions[None, :] <= positions[:, None]
    recent = positions[None, :] > positions[:, None] - window
    visible = causal & (kept[None, :] | recent)
    visible[:start] = causal[:start]
    return visible


def collate(
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    visibility: list[torch.Tensor | None] | None = None,
    multiple: int = 32,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to a multiple of `multiple` tokens; the model shifts labels itself.

    Few distinct shapes keep the CPU kernels' per-shape caches, and so the process memory, small.
    With `visibility`, the attention mask is a (batch, 1, seq_len, seq_len) bool mask that applies
    each row's eviction matrix (None means plain causal attention).
    """
    length = max(len(ids) for ids, _ in pairs)
    length = -(-length // multiple) * multiple
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    if visibility is None:
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    # Padding queries see only themselves, so no softmax row is empty; their labels are -100.
    mask = torch.eye(length, dtype=torch.bool).repeat(len(pairs), 1, 1)
    for row, ((ids, _), matrix) in enumerate(zip(pairs, visibility)):
        size = len(ids)
        if matrix is None:
            matrix = torch.ones(size, size, dtype=torch.bool).tril()
        mask[row, :size, :size] = matrix
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask[:, None]}


def build_model(args: argparse.Namespace, tokenizer) -> Qwen3ForCausalLM:
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(config)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


@torch.no_grad()
def teacher_forced_accuracy(
    model, tokenizer, examples: list[SyntheticExample], needed_only: bool = False, batch_size: int = 64
) -> dict[str, float]:
    """Return answer-token accuracy and exact match under teacher forcing (answer tokens and <eos>).

    With `needed_only`, the prompt is processed with full attention and every answer step attends
    only to `<bos>`, the needed positions and the NEEDED_ONLY_WINDOW most recent tokens.
    """
    model.eval()
    token_hits = token_total = exact = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pairs = [encode_example(example, tokenizer, "targets") for example in chunk]
        # Keep only the answer labels: the first answer token sits at answer_start.
        for (ids, labels), example in zip(pairs, chunk):
            labels[: example.answer_start] = [-100] * example.answer_start
        visibility = None
        if needed_only:
            visibility = [
                eviction_visibility(example, 0.0, NEEDED_ONLY_WINDOW, example.answer_start, random.Random(0))
                for example in chunk
            ]
        batch = collate(pairs, tokenizer.pad_token_id, visibility)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predictions = logits[:, :-1].argmax(-1)
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        hits = (predictions == targets) & mask
        token_hits += int(hits.sum())
        token_total += int(mask.sum())
        exact += int((hits.sum(1) == mask.sum(1)).sum())
    model.train()
    return {"token_acc": token_hits / token_total, "exact": exact / len(examples)}


@torch.no_grad()
def greedy_generate_accuracy(model, tokenizer, examples: list[SyntheticExample], max_new_tokens: int) -> float:
    """Return exact match of greedy `model.generate` completions, one prompt at a time (no padding)."""
    model.eval()
    correct = 0
    for example in examples:
        input_ids = tokenizer(example.question, return_tensors="pt")["input_ids"]
        output = model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens)
        completion = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
        correct += int(completion.split() == example.answer_words)
    model.train()
    return correct / len(examples)


def save_checkpoint(model, tokenizer, out_dir: Path, summary: dict, max_new_tokens: int) -> None:
    """Write model, tokenizer and summary to a temporary sibling folder, then swap it in by rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.generation_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "pretrain_summary.json", summary)
        # Keep files that are not produced here (README.md, the learning curve) across the swap.
        if out_dir.exists():
            for entry in out_dir.iterdir():
                if entry.is_file() and not (staging / entry.name).exists():
                    shutil.copy2(entry, staging / entry.name)
        # mkdtemp and the atomic writers create owner-only modes, but a checkpoint is meant to be shared.
        staging.chmod(0o755)
        for entry in staging.iterdir():
            entry.chmod(0o644)

        if out_dir.exists():
            previous = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(out_dir, previous)
            os.replace(staging, out_dir)
            shutil.rmtree(previous)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_curve(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    path.chmod(0o644)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # One thread: with other processes on the machine, more threads oversubscribe the cores and
    # slow every step down by an order of magnitude.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data_rng = random.Random(f"pretrain-curriculum/{args.seed}")

    task_cfg = OmegaConf.load(args.task_config)
    target = generator_config(task_cfg)
    max_new_tokens = int(task_cfg.generation.max_new_tokens)
    tokenizer = build_synthetic_tokenizer()
    model = build_model(args, tokenizer)
    model.train()
    parameter_count = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters, target task settings %s", parameter_count, asdict(target))

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    monitor = [generate_example(target, "eval", args.monitor_seed, i) for i in range(args.monitor_samples)]
    curve_path = args.curve_file or args.out_dir / "learning_curve.csv"
    curve: list[dict] = []
    started = time.monotonic()
    sample_index = 0
    running_loss = 0.0
    running_steps = 0
    step = 0
    stop_reason = "finished all steps"

    for step in range(1, args.steps + 1):
        progress = step / max(1, args.curriculum_frac * args.steps)
        pairs = []
        visibility = []
        for _ in range(args.batch_size):
            sample_cfg = curriculum_config(target, progress, args.length_margin, data_rng)
            example = generate_example(sample_cfg, "train", args.seed, sample_index)
            sample_index += 1
            ids, labels = encode_example(example, tokenizer, args.loss_on)
            matrix = None
            if data_rng.random() < args.evict_prob:
                matrix = eviction_visibility(
                    example,
                    keep_share=data_rng.random(),
                    window=data_rng.randint(1, args.evict_max_window),
                    start=data_rng.randint(example.answer_start // 2, example.answer_start),
                    rng=data_rng,
                )
                # A recall step may have lost its distractor, so only the answer is supervised.
                labels[: example.answer_start] = [-100] * example.answer_start
            pairs.append((ids, labels))
            visibility.append(matrix)
        batch = collate(pairs, tokenizer.pad_token_id, visibility)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running_loss += loss.item()
        running_steps += 1

        elapsed_min = (time.monotonic() - started) / 60
        out_of_time = elapsed_min >= args.max_minutes
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            scores = teacher_forced_accuracy(model, tokenizer, monitor)
            needed_only = teacher_forced_accuracy(model, tokenizer, monitor, needed_only=True)
            row = {
                "step": step,
                "wall_min": round(elapsed_min, 2),
                "lr": f"{learning_rate(step - 1, args):.3g}",
                "train_loss": round(running_loss / running_steps, 4),
                "curriculum": round(min(1.0, progress), 3),
                "answer_token_acc": round(scores["token_acc"], 4),
                "exact_match": round(scores["exact"], 4),
                "needed_only_exact": round(needed_only["exact"], 4),
            }
            curve.append(row)
            write_curve(curve_path, curve)
            logger.info(
                "step %5d | %5.1f min | lr %s | loss %.4f | answer tokens %.3f | exact %.3f | needed-only exact %.3f",
                step, elapsed_min, row["lr"], row["train_loss"], scores["token_acc"], scores["exact"],
                needed_only["exact"],
            )
            running_loss = 0.0
            running_steps = 0
        if out_of_time:
            stop_reason = f"stopped at the --max-minutes limit ({args.max_minutes} min)"
            break

    train_minutes = (time.monotonic() - started) / 60
    logger.info("training done after %d steps, %.1f min: %s", step, train_minutes, stop_reason)

    final = [generate_example(target, "eval", args.final_seed, i) for i in range(args.final_samples)]
    generate_acc = greedy_generate_accuracy(model, tokenizer, final, max_new_tokens)
    logger.info("greedy generate exact match on %d eval samples (seed %d): %.4f", len(final), args.final_seed, generate_acc)

    summary = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "task_settings": asdict(target),
        "parameters": parameter_count,
        "steps_run": step,
        "stop_reason": stop_reason,
        "train_minutes": round(train_minutes, 2),
        "torch": torch.__version__,
        "final_greedy_exact_match": {"samples": len(final), "eval_seed": args.final_seed, "accuracy": generate_acc},
        "last_monitor": curve[-1],
    }
    save_checkpoint(model, tokenizer, args.out_dir, summary, max_new_tokens)
    if args.curve_file is None:
        # The swap above copied the curve written before it; rewrite it to be sure it is complete.
        write_curve(args.out_dir / "learning_curve.csv", curve)
    logger.info("checkpoint written to %s", args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
