"""Pictures of importance scores: plain tensors in, PNG files out.

Figures are built with the object-oriented API (`matplotlib.figure.Figure`, rendered by Agg when
saved), never through pyplot: nothing is registered in pyplot's figure manager, so no window can open,
no figure leaks, and the caller's selected backend (a notebook's, say) is left alone.
"""
from __future__ import annotations

import os
import uuid
from typing import Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 120

# key -> (y label, which extreme is the best candidate to drop, is it indexed by block?)
LAYER_CURVES = {
    "block_importance": ("Block Importance (1 - cos)", "min", False),
    "lm_loss_increase_layer": ("loss increase (layer dropped)", "min", False),
    "lm_loss_increase_block": ("loss increase (block dropped)", "min", True),
    "mc_acc_block": ("MC accuracy (block dropped)", "max", True),
}


def _as_array(x: torch.Tensor, name: str, ndim: int) -> np.ndarray:
    """Checked float64 copy of `x`; the error names the argument and, for NaN/Inf, the first bad index."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(x.shape)})")
    arr = x.detach().double().cpu().numpy()
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        index = tuple(int(i) for i in bad[0])
        raise ValueError(f"{name}: non-finite value {arr[index]} at index {index[0] if ndim == 1 else index}")
    return arr


def _clip(value: float, low: float, high: float) -> float:
    return float(min(max(value, low), high))


def _save(fig: Figure, path: str) -> str:
    """Write to a temp file beside `path`, then rename: a reader never sees a half-written PNG."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def plot_head_heatmap(heads: torch.Tensor, path: str, *, query_groups: Optional[int] = None,
                      title: str = "Attention-head importance") -> str:
    """Heatmap of `heads` [L, H]: layers down (layer 0 at the top), heads across, with a colorbar.
    With `query_groups` G, thin lines separate the G groups of H/G consecutive heads (megatron order)."""
    arr = _as_array(heads, "heads", 2)  # [L, H]
    n_layers, n_heads = arr.shape
    if query_groups is not None:
        if isinstance(query_groups, bool) or not isinstance(query_groups, int) or query_groups < 1 \
                or n_heads % query_groups:
            raise ValueError(f"query_groups={query_groups!r}: must be a positive integer dividing "
                             f"the number of heads H={n_heads}")
    fig = Figure(figsize=(_clip(3 + 0.3 * n_heads, 5, 14), _clip(1.5 + 0.25 * n_layers, 3, 12)),
                 layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(arr, aspect="auto", interpolation="nearest", origin="upper", cmap="viridis")
    fig.colorbar(image, ax=ax, label="importance")
    if query_groups is not None and query_groups > 1:
        group = n_heads // query_groups
        for g in range(1, query_groups):  # cell edges sit at half-integers
            ax.axvline(g * group - 0.5, color="white", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("head" if query_groups is None else f"head ({query_groups} query groups)")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return _save(fig, path)


def plot_neuron_distributions(neurons: torch.Tensor, path: str, *,
                              title: str = "MLP-neuron importance") -> str:
    """One box per layer of the scores in `neurons` [L, F]: box 25-75 %, median line, whiskers 5-95 %.
    Outliers are not drawn: F is in the thousands, and the whiskers already show the spread."""
    arr = _as_array(neurons, "neurons", 2)  # [L, F]
    n_layers = arr.shape[0]
    fig = Figure(figsize=(_clip(3 + 0.3 * n_layers, 5, 14), 4), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot(list(arr), positions=np.arange(n_layers), whis=(5, 95), showfliers=False,
               widths=0.6, manage_ticks=False)
    if arr.min() > 0:  # scores span decades; a log scale needs every value positive
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.7, n_layers - 0.3)
    ax.set_xlabel("layer")
    ax.set_ylabel("neuron importance (box 25-75 %, whiskers 5-95 %)")
    ax.set_title(title)
    return _save(fig, path)


def plot_layer_curves(curves: dict[str, torch.Tensor], path: str, *, block_size: int = 1,
                      title: str = "Layer importance") -> str:
    """One panel per known metric in `curves` (see LAYER_CURVES; other keys are ignored), sharing the x
    axis (layer, or first layer of the dropped block), each marking its best-to-drop entry."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be a positive integer")
    present = [key for key in LAYER_CURVES if key in curves]
    if not present:
        raise ValueError(f"curves: none of the keys {', '.join(LAYER_CURVES)} is present "
                         f"(got {sorted(map(str, curves)) or 'an empty dict'})")
    arrays = {key: _as_array(curves[key], f"curves[{key!r}]", 1) for key in present}
    # Per-layer curves have L entries, per-block ones L - k + 1: they must agree on L.
    lengths = {key: len(a) + (block_size - 1 if LAYER_CURVES[key][2] else 0) for key, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"curves: the metrics imply different layer counts {lengths} "
                         f"(block metrics have L - block_size + 1 entries, block_size={block_size})")

    n_layers = max(lengths.values())
    fig = Figure(figsize=(_clip(3 + 0.25 * n_layers, 6, 14), 0.8 + 2.2 * len(present)),
                 layout="constrained")
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, present):
        label, best, by_block = LAYER_CURVES[key]
        y = arrays[key]  # [L] or [L - k + 1]
        x = np.arange(len(y))
        j = int(np.argmin(y) if best == "min" else np.argmax(y))
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.2)
        span = by_block and block_size > 1
        ax.plot(x[j], y[j], marker="*", markersize=14, color="tab:red", linestyle="none",
                label=f"best to drop: {f'layers {j}-{j + block_size - 1}' if span else f'layer {j}'}")
        if span:  # shade the whole block that would go
            ax.axvspan(j - 0.5, j + block_size - 0.5, color="tab:red", alpha=0.12)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    block_flags = [LAYER_CURVES[key][2] for key in present]
    xlabel = "first layer of the block" if all(block_flags) else "layer, or first layer of the block"
    blocks_shown = block_size > 1 and any(block_flags)
    axes[-1].set_xlabel(f"{xlabel} (block_size={block_size})" if blocks_shown else "layer")
    fig.suptitle(title)
    return _save(fig, path)
