import pytest
import torch
import torch.nn.functional as F

from clibd.plots import accuracy_by_key_count, plot_accuracy_by_key_count, plot_umap


def test_accuracy_binned_by_key_count(tmp_path):
    true = ["a", "a", "b", "c", "c", "d"]
    predicted = ["a", "x", "b", "x", "x", "d"]
    counts = {"a": 1, "b": 4, "c": 4, "d": 30}
    rows = {name: (n, acc) for name, n, acc in accuracy_by_key_count(true, predicted, counts)}
    assert rows["1"] == (1, 0.5)            # species a: 1 of 2 right
    assert rows["3-5"] == (2, 0.5)          # b: 1.0, c: 0.0 -> mean 0.5
    assert rows[">20"] == (1, 1.0)
    assert rows["0"][0] == 0
    plot_accuracy_by_key_count(true, predicted, counts, tmp_path / "keys.png")
    assert (tmp_path / "keys.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_umap_plot_separates_clusters(tmp_path):
    pytest.importorskip("umap", reason="pip install 'clibd[plots]' brings umap-learn")
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(2, 16), dim=-1)
    points = F.normalize(torch.cat([centres[0] + 0.05 * torch.randn(30, 16), centres[1] + 0.05 * torch.randn(30, 16)]),
                         dim=-1)
    labels = ["Diptera"] * 30 + ["Coleoptera"] * 30
    xy = plot_umap(points, labels, tmp_path / "umap.png")
    assert xy.shape == (60, 2) and (tmp_path / "umap.png").stat().st_size > 1000
    a, b = xy[:30].mean(axis=0), xy[30:].mean(axis=0)
    spread = max(xy[:30].std(axis=0).max(), xy[30:].std(axis=0).max())
    assert ((a - b) ** 2).sum() ** 0.5 > 2 * spread


def test_attention_plot_lays_each_map_over_the_photo(tmp_path):
    from clibd.plots import plot_attention

    photo = torch.rand(3, 32, 32)
    grid = torch.zeros(4, 4)
    grid[0, 0] = 1.0
    plot_attention(photo, {"unaligned": torch.rand(4, 4), "aligned": grid}, tmp_path / "attention.png")
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"image must be a \[3, H, W\] tensor"):
        plot_attention(torch.rand(32, 32), {"aligned": grid}, tmp_path / "bad.png")
