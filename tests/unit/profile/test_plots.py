"""dsk.profile.plots: the PNGs are real images with content, and the heatmap's numbers match a hand computation."""

import math
import sys

import pytest

from dsk.profile import plots

pytest.importorskip("matplotlib")

LOADS = {"layers.1": [10, 30, 20, 40], "layers.2": [25, 25, 25, 25], "mtp.0": [3, 1]}


def _read_png(path):
    """The image as a float array (rows, cols, channels), after checking the PNG signature."""
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def _assert_drawn(path, min_w=300, min_h=150):
    img = _read_png(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h
    assert img[..., :3].std() > 0.05  # not a blank canvas: bars, cells and text differ from the white background
    return img


def test_expert_load_ratios_match_a_hand_computation():
    r = plots.expert_load_ratios(LOADS)
    assert r.layers == ["layers.1", "layers.2", "mtp.0"]
    # layers.1: mean 25 -> 0.4, 1.2, 0.8, 1.6, MaxVio 40/25 - 1 = 0.6; layers.2 balanced; mtp.0: mean 2 -> 1.5, 0.5
    assert r.ratios[0] == pytest.approx([0.4, 1.2, 0.8, 1.6])
    assert r.ratios[1] == pytest.approx([1.0] * 4)
    assert r.ratios[2][:2] == pytest.approx([1.5, 0.5]) and all(math.isnan(v) for v in r.ratios[2][2:])
    assert r.maxvio == pytest.approx([0.6, 0.0, 0.5])


def test_a_layer_that_routed_nothing_is_nan_not_a_division_error():
    r = plots.expert_load_ratios({"layers.1": [0, 0, 0], "layers.2": [1, 2, 3]})
    assert all(math.isnan(v) for v in r.ratios[0]) and math.isnan(r.maxvio[0])
    assert r.maxvio[1] == pytest.approx(0.5)


def test_bad_expert_loads_name_the_layer():
    with pytest.raises(ValueError, match="layers.3"):
        plots.expert_load_ratios({"layers.3": [1, -2]})
    with pytest.raises(ValueError, match="no layer"):
        plots.expert_load_ratios({})


def test_heatmap_writes_the_maxvio_of_each_row_at_the_right(tmp_path):
    path = plots.expert_load_heatmap(LOADS, tmp_path / "sub" / "load.png", "expert load")
    assert path == tmp_path / "sub" / "load.png"
    img = _assert_drawn(path)
    w, h = plots._heatmap_size(3, 4)
    assert img.shape[:2] == (int(h * plots.DPI), int(w * plots.DPI))
    # the same figure, drawn again: its right-hand tick labels are the MaxVio values computed above
    fig = plots._figure(w, h)
    plots._draw_heatmap(fig, plots.expert_load_ratios(LOADS), "expert load")
    fig.canvas.draw()
    heat, right = fig.axes[0], fig.axes[0].child_axes[0]
    assert [t.get_text() for t in right.get_yticklabels()] == ["0.600", "0.000", "0.500"]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["layers.1", "layers.2", "mtp.0"]
    assert "1.0 = balanced" in fig.axes[1].get_ylabel()


def test_heatmap_grows_with_layers_and_experts(tmp_path):
    small = _read_png(plots.expert_load_heatmap(LOADS, tmp_path / "a.png", "t"))
    big_loads = {f"layers.{i}": [(i * e) % 7 + 1 for e in range(32)] for i in range(12)}
    big = _assert_drawn(plots.expert_load_heatmap(big_loads, tmp_path / "b.png", "t"))
    assert big.shape[0] > small.shape[0] and big.shape[1] > small.shape[1]


def test_component_times_single_and_grouped(tmp_path):
    one = {"mla": {"attention": 0.012, "routed_experts": 0.02, "optimizer": 0.004, "other": 0.001}}
    _assert_drawn(plots.component_times(one, tmp_path / "one.png", "time per step"))
    two = {**one, "mha": {"attention": 0.018, "routed_experts": 0.021, "communication": 0.002}}
    img = _assert_drawn(plots.component_times(two, tmp_path / "two.png", "time per step"))
    # the second recipe's colour (matplotlib's second default, orange) is drawn; the first figure has none of it
    orange = (abs(img[..., 0] - 1.0) < 0.02) & (abs(img[..., 1] - 0.498) < 0.02) & (img[..., 2] < 0.1)
    assert orange.sum() > 100
    first = _read_png(tmp_path / "one.png")
    assert ((abs(first[..., 0] - 1.0) < 0.02) & (abs(first[..., 1] - 0.498) < 0.02) & (first[..., 2] < 0.1)).sum() == 0


def _timeline(ranks=2, chunks=3):
    items, t = [], 0.0
    for rank in range(ranks):
        t = 0.001 * rank
        for c in range(chunks):
            for kind, d in (("F", 0.002), ("B", 0.003), ("W", 0.001)):
                items.append({"rank": rank, "kind": kind, "stage": rank, "chunk": c, "start": t, "end": t + d})
                t += d
    return items


def test_pipeline_timeline_is_drawn_with_bubbles_and_grows_with_ranks(tmp_path):
    two = _assert_drawn(plots.pipeline_timeline(_timeline(2), tmp_path / "p2.png", "1f1b", bubble=[0.1, 0.25]))
    # a bubble list may be short or hold a None (a rank that recorded nothing): those ranks get no idle figure
    four = _assert_drawn(plots.pipeline_timeline(_timeline(4), tmp_path / "p4.png", "1f1b", bubble=[0.1, None]))
    assert four.shape[0] > two.shape[0]


def test_pipeline_timeline_names_a_malformed_item(tmp_path):
    with pytest.raises(ValueError, match="item 1"):
        plots.pipeline_timeline([_timeline()[0], {"rank": 0, "kind": "F"}], tmp_path / "p.png", "t")


def test_no_pyplot_figure_is_left_open(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.expert_load_heatmap(LOADS, tmp_path / "a.png", "t")
    plots.component_times({"r": {"a": 1.0}}, tmp_path / "b.png", "t")
    plots.pipeline_timeline(_timeline(), tmp_path / "c.png", "t")
    assert plt.get_fignums() == before


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    for call in (
        lambda: plots.expert_load_heatmap(LOADS, tmp_path / "a.png", "t"),
        lambda: plots.component_times({"r": {"a": 1.0}}, tmp_path / "b.png", "t"),
        lambda: plots.pipeline_timeline(_timeline(), tmp_path / "c.png", "t"),
    ):
        with pytest.raises(ImportError, match=r"pip install 'dsk\[profile\]'"):
            call()
    assert not list(tmp_path.iterdir())


def test_importing_the_module_imports_no_matplotlib():
    import subprocess

    code = "import sys, dsk.profile.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
