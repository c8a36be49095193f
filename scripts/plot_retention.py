"""Heatmaps of retention beta_i^(t-i) and of the tokens each policy kept, per layer and KV head.

For one sequence (a synthetic-task sample by default, or --text), the model reads the tokens one
per step; each figure shows, for one layer and KV head, the trained gates' retention (top) and one
kept-token matrix per policy (rows: steps t, columns: tokens i, dark = still cached).

Usage:
    python scripts/plot_retention.py --model assets/tiny-qwen3-synthetic --gates outputs/demo/train/gates \\
        --budget 24 --out outputs/demo/retention
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trimkv.analysis.retention import kept_matrix, retention_matrix, run_token_by_token  # noqa: E402
from trimkv.cache import enable_eviction  # noqa: E402
from trimkv.gates import load_gates, set_gate_mode  # noqa: E402
from trimkv.models.loading import resolve_model_path  # noqa: E402
from trimkv.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

DEFAULT_POLICIES = ["trimkv", "streamingllm", "h2o", "snapkv"]
POLICY_SETTINGS = {"snapkv": {"window": 8}, "streamingllm": {"n_sink": 4}}


def sequence_ids(tokenizer, text: str | None, sample_index: int) -> tuple[torch.Tensor, list[str]]:
    if text is None:
        from omegaconf import OmegaConf

        from trimkv.tasks import build_task

        task = build_task(OmegaConf.load(REPO / "conf" / "task" / "synthetic.yaml"))
        sample = task.load(sample_index + 1)[sample_index]
        text = task.format_prompt(sample, tokenizer) + " " + sample.answer
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids, tokenizer.convert_ids_to_tokens(ids[0])


def draw(path: Path, title: str, tokens: list[str], retention: torch.Tensor | None, kept: dict[str, torch.Tensor]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([("retention beta_i^(t-i)", retention, "viridis")] if retention is not None else []) + [
        (f"kept by {name}", matrix.float(), "Greys") for name, matrix in kept.items()]
    length = len(tokens)
    width = min(30.0, max(8.0, 0.07 * length))
    panel_height = min(8.0, max(2.5, 0.025 * length))
    figure, axes = plt.subplots(len(panels), 1, figsize=(width, panel_height * len(panels) + 1.0), dpi=110,
                                squeeze=False)
    step = max(1, length // 120)
    for axis, (label, matrix, colormap) in zip(axes[:, 0], panels):
        axis.imshow(matrix.numpy(), aspect="auto", interpolation="nearest", cmap=colormap, vmin=0, vmax=1)
        axis.set_title(label, fontsize=9)
        axis.set_ylabel("step t", fontsize=8)
        axis.set_xticks(range(0, length, step), tokens[::step], rotation=90, fontsize=5)
        axis.tick_params(axis="y", labelsize=6)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.985))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/tiny-qwen3-synthetic", help="model folder")
    parser.add_argument("--gates", required=True, help="gate folder (train.py output)")
    parser.add_argument("--text", default=None, help="text to analyse (default: a synthetic-task sample)")
    parser.add_argument("--sample", type=int, default=0, help="synthetic eval sample index when --text is not given")
    parser.add_argument("--budget", type=int, default=24, help="tokens kept per layer and KV head")
    parser.add_argument("--buffer", type=int, default=0)
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="layers to draw (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the PNG files")
    args = parser.parse_args()
    if args.budget <= 0 or args.buffer < 0:
        parser.error(f"--budget must be positive and --buffer >= 0, got {args.budget} and {args.buffer}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enable_eviction(model)
    load_gates(model, args.gates)
    set_gate_mode(model, "score")
    ids, tokens = sequence_ids(tokenizer, args.text, args.sample)

    kept_by_policy, log_beta = {}, None
    for policy in args.policies:
        cache, betas = run_token_by_token(model, ids, policy, args.budget, args.buffer, **POLICY_SETTINGS.get(policy, {}))
        log_beta = betas if betas is not None else log_beta
        kept_by_policy[policy] = [kept_matrix(layer.history, ids.shape[1]) for layer in cache.layers]

    layers = args.layers if args.layers is not None else range(len(kept_by_policy[args.policies[0]]))
    written = []
    for layer in layers:
        retention = retention_matrix(log_beta[layer]) if log_beta is not None else None
        for head in range(kept_by_policy[args.policies[0]][layer].shape[0]):
            out = args.out / f"layer{layer}_head{head}.png"
            draw(out, f"layer {layer}, KV head {head}, budget {args.budget}", tokens,
                 retention[head] if retention is not None else None,
                 {policy: matrices[layer][head] for policy, matrices in kept_by_policy.items()})
            written.append(str(out))
    atomic_write_json(args.out / "kept.json", {policy: [m.int().tolist() for m in matrices]
                                               for policy, matrices in kept_by_policy.items()})
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
