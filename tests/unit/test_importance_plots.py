"""importance.plots: valid PNGs, atomic writes, no leaked figures, clear errors on bad input."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # before pyplot: the tests only read figure counts and images, never show
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_prune.importance.plots import (plot_head_heatmap, plot_layer_curves,  # noqa: E402
                                             plot_neuron_distributions)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
L, H, F = 6, 8, 64


def _curves(n_layers: int = L, k: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"block_importance": torch.rand(n_layers, generator=g),
            "lm_loss_increase_layer": torch.rand(n_layers, generator=g),
            "lm_loss_increase_block": torch.rand(n_layers - k + 1, generator=g),
            "mc_acc_block": torch.rand(n_layers - k + 1, generator=g),
            "unrelated": torch.zeros(3)}


def _check_png(path: str, returned: str) -> tuple[int, int]:
    assert returned == path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = mpimg.imread(path)  # [rows, cols, channels]
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # No temp file is left beside the output.
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
    assert plt.get_fignums() == []
    return image.shape[:2]


def test_head_heatmap_writes_png_into_new_dirs(tmp_path):
    heads = torch.rand(L, H, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "a" / "b" / "heads.png")
    rows, cols = _check_png(path, plot_head_heatmap(heads, path, query_groups=2))
    assert cols > rows  # 8 heads across, 6 layers down: wider than tall at these sizes


def test_head_heatmap_bytes_follow_the_data(tmp_path):
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(L, H, generator=g), torch.rand(L, H, generator=g)
    pa, pb, pa2 = (plot_head_heatmap(t, str(tmp_path / n)) for t, n in
                   ((a, "a.png"), (b, "b.png"), (a, "a2.png")))
    data = [open(p, "rb").read() for p in (pa, pb, pa2)]
    assert data[0] != data[1]
    assert data[0] == data[2]  # same data, same picture: the output is deterministic
    assert plt.get_fignums() == []


def test_head_heatmap_overwrites_existing_file(tmp_path):
    path = tmp_path / "heads.png"
    path.write_bytes(b"old")
    plot_head_heatmap(torch.rand(2, 4), str(path))
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_neuron_distributions_log_and_linear(tmp_path):
    g = torch.Generator().manual_seed(3)
    positive = torch.rand(L, F, generator=g).exp()  # all > 0: log scale
    signed = torch.randn(L, F, generator=g)  # has negatives: linear scale
    single = torch.rand(1, F, generator=g)  # one layer still draws
    for name, t in (("pos", positive), ("signed", signed), ("single", single)):
        out = tmp_path / name
        path = str(out / "neurons.png")
        _check_png(path, plot_neuron_distributions(t, path))


def test_layer_curves_all_metrics(tmp_path):
    path = str(tmp_path / "curves.png")
    rows_all, _ = _check_png(path, plot_layer_curves(_curves(k=2), path, block_size=2))
    only_bi = str(tmp_path / "bi" / "curves.png")
    rows_one, _ = _check_png(only_bi, plot_layer_curves({"block_importance": torch.rand(L)}, only_bi))
    assert rows_all > rows_one  # one stacked panel per metric present


@pytest.mark.parametrize("call, name", [
    (lambda p: plot_head_heatmap(torch.rand(H), p), "heads"),
    (lambda p: plot_head_heatmap(torch.rand(2, 3, 4), p), "heads"),
    (lambda p: plot_head_heatmap(torch.empty(0, H), p), "heads"),
    (lambda p: plot_head_heatmap(torch.rand(L, H), p, query_groups=3), "query_groups"),
    (lambda p: plot_head_heatmap(torch.rand(L, H), p, query_groups=0), "query_groups"),
    (lambda p: plot_neuron_distributions(torch.rand(F), p), "neurons"),
    (lambda p: plot_layer_curves({"unrelated": torch.rand(L)}, p), "block_importance"),
    (lambda p: plot_layer_curves({}, p), "curves"),
    (lambda p: plot_layer_curves({"block_importance": torch.rand(L, 2)}, p), "block_importance"),
    (lambda p: plot_layer_curves(_curves(k=2), p, block_size=3), "block_size=3"),
    (lambda p: plot_layer_curves(_curves(), p, block_size=0), "block_size"),
])
def test_bad_input_names_the_argument(tmp_path, call, name):
    path = tmp_path / "out" / "x.png"
    with pytest.raises(ValueError, match=name):
        call(str(path))
    assert not path.exists()  # checked before any work: nothing is written
    assert plt.get_fignums() == []


def test_non_finite_names_argument_and_first_index(tmp_path):
    neurons = torch.rand(L, F)
    neurons[2, 5] = float("nan")
    neurons[4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"neurons.*\(2, 5\)"):
        plot_neuron_distributions(neurons, str(tmp_path / "n.png"))
    heads = torch.rand(L, H)
    heads[0, 7] = float("-inf")
    with pytest.raises(ValueError, match=r"heads.*\(0, 7\)"):
        plot_head_heatmap(heads, str(tmp_path / "h.png"))
    curves = {"mc_acc_block": torch.tensor([0.5, float("nan"), 0.2])}
    with pytest.raises(ValueError, match=r"mc_acc_block.*index 1"):
        plot_layer_curves(curves, str(tmp_path / "c.png"))
    assert list(tmp_path.iterdir()) == []
