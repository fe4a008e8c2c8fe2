"""Router statistics for diffusion (issues 11 and 15): per layer, by timestep bin and spacetime
position, the change fraction between sampler calls, the trainer's TensorBoard and the report.

References are computed here by plain Python loops over a hand-written expert assignment, never
through sparse_dit.moe.routing_stats.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_dit.diffusion import sample
from sparse_dit.dit import SparseDiT
from sparse_dit.evals.routing import plot_routing, routing_markdown
from sparse_dit.moe.routers import Routing
from sparse_dit.moe.routing_stats import RoutingCollector, RoutingStats, StepRouting
from sparse_dit.moe.stats import MoEAux
from sparse_dit.presets import preset_config
from sparse_dit.recipes.tb import add_routing, heatmap_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _routing(idx: list[list[int]], E: int, probs: torch.Tensor | None = None, token_idx: list[list[int]] | None = None) -> Routing:
    """A hand-made Routing: expert_idx as given (E = dropped)."""
    e = torch.tensor(idx, dtype=torch.long)
    T = e.shape[0] if token_idx is None else int(torch.tensor(token_idx).max()) + 1
    if probs is None:
        probs = torch.full((T, E), 1.0 / E)
    counts = torch.bincount(e[e < E], minlength=E).float()
    return Routing(e, torch.ones(e.shape), None if token_idx is None else torch.tensor(token_idx), probs.log(), probs, counts,
                   (e == E).sum().float(), e.numel(), True)


def test_stats_match_a_hand_computed_reference():
    B, grid, E, S, G = 2, (2, 2, 2), 3, 4, 2  # N = 8 tokens per sample: 2 frames of 2x2
    N = 8
    idx = [[0, 1], [1, 2], [2, 0], [0, 1], [0, 3], [1, 0], [1, 2], [2, 1],   # sample 0 (3 = dropped)
           [0, 2], [0, 1], [0, 2], [1, 0], [0, 1], [2, 1], [0, 2], [0, 1]]   # sample 1
    probs = torch.softmax(torch.randn(B * N, E, generator=torch.Generator().manual_seed(0)), -1)
    t = torch.tensor([0.1, 0.8])
    stats = RoutingStats(1, E, timestep_bins=S, regions=G)
    stats.add(0, _routing(idx, E, probs), t, grid)

    load, by_bin, by_frame, by_region, dropped = [0] * E, [[0] * E for _ in range(S)], [[0] * E for _ in range(2)], \
        [[0] * E for _ in range(4)], 0
    for b in range(B):
        for n in range(N):
            frame, row, col = n // 4, (n % 4) // 2, n % 2
            for e in idx[b * N + n]:
                if e == E:
                    dropped += 1
                    continue
                load[e] += 1
                by_bin[min(int(float(t[b]) * S), S - 1)][e] += 1
                by_frame[frame][e] += 1
                by_region[row * G + col][e] += 1  # a 2x2 token grid cut 2x2: one token per cell
    p = probs.tolist()
    entropy = sum(-sum(x * math.log(x) for x in row) for row in p) / len(p)
    s = stats.summary()
    lay = s["layers"][0]
    assert lay["load"] == load and s["load_by_timestep_bin"][0] == by_bin
    assert s["load_by_frame"][0] == by_frame and s["load_by_region"][0] == by_region
    assert lay["max_violation"] == pytest.approx(max(load) / (sum(load) / E) - 1)
    assert lay["router_entropy"] == pytest.approx(entropy, rel=1e-6)
    assert lay["dropped_fraction"] == pytest.approx(dropped / 32)
    assert lay["load_fraction"] == pytest.approx([x / sum(load) for x in load])
    assert s["max_violation_by_timestep_bin"][0][1] == 0.0  # an empty bin has no imbalance
    assert s["max_violation_by_timestep_bin"][0][0] == pytest.approx(max(by_bin[0]) / (sum(by_bin[0]) / E) - 1)
    assert lay["change_fraction"] is None  # one call: nothing to compare


def test_expert_choice_routes_with_token_idx_and_coarse_regions():
    # expert choice: each expert lists its tokens; B=1, grid (1, 4, 4) -> 16 tokens, regions 2x2
    E, grid = 2, (1, 4, 4)
    token_idx = [[0, 5, 10, 15], [3, 5, 12, 1]]
    r = _routing([[0, 0, 0, 0], [1, 1, 1, 1]], E, torch.full((16, E), 0.5), token_idx)
    stats = RoutingStats(1, E, timestep_bins=2, regions=2)
    stats.add(0, r, torch.tensor([0.6]), grid)
    region = [[0] * E for _ in range(4)]
    for e, toks in enumerate(token_idx):
        for tok in toks:
            row, col = tok // 4, tok % 4
            region[(row // 2) * 2 + col // 2][e] += 1
    s = stats.summary()
    assert s["load_by_region"][0] == region and s["layers"][0]["load"] == [4, 4]
    assert s["load_by_timestep_bin"][0] == [[0, 0], [4, 4]]


def test_change_fraction_on_two_constructed_steps():
    E, grid, t1, t2 = 3, (1, 2, 2), torch.tensor([0.9]), torch.tensor([0.6])
    step1 = [[0, 1], [1, 2], [2, 0], [0, 1]]
    step2 = [[1, 0], [1, 2], [2, 1], [0, 3]]  # token 0 same set (order swapped), 1 same, 2 changed, 3 lost a route
    stats = RoutingStats(2, E)
    stats.add(0, _routing(step1, E), t1, grid)
    stats.add(1, _routing(step1, E), t1, grid)
    stats.add(0, _routing(step2, E), t2, grid)
    stats.add(1, _routing(step1, E), t2, grid)  # layer 1 keeps its assignment
    s = stats.summary()
    assert s["layers"][0]["change_fraction"] == pytest.approx(2 / 4)
    assert s["layers"][1]["change_fraction"] == 0.0
    assert s["change_fraction"] == pytest.approx(2 / 8)
    stats.new_sequence()  # a new sampling run is never compared with the last one
    stats.add(0, _routing(step1, E), t1, grid)
    assert stats.summary()["layers"][0]["change_fraction"] == pytest.approx(2 / 4)
    stats.add(0, _routing(step1, E), t2, grid, branch=1)  # CFG branch 1 has no previous call yet
    assert stats.summary()["layers"][0]["change_fraction"] == pytest.approx(2 / 4)


def _tiny_model() -> SparseDiT:
    torch.manual_seed(0)
    cfg = preset_config("debug-E4A2")
    cfg = dataclasses.replace(cfg, text_dim=0, cross_attention=False)
    model = SparseDiT(cfg).eval()
    with torch.no_grad():  # open adaLN-Zero's gates so the blocks (and the routing) depend on t
        for block in model.blocks:
            block.adaLN_modulation[-1].bias.normal_(std=0.5)
    return model


def test_collector_hooks_the_real_sampler_and_agrees_with_the_layer():
    model = _tiny_model()
    shape, steps = (2, 3, 2, 8, 8), 3
    with RoutingCollector(model) as rc:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        _, aux = model(x, torch.tensor([0.3, 0.7]), return_aux=True)
        one = rc.stats.load.clone(), rc.stats.entropy_sum / rc.stats.tokens
        sample(model, shape, num_inference_steps=steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(2))
        sample(model, shape, num_inference_steps=steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(3))
    assert not model._forward_pre_hooks and all(not m.router._forward_hooks for m in rc.layers)  # removed on exit
    # the first forward: the same loads and entropy as the layer's own MoEAux
    for i, a in enumerate(aux.moe):
        assert one[0][i].tolist() == a.tokens_per_expert.tolist()
        assert float(one[1][i]) == pytest.approx(float(a.router_entropy), rel=1e-5)
    s = rc.summary()
    T, K = 2 * 2 * 4 * 4, 2
    calls = 1 + 2 * 2 * steps  # one forward + two sampling runs of `steps` steps x 2 CFG branches
    assert s["calls"] == calls and [lay["layer"] for lay in s["layers"]] == ["block0", "block1"]
    for i, lay in enumerate(s["layers"]):
        assert sum(lay["load"]) == calls * T * K  # dropless
        assert np.sum(s["load_by_frame"][i]) == np.sum(s["load_by_region"][i]) == np.sum(s["load_by_timestep_bin"][i]) == calls * T * K
        # per run and CFG branch, steps - 1 comparisons; the forward before and each new run start fresh
        assert rc.stats.compared[i] == 2 * 2 * (steps - 1) * T
        assert 0.0 <= lay["change_fraction"] <= 1.0
    with RoutingCollector(SparseDiT(preset_config("debug"))) as dense:
        pass
    assert dense.summary() is None


def _collapsed() -> StepRouting:
    # 4 layers, 4 experts: each layer sends every token to a different expert. Summed over layers
    # the load is perfectly even; per layer it is a total collapse.
    load = torch.eye(4, dtype=torch.float64) * 64
    tl = torch.zeros(4, 2, 4, dtype=torch.float64)
    tl[:, 0] = load / 2
    tl[:, 1] = load / 2
    return StepRouting(load, torch.zeros(4, dtype=torch.float64), 1.0, tl)


def test_collapse_in_one_layer_shows_per_layer_and_is_hidden_by_a_sum():
    r = _collapsed()
    assert r.max_violation.tolist() == [3.0] * 4  # E - 1: everything on one expert
    total = r.load.sum(0)
    assert float(total.max() / total.mean() - 1) == 0.0  # what a layer sum would report
    # the same through the sampling accumulator
    stats = RoutingStats(2, 2)
    stats.add(0, _routing([[0]] * 4, 2), torch.tensor([0.5]), (1, 2, 2))
    stats.add(1, _routing([[1]] * 4, 2), torch.tensor([0.5]), (1, 2, 2))
    s = stats.summary()
    assert [lay["max_violation"] for lay in s["layers"]] == [1.0, 1.0] and s["max_violation_worst"] == 1.0
    assert s["max_violation_of_layer_sum"] == 0.0


def test_step_routing_from_aux_adds_and_round_trips_a_pack():
    def aux(load, ent, bins):
        z = torch.zeros(())
        return MoEAux(z, z, z, torch.tensor(load), z, torch.tensor(ent), z, torch.tensor(bins))
    a = StepRouting.from_aux([aux([1.0, 3.0], 0.5, [[1.0, 1.0], [0.0, 2.0]]), aux([2.0, 2.0], 0.7, [[2.0, 0.0], [0.0, 2.0]])])
    b = a + a
    assert b.load.tolist() == [[2, 6], [4, 4]] and b.forwards == 2.0
    assert b.router_entropy.tolist() == pytest.approx([0.5, 0.7])
    assert b.timestep_load[1].tolist() == [[4, 0], [0, 4]]
    c = b.unpack(b.pack() * 1.0)
    assert torch.equal(c.load, b.load) and torch.equal(c.timestep_load, b.timestep_load) and c.forwards == 2.0
    assert StepRouting.from_aux([]) is None


def test_heatmap_image_colours():
    img = heatmap_image(np.array([[0.0, 2.0, 5.0]]), vmax=2.0, cell=4, gap=1)
    assert img.shape == (1 * 5 + 1, 3 * 5 + 1, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [255, 255, 255]  # gap
    assert img[2, 2].tolist() == [68, 1, 84]  # viridis(0)
    assert img[2, 7].tolist() == [253, 231, 37] == img[2, 12].tolist()  # viridis(1), clipped above vmax


def test_tensorboard_routing_reads_back_per_layer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    add_routing(w, _collapsed(), step=7)
    w.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for i in range(4):
        assert acc.Scalars(f"moe/layer{i}/max_violation")[-1].value == 3.0
        assert acc.Scalars(f"moe/layer{i}/router_entropy")[-1].step == 7
        hist = acc.Histograms(f"moe/layer{i}/tokens_per_expert")[-1].histogram_value
        assert list(hist.bucket) == [64.0 if e == i else 0.0 for e in range(4)]
    assert {"moe/load_layer_x_expert", "moe/load_expert_x_timestep_bin"} <= set(tags["images"])
    png = acc.Images("moe/load_layer_x_expert")[-1].encoded_image_string
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    cell = 12 + 1
    for i in range(4):  # the collapsed expert of each layer is bright (>= 2x mean), the others dark
        for e in range(4):
            px = img[1 + i * cell + 6, 1 + e * cell + 6].tolist()
            assert px == ([253, 231, 37] if e == i else [68, 1, 84]), (i, e, px)


def _report_with_routing() -> dict:
    stats = RoutingStats(2, 2, timestep_bins=2, regions=2, layer_names=["block0", "block1"])
    stats.add(0, _routing([[0]] * 8, 2), torch.tensor([0.2, 0.9]), (1, 2, 2))
    stats.add(1, _routing([[0], [1]] * 4, 2), torch.tensor([0.2, 0.9]), (1, 2, 2))
    return {"models": {"dense": {"routing": None}, "sparse": {"routing": stats.summary()}}, "headline_split": "id"}


def test_report_has_the_routing_section_and_pngs(tmp_path):
    report = _report_with_routing()
    text = routing_markdown(report)
    assert "## Routing" in text and "### sparse" in text and "### dense" not in text
    for heading in ("max violation", "router entropy", "changed", "Max violation by timestep bin", "by token frame", "by spatial region"):
        assert heading in text, heading
    assert "| block0 | 1.000 | 0.000 | 1.000 |" in text  # layer 0 collapsed: load 1/0, max violation E - 1 = 1
    assert "| block1 | 0.500 | 0.500 | 0.000 |" in text
    paths = plot_routing(report, tmp_path)
    assert sorted(p.name for p in paths) == ["routing_sparse_expert_x_timestep.png", "routing_sparse_layer_x_expert.png",
                                             "routing_sparse_spacetime.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(p).size[0] > 200
        assert f"]({p.name})" in text
    assert routing_markdown({"models": {"dense": {"routing": None}}}) == ""
    json.dumps(report)  # plain Python, JSON-ready
