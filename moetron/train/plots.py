"""Plots of a run, drawn from its metrics.jsonl with matplotlib's Agg backend (no display needed).

- ``loss.png``: training loss per step (raw, faint, and an exponential moving average) and validation loss.
- ``expert_load.png``: one heatmap per MoE layer: the tokens each expert received in each log interval, divided by
  the balanced share (T·K/E); white is balanced, red overloaded (2x and above), blue starved.
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["read_metrics", "plot_loss", "plot_expert_load", "plot_run"]


def read_metrics(path: str) -> list[dict]:
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a crash
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ema(values, alpha=0.05):
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def plot_loss(records: list[dict], path: str, title: str = "") -> None:
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        s, l = zip(*train)
        ax.plot(s, l, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(s, _ema(l), color="tab:blue", linewidth=1.5, label="train (EMA)")
    if val:
        s, l = zip(*val)
        ax.plot(s, l, color="tab:orange", marker="o", markersize=3, linewidth=1.5, label="validation")
        ax.annotate(f"{l[-1]:.3f}", (s[-1], l[-1]), textcoords="offset points", xytext=(-10, 8), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_expert_load(records: list[dict], path: str, title: str = "") -> None:
    plt = _pyplot()
    moe = [r for r in records if r.get("kind") == "moe" and r.get("layers")]
    if not moe:
        fig, ax = plt.subplots(figsize=(6, 2), dpi=110)
        ax.text(0.5, 0.5, "no MoE statistics recorded yet", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path)
        plt.close(fig)
        return
    layer_ids = [l["layer"] for l in moe[0]["layers"]]
    n = len(layer_ids)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.0, 2.6 * rows + 0.5), dpi=110, squeeze=False,
                             layout="constrained")
    steps = [r["step"] for r in moe]
    im = None
    for j, layer in enumerate(layer_ids):
        ax = axes[j // cols][j % cols]
        loads = []  # per log interval: each expert's tokens / the balanced share (1.0 = balanced)
        for r in moe:
            counts = next((l["tokens_per_expert"] for l in r["layers"] if l["layer"] == layer), None) or []
            total = sum(counts)
            loads.append([c * len(counts) / total if total else float("nan") for c in counts])
        E = max(len(c) for c in loads)
        grid = [[c[e] if e < len(c) else float("nan") for c in loads] for e in range(E)]
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="RdBu_r", origin="lower", vmin=0.0,
                       vmax=2.0, extent=(-0.5, len(steps) - 0.5, -0.5, E - 0.5))
        ticks = sorted({0, len(steps) // 2, len(steps) - 1})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[t]) for t in ticks])
        if E <= 16:
            ax.set_yticks(range(E))
        ax.tick_params(labelsize=7)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title or "expert load (tokens / balanced share)", fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.9, label="load (1 = balanced)")
    fig.savefig(path)
    plt.close(fig)


def plot_run(run_dir: str) -> list[str]:
    """Redraw both plots of a run; returns the files written."""
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    name = os.path.basename(os.path.normpath(run_dir))
    loss_png = os.path.join(run_dir, "loss.png")
    load_png = os.path.join(run_dir, "expert_load.png")
    plot_loss(records, loss_png, f"{name}: loss")
    plot_expert_load(records, load_png, f"{name}: tokens per expert per log interval, relative to a balanced "
                     "share")
    return [loss_png, load_png]
