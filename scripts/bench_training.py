"""Peak memory and step time of one gate-distillation step: naive vs memory-efficient paths.

Runs every (path, T) in a fresh process, so each peak is measured on its own:

- `naive`: the T x T attention bias through SDPA, the O(T^2) soft occupancy, all logits at once,
  no activation checkpointing;
- `blockwise`: pure-torch blockwise attention (query blocks of 512, each checkpointed), blockwise
  occupancy (blocks of 512 positions), logits in blocks of 1024 positions;
- `efficient`: the same with `train.attention=auto`: the fused SDPA kernel with the folded age
  bias on the CPU, FlexAttention on CUDA;
- `checkpointed`: `efficient` plus checkpointed decoder layers (recomputed in backward);
- `plain`: a standard forward + backward of the same model (transformers' SDPA attention,
  cross-entropy on every position, gradients for every parameter), the reference for step time.

Peak memory is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before the step) over its resident set before the step. The workers run
with glibc returning every block of 64 KiB or more to the system on free, so this follows the
tensors the step allocates on the CPU. On CUDA it is torch.cuda.max_memory_allocated growth.

Usage:
    python scripts/bench_training.py [--lengths 512 1024 2048 4096] [--repeats 3] [--out docs/bench.json]

The model is the embedded tiny model (assets/tiny-qwen3-synthetic) when present, otherwise a
random-weight model of the same architecture (Qwen3, 3 layers, hidden 256, 4 heads, 2 KV heads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from trimkv.utils.io import atomic_write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

PATH_OVERRIDES = {
    "naive": ["train.attention=naive", "train.logit_block_size=null", "train.gradient_checkpointing=false",
              "loss.capacity_block_size=null"],
    "blockwise": ["train.attention=blockwise", "train.attention_block_size=512", "train.logit_block_size=1024",
                  "train.gradient_checkpointing=false", "loss.capacity_block_size=512"],
    "efficient": ["train.attention=auto", "train.attention_block_size=512", "train.logit_block_size=1024",
                  "train.gradient_checkpointing=false", "loss.capacity_block_size=512"],
    "checkpointed": ["train.attention=auto", "train.attention_block_size=512", "train.logit_block_size=1024",
                     "train.gradient_checkpointing=true", "loss.capacity_block_size=512"],
}


def model_folder(scratch: Path) -> Path:
    bundled = REPO_ROOT / "assets" / "tiny-qwen3-synthetic"
    if (bundled / "config.json").is_file():
        return bundled
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trimkv.models.synthetic_tokenizer import build_synthetic_tokenizer

    tokenizer = build_synthetic_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = scratch / "tiny-qwen3-random"
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("VmRSS missing from /proc/self/status")


def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("VmHWM missing from /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(path: str, length: int, repeats: int, model_dir: Path, run_dir: Path) -> dict:
    """One process: build the step for `path` at `length` tokens, measure it, return the numbers."""
    import torch

    from trimkv.training.data import IGNORE_INDEX, TrainingExample
    from trimkv.training.distributed import DistributedContext
    from trimkv.training.trainer import Trainer

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model.path={model_dir}", "budget=32", f"train.max_length={length}",
                                "data.num_examples=8", "train.batch_size=1", "gate.intermediate_size=64",
                                          *PATH_OVERRIDES.get(path, [])])
    OmegaConf.resolve(cfg)
    trainer = Trainer(cfg, run_dir, DistributedContext())
    trainer.setup()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(trainer.tokenizer), (length,), generator=generator).numpy().astype("int32")
    labels = ids.copy()
    labels[: length // 8] = IGNORE_INDEX  # a prompt without loss, as in chat data
    trainer.examples = [TrainingExample(ids, labels)]
    trainer.batches = [[0]] * (repeats + 1)
    model = trainer.model
    cuda = trainer.device.type == "cuda"

    if path == "plain":
        model.set_attn_implementation("sdpa")
        model.requires_grad_(True)
        input_ids = torch.as_tensor(ids, dtype=torch.long, device=trainer.device)[None]

        def step(index):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        def step(index):
            trainer.train_step(index)

    step(0)  # warm-up: first-call allocations and lazy initialisation
    seconds = []
    peaks = []
    for index in range(1, repeats + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset_peak()
            before = resident_kib() * 1024
        start = time.perf_counter()
        step(index)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        peaks.append((torch.cuda.max_memory_allocated() if cuda else peak_kib() * 1024) - before)
    return {"path": path, "length": length, "step_seconds": statistics.median(seconds),
            "peak_mib": max(peaks) / 2**20, "device": str(trainer.device)}


def run_worker(command: list[str], environment: dict[str, str], path: str, length: int) -> dict:
    output = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if output.returncode != 0 or not lines:
        raise SystemExit(f"benchmark worker {path} T={length} failed:\n{output.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="sequence lengths T")
    parser.add_argument("--paths", nargs="+", choices=["plain", *PATH_OVERRIDES],
                        default=["plain", "naive", "blockwise", "efficient", "checkpointed"], help="paths to measure")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        with tempfile.TemporaryDirectory() as scratch:
            result = worker(args.worker[0], int(args.worker[1]), args.repeats, args.model_dir, Path(scratch))
        print("RESULT " + json.dumps(result))
        return

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = model_folder(Path(scratch))
        for length in args.lengths:
            for path in args.paths:
                command = [sys.executable, __file__, "--worker", path, str(length), "--repeats", str(args.repeats),
                           "--model-dir", str(model_dir)]
                timing = run_worker(command, {**os.environ, "OMP_NUM_THREADS": "1"}, path, length)
                # glibc serves allocations of 64 KiB and more with mmap and returns them on free, so the
                # resident set follows the live tensors instead of keeping freed blocks. Every such
                # allocation then faults in fresh pages, which slows the step, so memory is measured in
                # a second process and time in the first.
                memory = run_worker(command, {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
                                              "MALLOC_TRIM_THRESHOLD_": "0"}, path, length)
                result = {**timing, "peak_mib": memory["peak_mib"]}
                results.append(result)
                print(f"{path:9s} T={length:5d}  peak {result['peak_mib']:8.1f} MiB  step {result['step_seconds']:7.3f} s",
                      flush=True)

    by_key = {(r["path"], r["length"]): r for r in results}
    print("\n| T | " + " | ".join(f"{p} peak MiB | {p} step s" for p in args.paths) + " |")
    print("|---|" + "---|---|" * len(args.paths))
    for length in args.lengths:
        cells = []
        for path in args.paths:
            result = by_key[(path, length)]
            cells += [f"{result['peak_mib']:.1f}", f"{result['step_seconds']:.3f}"]
        print(f"| {length} | " + " | ".join(cells) + " |")
    for path in ("naive", "blockwise", "efficient", "checkpointed"):
        if (path, 1024) in by_key and (path, 4096) in by_key:
            ratio = by_key[(path, 4096)]["peak_mib"] / by_key[(path, 1024)]["peak_mib"]
            print(f"{path}: peak(T=4096) / peak(T=1024) = {ratio:.2f}")
    for path in ("naive", "blockwise", "efficient", "checkpointed"):
        if "plain" not in args.paths or path not in args.paths:
            continue
        ratios = [by_key[(path, length)]["step_seconds"] / by_key[("plain", length)]["step_seconds"]
                  for length in args.lengths]
        print(f"{path} step / plain forward+backward: " + ", ".join(f"{ratio:.2f}" for ratio in ratios))
    if args.out:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                   "python": platform.python_version()}
        atomic_write_json(args.out, {"machine": machine, "command": " ".join(sys.argv), "results": results})


if __name__ == "__main__":
    main()
