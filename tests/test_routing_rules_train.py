"""Batch-level routing and noise-level experts through the library trainer (issue 11).

Two launches of the trainer (``sparse_dit.recipes.train.train``, the tiny MoE recipe, fp32):

* one process: ``router: batch`` trains and estimates its inference threshold; ``router:
  noise_level`` trains both ranges, then a second run starts from its ``final/`` with
  ``train.init_from`` and ``train.noise_range: 1`` and must leave everything range 0 uses
  bitwise unchanged while range 1's experts learn;
* two ranks: both rules with EP=1 (data parallel) and EP=2 (experts sharded, all-to-all):
  the same losses, outputs and thresholds. Batch routing pools each rank's own micro-batch
  before the all-to-all, so the pools are the same tokens under EP=1 and EP=2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from _launch import TINY_MOE, launch

FAST = ["train.global_batch_size=4", "train.lr=0.003", "train.warmup_steps=1", "parallel.precision=fp32", "train.save_every=1000",
        "train.max_steps=2"]
NOISE = ["model.moe.router=noise_level", "model.moe.noise_boundaries=[0.5]"]


def _fixed_input(cfg):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, cfg.in_channels, 6, 12, 12, generator=g)
    text = torch.randn(2, 5, cfg.text_dim, generator=g)
    return x, torch.tensor([0.8, 0.3]), text  # one sample per noise range


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Workers (python tests/test_routing_rules_train.py single|ep OUT)
# --------------------------------------------------------------------------------------------


def _single_worker(out: Path) -> None:
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.train import train

    torch.set_num_threads(1)
    train(load_recipe(TINY_MOE, FAST + ["model.moe.router=batch", "train.max_steps=3", f"output_dir={out}/batch"]))
    train(load_recipe(TINY_MOE, FAST + NOISE + [f"output_dir={out}/noise"]))
    seen = {}

    def at_end(engine, ema, info):
        seen["live"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        seen["trainable"] = sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)

    train(load_recipe(TINY_MOE, FAST + NOISE + ["train.noise_range=1", f"train.init_from={out}/noise", "train.max_steps=3",
                                                f"output_dir={out}/noise_r1"]), {"at_end": at_end})
    torch.save(seen, out / "noise_r1.pt")


def _ep_worker(out: Path) -> None:
    import torch.distributed as dist

    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.train import train

    torch.set_num_threads(1)
    res = {}
    for name, extra in (("batch", ["model.moe.router=batch"]), ("noise", NOISE)):
        for ep in (1, 2):
            def at_end(engine, ema, info, key=f"{name}_ep{ep}"):
                model = engine.module.eval()
                x, t, text = _fixed_input(model.config)
                with torch.no_grad():
                    out_ = model(x, t, text_emb=text).float()
                thr = [b.detach().clone() for n, b in model.named_buffers() if n.endswith("router.threshold")]
                every = [None] * dist.get_world_size()
                dist.all_gather_object(every, thr)
                res[key] = {"out": out_, "thresholds": every}

            train(load_recipe(TINY_MOE, FAST + extra + [f"parallel.ep_size={ep}", f"output_dir={out}/{name}_ep{ep}"]), {"at_end": at_end})
    if dist.get_rank() == 0:
        torch.save(res, out / "ep.pt")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("rules1")
    launch([__file__, "single", str(out)], world=1, timeout=300)
    return out


@pytest.fixture(scope="module")
def ep(tmp_path_factory):
    out = tmp_path_factory.mktemp("rules2")
    launch([__file__, "ep", str(out)], world=2, timeout=400)
    return out, torch.load(out / "ep.pt", weights_only=False)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_batch_routing_trains_and_estimates_its_threshold(single):
    from sparse_dit.dit import SparseDiT

    rows = _rows(single / "batch")
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    model = SparseDiT.from_pretrained(single / "batch" / "final").eval()
    routers = [b.mlp.router for b in model.blocks if b.is_moe]
    assert routers and all(r.kind == "batch" for r in routers)
    assert all(r.threshold_steps.item() == 3 and 0 < r.threshold.item() < 1 for r in routers)


@pytest.mark.timeout(300)
def test_one_noise_range_trains_alone_from_a_checkpoint(single):
    from safetensors.torch import load_file

    from sparse_dit.dit import SparseDiT

    before = load_file(str(single / "noise" / "final" / "model.safetensors"))  # the EMA export init_from reads
    seen = torch.load(single / "noise_r1.pt", weights_only=True)
    live = seen["live"]
    assert seen["trainable"] and all(".mlp.router." in n or ".mlp.experts." in n for n in seen["trainable"])
    changed_r1 = False
    for k, v in before.items():
        if ".mlp.experts." in k:  # [E, ...]: experts 0, 1 are range 0, experts 2, 3 range 1
            assert torch.equal(live[k][:2], v[:2]), k
            changed_r1 |= not torch.equal(live[k][2:], v[2:])
        elif k.endswith(".mlp.router.gate.weight"):  # [E, D]
            assert torch.equal(live[k][:2], v[:2]), k
        else:
            assert torch.equal(live[k], v), k  # shared parts are frozen
    assert changed_r1, "range 1's experts did not train"
    # the exported EMA weights give range-0 samples the output they had (EMA of unchanged values)
    old = SparseDiT.from_pretrained(single / "noise" / "final").eval()
    new = SparseDiT.from_pretrained(single / "noise_r1" / "final").eval()
    x, t, text = _fixed_input(old.config)
    with torch.no_grad():
        y_old, y_new = old(x, t, text_emb=text), new(x, t, text_emb=text)
    torch.testing.assert_close(y_new[0], y_old[0], rtol=1e-5, atol=1e-6)  # t = 0.8: range 0
    assert not torch.allclose(y_new[1], y_old[1], atol=1e-6)  # t = 0.3: range 1 learned


@pytest.mark.timeout(480)
@pytest.mark.parametrize("rule", ["batch", "noise"])
def test_ep2_equals_ep1(ep, rule):
    out, res = ep
    l1, l2 = _rows(out / f"{rule}_ep1"), _rows(out / f"{rule}_ep2")
    assert len(l1) == len(l2) == 2
    for a, b in zip(l1, l2):
        for key in ("loss", "mse", "moe/aux_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    torch.testing.assert_close(res[f"{rule}_ep2"]["out"], res[f"{rule}_ep1"]["out"], rtol=1e-4, atol=1e-5)
    if rule == "batch":
        for key in ("batch_ep1", "batch_ep2"):
            rank0, rank1 = res[key]["thresholds"]
            assert rank0 and all(torch.equal(a, b) for a, b in zip(rank0, rank1))  # one threshold on every rank
        torch.testing.assert_close(torch.stack(res["batch_ep2"]["thresholds"][0]), torch.stack(res["batch_ep1"]["thresholds"][0]))


if __name__ == "__main__":
    {"single": _single_worker, "ep": _ep_worker}[sys.argv[1]](Path(sys.argv[2]))
