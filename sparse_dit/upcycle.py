"""Sparse upcycling: an MoE DiT initialised from a dense one (``sparse-dit upcycle``, issue 11).

    sparse-dit upcycle runs/quickstart-dense --preset E4A1 --out models/quickstart-E4A1
    sparse-dit upcycle models/s2 --preset S/2-E8A2-fullwidth --out models/s2-E8A2
    sparse-dit upcycle models/s2 --preset E8A8 --granularity 8 --out models/s2-E8A8-fine

Komatsuzaki et al. (2022, "Sparse Upcycling") start an MoE from a trained dense checkpoint: every
expert is a copy of the dense FFN and everything else is copied, so training resumes from the
dense model's quality instead of from scratch. Here the upcycled model's output equals the dense
model's (to float rounding) before its first step, for every router whose combine weights are
known at that point; the others are refused with one line.

**Experts.** ``--granularity 1`` (copy): each routed expert is the dense FFN (expert width = the
dense width F). ``--granularity g > 1`` (split, fine-grained experts): the FFN's F hidden units
are cut into g slices of F/g; the S shared experts (``E..A..S<S>``) take the first S slices (one
FFN of width S*F/g), and routed expert e takes slice ``S + (e mod (g - S))``. A GELU FFN is a sum
over its hidden units, ``W2 act(W1 x + b1) + b2 = sum_j W2[:, j] act(W1[j] x + b1[j]) + b2``, so
the slices add up to the dense FFN exactly when every slice is used once.

**Router and gates.** With the router gate at zero, every score of a token is equal: softmax
1/G over the G experts the token may use (G = E; E / ranges for ``noise_level``), sigmoid 1/2.
Then each token takes P experts, each with the same combine weight w0:

* token choice and noise-level experts: P = top_k, w0 = 1/k with ``renormalize`` and k > 1, else
  the raw score (1/G or 1/2);
* expert choice: every expert takes ``C = ceil(N k cf / E)`` tokens of each sample, so every token
  gets all P = E experts only when ``k * cf >= E`` (then w0 = the raw score); otherwise which
  tokens each expert takes is decided by tie-breaking, and the rule is refused;
* capacity dropping: with equal scores every token may pick the same experts (``torch.topk``
  breaks ties the same way for every token), so a capacity below T can drop routes: refused
  unless ``capacity_factor * k >= G``;
* batch-level routing (``router="batch"``): the number of experts per token is decided by ties:
  refused.

Copy mode scales each routed expert's output layer (W2 and b2) by ``c = (1 - sigma) / (P w0)``,
where ``sigma = S / (S + 1)`` is the share given to S shared experts (each a dense copy scaled by
``sigma / S``): the routes then sum to ``(1 - sigma)`` FFN(x) for any choice of experts. With
renormalised top-k (k > 1) the weights already sum to one (c = 1 without shared experts) and the
router keeps its random initialisation, which spreads the first steps' tokens over the experts;
in every other case the gate starts at zero (its first update breaks the tie). Split mode needs
every eligible expert on every token (P = G, so ``top_k = G``, e.g. E = g = k without shared
experts); expert e then has ``m = G / (g - S)`` copies of its slice among the G, and
``c = 1 / (m w0)``; the output bias b2 goes to the shared experts, else ``b2 / (g - S)`` to each
routed one. The timestep projection of timestep-aware routing and the balancing bias start at
zero. Every other weight is copied; the result is checked on a probe input before it is written.

``DENSE_DIR`` is a model folder (``config.json`` + ``model.safetensors``) or a run folder (its
``final/``, else its latest checkpoint's EMA weights), read without executing anything
(:func:`sparse_dit.pretrained.load_pretrained`). ``--out`` gets a ``from_pretrained`` folder; when
the dense model came with a recipe, also ``recipe.yaml`` with the MoE model and
``train.init_from`` set, so ``sparse-dit train OUT/recipe.yaml`` trains the upcycled model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from torch import nn

from sparse_dit.config import ConfigError, ModelConfig, MoEConfig, RecipeConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.modules.mlp import FeedForward
from sparse_dit.moe.layer import MoEFeedForward
from sparse_dit.presets import parse_moe_preset, preset_config
from sparse_dit.pretrained import load_pretrained
from sparse_dit.schema import apply_overrides, from_dict, to_dict

__all__ = ["UpcycleError", "Selection", "selection", "upcycle_config", "upcycle_model", "upcycle", "add_arguments", "run"]

_BARE = re.compile(r"^-?E(?P<E>\d+)A(?P<A>\d+)(?:S(?P<S>\d+))?(?P<full>-fullwidth)?$")


class UpcycleError(ValueError):
    """A dense model or MoE target that cannot be upcycled exactly; one line saying why."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """What every token gets from a zero-gate router.

    Attributes:
        group: G, the experts a token may use (E; E / ranges for noise-level experts); groups are
            consecutive expert indices.
        picks: P, the routes each token takes.
        weight: w0, the combine weight of each of them.
        random_router: the output does not depend on which experts are picked nor on their scores
            (copy mode with renormalised top-k > 1), so the router keeps its random init.
    """

    group: int
    picks: int
    weight: float
    random_router: bool


def selection(moe: MoEConfig, split: bool) -> Selection:
    """The routes and combine weights every token gets at the first step (see the module docstring).

    Raises:
        UpcycleError: a router or setting whose first-step routes depend on how ties are broken.
    """
    E, k = moe.num_experts, moe.top_k
    kind = moe.router
    if kind in ("token_choice", "noise_level"):
        G = E // moe.num_noise_ranges
        if moe.capacity_factor is not None and moe.capacity_factor * k < G:
            raise UpcycleError(
                f"model.moe.capacity_factor={moe.capacity_factor} can drop routes at the first step (with equal router scores "
                f"every token may pick the same {k} experts); upcycle with capacity_factor null (or >= {G / k:g}) and set it afterwards"
            )
        renorm = moe.renormalize and k > 1
        w0 = 1.0 / k if renorm else (1.0 / G if moe.score_func == "softmax" else 0.5)
        return Selection(G, k, w0, random_router=renorm and not split)
    if kind == "expert_choice":
        cf = 1.0 if moe.capacity_factor is None else moe.capacity_factor
        if k * cf < E:
            raise UpcycleError(
                f"router='expert_choice' with top_k={k} and capacity_factor={moe.capacity_factor} gives each expert "
                f"ceil(N * {k * cf:g} / {E}) < N tokens of a sample: with equal router scores which tokens it takes is decided "
                f"by ties, so the output cannot equal the dense model's; use top_k * capacity_factor >= {E} or router='token_choice'"
            )
        return Selection(E, E, 1.0 / E if moe.score_func == "softmax" else 0.5, random_router=False)
    raise UpcycleError(
        f"router={kind!r} cannot be upcycled exactly (with equal router scores the experts per token are decided by ties); "
        "upcycle with router='token_choice', 'noise_level' or 'expert_choice'"
    )


# --------------------------------------------------------------------------------------------
# The target config
# --------------------------------------------------------------------------------------------


def _first_difference(a: ModelConfig, b: ModelConfig) -> Optional[str]:
    for f in dataclasses.fields(ModelConfig):
        if f.name != "moe" and getattr(a, f.name) != getattr(b, f.name):
            return f"{f.name} ({getattr(a, f.name)!r} vs {getattr(b, f.name)!r})"
    return None


def upcycle_config(dense: ModelConfig, preset: str, granularity: int = 1, overrides: Sequence[str] = ()) -> ModelConfig:
    """The MoE config an upcycled ``dense`` gets.

    Args:
        dense: the dense model's config (``model.moe.num_experts == 0``).
        preset: ``E<experts>A<active>[S<shared>]`` applied to ``dense``, or a full MoE preset name
            (``S/2-E8A2``) whose dense base must be ``dense``'s architecture; it gives the
            experts, top-k, shared experts and the preset's MoE options. The expert width is
            not the preset's: it is ``F / granularity``.
        granularity: 1 = experts are copies of the dense FFN; g > 1 = slices of F/g hidden units.
        overrides: ``moe.KEY=VALUE`` settings of :class:`~sparse_dit.config.MoEConfig` (router,
            score_func, renormalize, capacity_factor, timestep_routing, ...).

    Raises:
        UpcycleError: a bad preset, granularity or override, or a dense model that is not dense.
    """
    if dense.moe.enabled:
        raise UpcycleError(f"the model is already an MoE (model.moe.num_experts={dense.moe.num_experts}); upcycling starts from a dense model")
    bare = _BARE.match(preset)
    if bare:
        E, A, S = int(bare["E"]), int(bare["A"]), int(bare["S"] or 0)
        base_moe = dense.moe
    else:
        try:
            base, E, A, S, _ = parse_moe_preset(preset)
            target = preset_config(preset)
        except ConfigError as exc:
            raise UpcycleError(f"--preset={preset!r}: {exc}; or give E<experts>A<active>[S<shared>] to apply to this model") from None
        diff = _first_difference(dataclasses.replace(target, moe=dense.moe), dense)
        if diff is not None:
            raise UpcycleError(f"--preset={preset!r}: its dense base {base!r} differs from the dense model in {diff}; "
                               f"give E{E}A{A}{f'S{S}' if S else ''} to apply it to this model")
        base_moe = target.moe
    if E < 1 or A < 1:
        raise UpcycleError(f"--preset={preset!r}: experts ({E}) and active ({A}) must be >= 1")
    if granularity < 1:
        raise UpcycleError(f"--granularity={granularity} must be >= 1 (1 = copies of the dense FFN, g > 1 = slices of F/g)")
    F = dense.ffn_hidden
    if F % granularity:
        raise UpcycleError(f"--granularity={granularity} does not divide the dense FFN width {F}; choose a divisor of {F}")
    if granularity > 1 and S >= granularity:
        raise UpcycleError(f"--preset={preset!r} has {S} shared experts but --granularity={granularity} makes only {granularity} "
                           "slices; the routed experts need at least one")
    moe = dataclasses.replace(base_moe, num_experts=E, top_k=A, shared_experts=S, expert_hidden_dim=F // granularity, granularity=granularity)
    raw = {"moe": to_dict(moe)}
    for text in overrides:
        if not text.startswith("moe."):
            raise UpcycleError(f"--set {text!r}: only model.moe settings can change (write moe.KEY=VALUE); the rest of the model is copied")
    try:
        changed = from_dict(MoEConfig, apply_overrides(raw, list(overrides))["moe"], prefix="model.moe")
        config = from_dict(ModelConfig, {**to_dict(dense), "moe": to_dict(changed)})
    except ConfigError as exc:
        raise UpcycleError(str(exc)) from None
    for name in ("num_experts", "top_k", "shared_experts", "expert_hidden_dim", "granularity"):
        if getattr(config.moe, name) != getattr(moe, name):
            raise UpcycleError(f"--set moe.{name}: give experts, top-k and shared experts in --preset and the width by --granularity")
    return config


# --------------------------------------------------------------------------------------------
# The weights
# --------------------------------------------------------------------------------------------


def _dense_mats(ffn: FeedForward) -> dict[str, Optional[torch.Tensor]]:
    """The dense FFN in the experts' ``x @ W`` layout: w1 (D, F), w3 (D, F), w2 (F, D), b1 (F), b2 (D)."""
    if ffn.activation == "gelu_tanh":
        return {"w1": ffn.fc1.weight.t(), "w3": None, "w2": ffn.fc2.weight.t(),
                "b1": ffn.fc1.bias if ffn.fc1.bias is not None else ffn.fc1.weight.new_zeros(ffn.hidden_dim),
                "b2": ffn.fc2.bias if ffn.fc2.bias is not None else ffn.fc2.weight.new_zeros(ffn.dim)}
    return {"w1": ffn.w1.weight.t(), "w3": ffn.w3.weight.t(), "w2": ffn.w2.weight.t(), "b1": None, "b2": None}


def _set_shared(shared: FeedForward, w1: torch.Tensor, w3: Optional[torch.Tensor], w2: torch.Tensor,
                b1: Optional[torch.Tensor], b2: Optional[torch.Tensor]) -> None:
    """Write ``x @ W`` layout matrices into a dense FFN (nn.Linear stores the transpose)."""
    if shared.activation == "gelu_tanh":
        shared.fc1.weight.copy_(w1.t())
        shared.fc2.weight.copy_(w2.t())
        if shared.fc1.bias is not None:
            shared.fc1.bias.copy_(b1)
        if shared.fc2.bias is not None:
            shared.fc2.bias.copy_(b2)
    else:
        shared.w1.weight.copy_(w1.t())
        shared.w3.weight.copy_(w3.t())
        shared.w2.weight.copy_(w2.t())


@torch.no_grad()
def _upcycle_layer(ffn: FeedForward, layer: MoEFeedForward, sel: Selection, granularity: int) -> None:
    """Fill one MoE FFN from one dense FFN (see the module docstring for the scaling)."""
    d = _dense_mats(ffn)
    ex = layer.experts
    E, S, Fh = layer.num_experts, layer.num_shared_experts, layer.hidden_dim
    gelu = ex.activation == "gelu_tanh"
    if granularity == 1:
        sigma = S / (S + 1)
        c = (1.0 - sigma) / (sel.picks * sel.weight)
        for e in range(E):
            ex.w1[e].copy_(d["w1"])
            ex.w2[e].copy_(d["w2"] * c)
            if gelu:
                ex.b1[e].copy_(d["b1"])
                ex.b2[e].copy_(d["b2"] * c)
            else:
                ex.w3[e].copy_(d["w3"])
        if S:
            def rep(t: Optional[torch.Tensor], dim: int) -> Optional[torch.Tensor]:
                return None if t is None else torch.cat([t] * S, dim)

            _set_shared(layer.shared, rep(d["w1"], 1), rep(d["w3"], 1), rep(d["w2"], 0) * (sigma / S), rep(d["b1"], 0),
                        None if d["b2"] is None else d["b2"] * sigma)
    else:
        routed = granularity - S
        if sel.picks != sel.group or sel.group % routed:
            raise UpcycleError(
                f"split experts reproduce the dense FFN only when every token takes every expert it may use, each of the "
                f"{routed} routed slices equally often: need top_k = {sel.group} (got {layer.top_k}) and a multiple of {routed} "
                f"experts per group (got {sel.group}); e.g. E{routed}A{routed}{f'S{S}' if S else ''} with --granularity {granularity}"
            )
        m = sel.group // routed
        c = 1.0 / (m * sel.weight)

        def cols(t: torch.Tensor, j: int, n: int = 1) -> torch.Tensor:  # hidden units of slices [j, j + n) on the last axis
            return t[..., j * Fh : (j + n) * Fh]

        def rows(t: torch.Tensor, j: int, n: int = 1) -> torch.Tensor:
            return t[j * Fh : (j + n) * Fh]

        for e in range(E):
            j = S + (e % sel.group) % routed
            ex.w1[e].copy_(cols(d["w1"], j))
            ex.w2[e].copy_(rows(d["w2"], j) * c)
            if gelu:
                ex.b1[e].copy_(cols(d["b1"], j))
                ex.b2[e].copy_(torch.zeros_like(d["b2"]) if S else d["b2"] * (c / routed))
            else:
                ex.w3[e].copy_(cols(d["w3"], j))
        if S:
            _set_shared(layer.shared, cols(d["w1"], 0, S), None if d["w3"] is None else cols(d["w3"], 0, S), rows(d["w2"], 0, S),
                        None if d["b1"] is None else cols(d["b1"], 0, S), d["b2"])
    router = layer.router
    if not sel.random_router:
        router.gate.weight.zero_()
    if router.cond_proj is not None:
        router.cond_proj.weight.zero_()
    router.expert_bias.zero_()


def _probe_inputs(model: SparseDiT, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A small random batch that reaches every layer: 2 samples of 2 x 2 token patches (2 frames)."""
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    x = torch.randn(2, cfg.in_channels, 2 * pt, 2 * ph, 2 * pw, generator=generator)
    t = torch.rand(2, generator=generator)
    kwargs: dict[str, Any] = {}
    if cfg.text_dim > 0:
        kwargs["text_emb"] = torch.randn(2, 3, cfg.text_dim, generator=generator)
        kwargs["text_mask"] = torch.ones(2, 3, dtype=torch.bool)
    if cfg.num_classes > 0:
        kwargs["class_labels"] = torch.randint(0, cfg.num_classes, (2,), generator=generator)
    return x, t, kwargs


@torch.no_grad()
def upcycle_model(dense: SparseDiT, config: ModelConfig, seed: int = 0, check: bool = True) -> SparseDiT:
    """An MoE :class:`~sparse_dit.dit.SparseDiT` whose output equals ``dense``'s.

    Args:
        dense: the trained dense model.
        config: the MoE config (:func:`upcycle_config`); equal to ``dense.config`` except ``moe``.
        seed: seeds the parts that keep a random initialisation (the router in copy mode with
            renormalised top-k > 1).
        check: compare both models on a probe input and raise if they differ.

    Raises:
        UpcycleError: a config that cannot be upcycled exactly, or a failed probe.
    """
    if _first_difference(dense.config, config) is not None:
        raise UpcycleError(f"the MoE config differs from the dense model's in {_first_difference(dense.config, config)}")
    split = config.moe.granularity > 1
    sel = selection(config.moe, split)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        moe = SparseDiT(config).to(next(dense.parameters()).dtype)
    own, src = moe.state_dict(), dense.state_dict()
    moe_blocks = {i for i, b in enumerate(moe.blocks) if b.is_moe}

    def in_moe_ffn(key: str) -> bool:
        parts = key.split(".")
        return len(parts) > 3 and parts[0] == "blocks" and int(parts[1]) in moe_blocks and parts[2] == "mlp"

    copied = {k: v for k, v in src.items() if not in_moe_ffn(k)}
    missing = sorted(k for k in own if not in_moe_ffn(k) and k not in copied)
    if missing:
        raise UpcycleError(f"the dense model lacks {len(missing)} weights of the MoE model, e.g. {missing[:3]}")
    moe.load_state_dict({**own, **copied})
    for i in sorted(moe_blocks):
        _upcycle_layer(dense.blocks[i].mlp, moe.blocks[i].mlp, sel, config.moe.granularity)
    moe.train(dense.training)
    if check:
        x, t, kwargs = _probe_inputs(dense, torch.Generator().manual_seed(seed))
        ref, out = dense.eval()(x, t, **kwargs), moe.eval()(x, t, **kwargs)
        err = float((out - ref).abs().max())
        scale = float(ref.abs().max())
        if not err <= 1e-4 * (1.0 + scale):
            raise UpcycleError(f"the upcycled model differs from the dense one by {err:.3g} (output scale {scale:.3g}) on a probe input")
    return moe


def upcycle(dense_dir: str | os.PathLike, preset: str, out: str | os.PathLike, granularity: int = 1,
            overrides: Sequence[str] = (), seed: int = 0) -> tuple[SparseDiT, Path, Optional[Path]]:
    """``sparse-dit upcycle``: read the dense model, upcycle it, write ``out``.

    Returns:
        (the MoE model, the folder written, its ``recipe.yaml`` or None when the dense model had no recipe).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"--out {out}: exists and is not a folder")
    if out.resolve() == Path(dense_dir).resolve() or Path(dense_dir).resolve() in out.resolve().parents:
        raise UpcycleError(f"--out {out}: is or lies inside DENSE_DIR {dense_dir}; choose another folder")
    try:
        # the dense weights only: the text encoder is not needed (any non-None value skips it)
        pre = load_pretrained(dense_dir, text_encoder=False)
    except FileNotFoundError as exc:
        raise UpcycleError(str(exc)) from None
    except ValueError as exc:
        raise UpcycleError(f"{dense_dir}: {exc}") from None
    dense = pre.model
    config = upcycle_config(dense.config, preset, granularity, overrides)
    moe = upcycle_model(dense, config, seed=seed)
    moe.save_pretrained(out)
    recipe_path = None
    if pre.recipe is not None:
        recipe: RecipeConfig = pre.recipe.replace(model=config)
        recipe = recipe.replace(train=dataclasses.replace(recipe.train, init_from=str(out)), output_dir=str(out / "run"))
        recipe_path = out / "recipe.yaml"
        _atomic_text(recipe_path, yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return moe, out, recipe_path


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparse-dit upcycle``."""
    parser.add_argument("dense_dir", metavar="DENSE_DIR", help="a model folder (config.json + model.safetensors) or a run folder")
    parser.add_argument("--preset", required=True,
                        help="E<experts>A<active>[S<shared>] (applied to the dense model) or an MoE preset name whose base is its architecture")
    parser.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors [+ recipe.yaml])")
    parser.add_argument("--granularity", type=int, default=1,
                        help="1: every expert is a copy of the dense FFN (default); g > 1: experts are slices of F/g hidden units")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="moe.KEY=VALUE",
                        help="an MoE setting of the upcycled model (router, score_func, renormalize, ...); repeatable")
    parser.add_argument("--seed", type=int, default=0, help="seeds the router where it keeps a random initialisation")


def run(args: argparse.Namespace) -> int:
    """``sparse-dit upcycle``: bad inputs are one line on stderr and exit status 2."""
    try:
        moe, out, recipe = upcycle(args.dense_dir, args.preset, args.out, args.granularity, args.overrides, args.seed)
    except (UpcycleError, ConfigError) as exc:
        print(f"sparse-dit upcycle: {exc}", file=sys.stderr)
        return 2
    m = moe.config.moe
    mode = "copies of the dense FFN" if m.granularity == 1 else f"slices of 1/{m.granularity} of the dense FFN"
    print(f"wrote {out}: {m.num_experts} experts ({mode}, width {m.expert_hidden_dim}), top-{m.top_k}, {m.shared_experts} shared, "
          f"router {m.router}; {moe.num_params() / 1e6:.2f}M parameters; output equals the dense model's on a probe input")
    if recipe is not None:
        print(f"train it: sparse-dit train {recipe}")
    else:
        print(f"train it: sparse-dit train RECIPE.yaml --set train.init_from={out} (RECIPE's model = {out}/config.json)")
    return 0
