"""Decode speed and memory of every eviction policy, measured against each other in one process.

For each context length and batch size, every policy prefills the same random prompt, then the
policies decode in round-robin blocks of `--block` steps so they share whatever else the machine
is doing, and ratios between them are comparable. Reported per policy:
- decode tokens/s (all rows of the batch) and its ratio to batch 1 at the same context, the
  throughput gain of batching;
- ms per step split into policy work (statistics, scoring, eviction; timed inside the cache) and
  the rest of the model;
- peak slots held per layer while attending and the retained KV bytes per layer that implies;
- peak resident memory (VmHWM, reset before each block on Linux) and, on GPU, peak CUDA memory.
The script asserts that no evicting cache ever held more than budget + max(buffer, 1) slots.

Outputs: a markdown table on stdout and in <out>/benchmark.md, raw numbers in <out>/benchmark.json,
and <out>/benchmark.png (tokens/s against context length).

Usage:
    python scripts/benchmark.py                       # CPU: contexts 1k-8k, batch 1 and 8
    python scripts/benchmark.py --contexts 16384 32768 --model-size qwen3-4b --device cuda
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trimkv.cache import build_cache, enable_eviction  # noqa: E402
from trimkv.compat import cache_kwargs, output_cache  # noqa: E402
from trimkv.gates import attach_gates, gate_config_for, set_gate_mode  # noqa: E402
from trimkv.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402

POLICY_SETTINGS = {
    "full": {},
    "streamingllm": {"n_sink": 4},
    "h2o": {"recent_ratio": 0.5},
    "snapkv": {"window": 32, "kernel": 5},
    "trimkv": {},
    "rkv": {"window": 8},
    "keydiff": {},
    "knorm": {},
}
MODEL_SIZES = {
    # A tiny Qwen3 whose per-token attention cost is visible on a CPU.
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    # The Qwen3-4B shape with random weights (GPU only).
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def build_model(size: str, device: torch.device, dtype: torch.dtype, attn: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(max_position_embeddings=65536, **MODEL_SIZES[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    enable_eviction(model, attn)
    attach_gates(model, gate_config_for(model, bias_init=6.0))
    for module in model.modules():
        if module.__class__.__name__ == "RetentionGate":
            module.to(device)
    set_gate_mode(model, "score")
    return model


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere the peak stays process-wide.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PolicyRun:
    """One policy's cache and decode state for a (context, batch) cell."""

    def __init__(self, model, name, budget, buffer, prompt, device):
        self.name = name
        self.model = model
        self.device = device
        self.cache = build_cache(model, name, None if name == "full" else budget, buffer, **POLICY_SETTINGS[name])
        for layer in self.cache.layers:
            layer.timing = True
        began = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True, **cache_kwargs(self.cache))
        self.sync()
        self.prefill_seconds = time.perf_counter() - began
        self.next_ids = out.logits[:, -1:].argmax(dim=-1)
        self.position = prompt.shape[1]
        self.decode_seconds = 0.0
        self.steps = 0
        self.peak_rss = 0.0
        self.peak_cuda = 0
        for layer in self.cache.layers:
            layer.policy_seconds = 0.0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def decode(self, steps: int) -> None:
        batch = self.next_ids.shape[0]
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                positions = torch.full((batch, 1), self.position, device=self.device)
                out = self.model(input_ids=self.next_ids, position_ids=positions, **cache_kwargs(self.cache))
                self.next_ids = out.logits[:, -1:].argmax(dim=-1)
                self.position += 1
        self.sync()
        self.decode_seconds += time.perf_counter() - began
        self.steps += steps
        self.peak_rss = max(self.peak_rss, peak_rss_mib())
        if self.device.type == "cuda":
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated())

    def result(self, budget, buffer, bytes_per_token_per_layer) -> dict:
        batch = self.next_ids.shape[0]
        policy_seconds = sum(layer.policy_seconds for layer in self.cache.layers)
        # Slots held during decoding only: the prefill peak is the prompt itself.
        peak_slots = max(layer.peak_slots for layer in self.cache.layers)
        if self.name != "full":
            limit = budget + max(buffer, 1)
            assert peak_slots <= limit, f"{self.name}: held {peak_slots} slots, more than budget + buffer = {limit}"
        return {
            "policy": self.name,
            "tokens_per_second": batch * self.steps / self.decode_seconds,
            "ms_per_step": 1000 * self.decode_seconds / self.steps,
            "policy_ms_per_step": 1000 * policy_seconds / self.steps,
            "policy_fraction": policy_seconds / self.decode_seconds,
            "prefill_seconds": self.prefill_seconds,
            "peak_slots": peak_slots,
            "retained_kv_bytes_per_layer": peak_slots * bytes_per_token_per_layer,
            "peak_rss_mib": self.peak_rss,
            "peak_cuda_mib": self.peak_cuda / 2**20,
        }


def run_cell(model, policies, context, batch, budget, buffer, steps, block, device, vocab):
    generator = torch.Generator().manual_seed(context + batch)
    prompt = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
    config = model.config
    dtype_bytes = next(model.parameters()).element_size()
    bytes_per_token_per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes * batch
    runs = [PolicyRun(model, name, budget, buffer, prompt, device) for name in policies]
    for layer_run in runs:
        for layer in layer_run.cache.layers:
            layer.reset_peak_stats()
    done = 0
    while done < steps:
        chunk = min(block, steps - done)
        for run in runs:
            run.decode(chunk)
        done += chunk
    results = [run.result(budget, buffer, bytes_per_token_per_layer) for run in runs]
    del runs
    gc.collect()
    return results


def markdown(rows: list[dict], reference: str = "streamingllm") -> str:
    lines = ["| context | batch | policy | tok/s | vs batch 1 | vs streamingllm | vs full | ms/step "
             "| policy ms/step (share) | peak slots | KV MiB/layer | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['context']} | {row['batch']} | {row['policy']} | {row['tokens_per_second']:.1f} "
            f"| {row.get('ratio_batch1', float('nan')):.2f} | {row.get('ratio_streamingllm', float('nan')):.2f} "
            f"| {row.get('ratio_full', float('nan')):.2f} "
            f"| {row['ms_per_step']:.2f} | {row['policy_ms_per_step']:.3f} ({100 * row['policy_fraction']:.1f}%) "
            f"| {row['peak_slots']} | {row['retained_kv_bytes_per_layer'] / 2**20:.2f} | {row['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for row in rows})
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), dpi=120, squeeze=False)
    for axis, batch in zip(axes[0], batches):
        for policy in dict.fromkeys(row["policy"] for row in rows):
            points = sorted((row["context"], row["tokens_per_second"]) for row in rows
                            if row["policy"] == policy and row["batch"] == batch)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"batch {batch}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="prompt lengths")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--policies", nargs="+", default=list(POLICY_SETTINGS), choices=list(POLICY_SETTINGS))
    parser.add_argument("--budget", type=int, default=512, help="tokens kept per layer and KV head")
    parser.add_argument("--buffer", type=int, default=128, help="eviction runs at budget + buffer tokens")
    parser.add_argument("--steps", type=int, default=128, help="decode steps per policy and cell")
    parser.add_argument("--block", type=int, default=16, help="decode steps per round-robin turn")
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmark")
    args = parser.parse_args()
    if args.budget <= 0 or args.buffer < 0 or args.steps <= 0 or args.block <= 0:
        parser.error("--budget, --steps and --block must be positive and --buffer >= 0")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(args.model_size, device, dtype, args.attn)
    vocab = model.config.vocab_size

    rows = []
    batch1_speeds = {}  # (context, policy) -> tokens/s at batch 1
    for context in args.contexts:
        # Batch 1 first, so that every larger batch is compared with it.
        for batch in sorted(args.batches):
            print(f"context {context}, batch {batch} ...", flush=True)
            cell = run_cell(model, args.policies, context, batch, args.budget, args.buffer, args.steps, args.block,
                            device, vocab)
            speeds = {row["policy"]: row["tokens_per_second"] for row in cell}
            for row in cell:
                row.update({"context": context, "batch": batch})
                if batch == 1:
                    batch1_speeds[(context, row["policy"])] = row["tokens_per_second"]
                if (context, row["policy"]) in batch1_speeds:
                    row["ratio_batch1"] = row["tokens_per_second"] / batch1_speeds[(context, row["policy"])]
                for reference in ("streamingllm", "full"):
                    if reference in speeds:
                        row[f"ratio_{reference}"] = row["tokens_per_second"] / speeds[reference]
            rows += cell
            print(markdown(cell), flush=True)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": args.threads, "device": str(device),
               "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    table = markdown(rows)
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
    atomic_write_json(args.out / "benchmark.json", {"machine": machine, "settings": vars(args) | {"out": str(args.out)},
                                                    "command": command, "rows": rows})
    atomic_write_text(args.out / "benchmark.md", f"{command}\n\n{json.dumps(machine)}\n\n{table}\n")
    plot(rows, args.out / "benchmark.png")
    print(f"\n{table}\n\nwrote {args.out / 'benchmark.md'}, benchmark.json and benchmark.png")


if __name__ == "__main__":
    main()
