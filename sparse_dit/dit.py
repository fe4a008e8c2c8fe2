"""SparseDiT: a video diffusion transformer whose feed-forward layers may be Mixture-of-Experts.

A latent video (B, C, T, H, W) is cut into (pt, ph, pw) spacetime patches, denoised by adaLN-Zero
transformer blocks with full spacetime attention, and put back together. Any T, H, W divisible by
the patch size works (3D rotary positions, no fixed grid); T = 1 is an image.

Conditioning enters in two ways: a global vector c (timestep + class + pooled text) modulates
every block through adaLN-Zero, and text tokens are attended through cross-attention. Clean
**context frames** (image/video prompts, frames to keep) are marked per latent frame; their
tokens are modulated with the embedding of t = 0 instead of the sample's t, so one model learns
generation, prediction, extension both ways, interpolation and loops (Open-Sora 1.2's
per-frame timestep conditioning).

# B = batch, C = channels, D = model dim, N = tokens, Tt = token frames, L = text tokens
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from sparse_dit.config import ModelConfig
from sparse_dit.modules.attention import CrossAttention, RotaryEmbedding3D, SelfAttention
from sparse_dit.modules.embeddings import LabelEmbedder, PatchEmbed3D, TextEmbedder, TimestepEmbedder, sincos_pos_embed
from sparse_dit.modules.mlp import FeedForward
from sparse_dit.moe.global_balance import GlobalBalance
from sparse_dit.moe.layer import MoEFeedForward
from sparse_dit.moe.placement import is_moe_layer
from sparse_dit.schema import from_dict, to_dict
from sparse_dit.weights import atomic_write, state_mismatch

__all__ = [
    "SparseDiT",
    "DiTBlock",
    "FinalLayer",
    "DiTAux",
    "modulate",
    "is_moe_layer",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; x is (B, Tc, S, D), shift/scale (B, Tc, 1, D)."""
    return x * (1 + scale) + shift


@dataclass
class DiTAux:
    """Auxiliary outputs of a forward pass: the weighted MoE loss to add, and per-layer MoE outputs."""

    loss: torch.Tensor
    moe: list = field(default_factory=list)


def _by_frame(x: torch.Tensor, tc: int) -> torch.Tensor:
    return rearrange(x, "b (tc s) d -> b tc s d", tc=tc)  # (B, Tc, S, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention, optional cross-attention, dense or MoE FFN.

    Args:
        config: the model config.
        layer_idx: block index (decides dense vs MoE FFN via :func:`is_moe_layer`).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        D = config.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, config.num_heads, qkv_bias=config.qkv_bias, qk_norm=config.qk_norm)
        self.cross_attn = CrossAttention(D, config.num_heads, qk_norm=config.qk_norm) if config.cross_attention else None
        self.norm_cross = nn.LayerNorm(D, eps=1e-6) if config.cross_attention else None
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.is_moe = is_moe_layer(config.moe, layer_idx)
        if self.is_moe:
            self.mlp: nn.Module = MoEFeedForward.from_config(config, layer_idx)
        else:
            self.mlp = FeedForward(D, config.ffn_hidden, config.activation)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        router_cond: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        need_aux: bool = True,
    ) -> tuple[torch.Tensor, Any]:
        """x: (B, N, D); c: (B, Tc, D) with Tc = 1 or one vector per token frame; ``need_aux=False``:
        the MoE FFN skips its losses and statistics (returns ``None`` for them)."""
        tc = c.shape[1]
        mods = self.adaLN_modulation(c)[:, :, None]  # (B, Tc, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=-1)
        # 1. Self-attention over all spacetime tokens
        h = modulate(_by_frame(self.norm1(x), tc), shift_msa, scale_msa).flatten(1, 2)
        x = x + (gate_msa * _by_frame(self.attn(h, rope), tc)).flatten(1, 2)  # (B, N, D)
        # 2. Cross-attention to text tokens (PixArt-alpha: unmodulated, plain residual)
        if self.cross_attn is not None and text is not None:
            x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        # 3. Feed-forward: dense or MoE
        h = modulate(_by_frame(self.norm2(x), tc), shift_mlp, scale_mlp).flatten(1, 2)
        aux = None
        if self.is_moe:
            h, aux = self.mlp(h, cond=router_cond, timesteps=timesteps, need_aux=need_aux)
        else:
            h = self.mlp(h)
        x = x + (gate_mlp * _by_frame(h, tc)).flatten(1, 2)  # (B, N, D)
        return x, aux


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from D to a patch of output channels."""

    def __init__(self, dim: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        tc = c.shape[1]
        shift, scale = self.adaLN_modulation(c)[:, :, None].chunk(2, dim=-1)  # (B, Tc, 1, D) each
        x = modulate(_by_frame(self.norm_final(x), tc), shift, scale).flatten(1, 2)
        return self.linear(x)  # (B, N, pt*ph*pw*C_out)


class SparseDiT(nn.Module):
    """Video diffusion transformer with dense or Mixture-of-Experts feed-forward layers.

    Args:
        config: a :class:`~sparse_dit.config.ModelConfig` (named ones: :mod:`sparse_dit.presets`).

    Example::

        model = SparseDiT(preset_config("S/2"))
        v = model(latents, t, text_emb=emb, text_mask=mask)   # (B, C, T, H, W)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed3D(config.in_channels, D, config.patch_size)
        self.t_embedder = TimestepEmbedder(D, config.timestep_freq_dim)
        self.y_embedder = LabelEmbedder(config.num_classes, D) if config.num_classes > 0 else None
        self.text_embedder = TextEmbedder(config.text_dim, D, tokens=config.cross_attention) if config.text_dim > 0 else None
        self.rope = RotaryEmbedding3D(config.head_dim, config.rope_theta) if config.pos_embed == "rope" else None
        self.blocks = nn.ModuleList([DiTBlock(config, i) for i in range(config.depth)])
        pt, ph, pw = config.patch_size
        self.final_layer = FinalLayer(D, pt * ph * pw, config.out_channels)
        # model.moe.balance_scope="global": the balance loss over all micro-batches and ranks
        # (sparse_dit/moe/global_balance.py; sparse_dit.parallel gives it the all-reduce)
        self.moe_balance = GlobalBalance() if config.moe.enabled and config.moe.balance_scope == "global" else None
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT's initialisation; afterwards the model outputs exactly zero (adaLN-Zero)."""

        # Xavier-uniform linear layers, zero biases (ViT)
        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic)
        # Patch embedding like a linear layer over the flattened patch
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Label and timestep embeddings: normal(0, 0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero-out adaLN modulation layers: every block starts as the identity
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.is_moe and hasattr(block.mlp, "reset_parameters"):
                block.mlp.reset_parameters()
        # Zero-out the output layer: the model predicts exactly 0 at initialisation
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ----------------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        t, h, w = grid
        return rearrange(
            x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw
        )  # (B, C_out, T, H, W)

    def conditioning(
        self,
        t: torch.Tensor,
        class_labels: torch.Tensor | None,
        pooled_text: torch.Tensor | None,
    ) -> torch.Tensor:
        """Global adaLN vector c = emb(t) + emb(class) + proj(pooled text): (B, D)."""
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if class_labels is None:
                class_labels = torch.full((t.shape[0],), self.y_embedder.null_class, dtype=torch.long, device=t.device)
            c = c + self.y_embedder(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels were given but the model has num_classes=0")
        if pooled_text is not None:
            c = c + pooled_text
        return c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_drop: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, DiTAux]:
        """Predict the flow-matching velocity for a noisy latent video.

        Args:
            x: (B, C, T, H, W) noisy latents; context frames hold clean latents.
            t: (B,) timesteps in [0, 1] (t = 1 is pure noise).
            class_labels: (B,) ints in [0, num_classes]; num_classes is the null class.
            text_emb: (B, L, Dt) text-encoder token embeddings.
            text_mask: (B, L) bool, True for real tokens.
            text_drop: (B,) bool: replace these captions with the learned null embedding (CFG).
            context_mask: (B, T) bool, True for latent frames given clean. A token frame counts as
                context when all ``pt`` latent frames in it do.
            return_aux: also return :class:`DiTAux` (the weighted MoE loss and per-layer MoE outputs).

        Returns:
            (B, C_out, T, H, W), or ``(output, aux)`` when ``return_aux``.
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        grid = self.x_embedder.grid(tuple(x.shape[2:]))  # (t, h, w) token grid
        tokens = self.x_embedder(x)  # (B, N, D)
        if cfg.pos_embed == "sincos":
            tokens = tokens + sincos_pos_embed(grid, cfg.hidden_size).to(tokens)
        rope = self.rope(grid, x.device) if self.rope is not None else None

        text_tokens, pooled = None, None
        if self.text_embedder is not None and text_emb is not None:
            text_tokens, text_mask, pooled = self.text_embedder(text_emb, text_mask, text_drop)
        elif text_emb is not None:
            raise ValueError("text_emb was given but the model has text_dim=0")
        c = self.conditioning(t, class_labels, pooled)  # (B, D)
        c_frames = c[:, None]  # (B, 1, D)
        if context_mask is not None:
            ctx = self._token_frame_mask(context_mask, x.shape[2], grid[0])  # (B, Tt)
            c_clean = self.conditioning(torch.zeros_like(t), class_labels, pooled)
            c_frames = torch.where(ctx[..., None], c_clean[:, None], c[:, None])  # (B, Tt, D)

        aux_list = []
        for block in self.blocks:
            tokens, aux = block(tokens, c_frames, rope, text_tokens, text_mask, router_cond=c, timesteps=t, need_aux=return_aux)
            if aux is not None:
                aux_list.append(aux)
        out = self.unpatchify(self.final_layer(tokens, c_frames), grid)  # (B, C_out, T, H, W)
        if not return_aux:
            return out
        if self.moe_balance is not None and self.training and torch.is_grad_enabled():
            coefs = [b.mlp.aux_loss_coef for b in self.blocks if b.is_moe]
            aux_list = self.moe_balance(aux_list, coefs)  # one collective per training forward
        loss = sum((a.loss for a in aux_list), start=out.new_zeros(()))
        return out, DiTAux(loss=loss, moe=aux_list)

    def _token_frame_mask(self, context_mask: torch.Tensor, T: int, tt: int) -> torch.Tensor:
        if context_mask.ndim != 2 or context_mask.shape[1] != T:
            raise ValueError(f"context_mask must have shape (B, T={T}), got {tuple(context_mask.shape)}")
        pt = self.config.patch_size[0]
        return rearrange(context_mask.bool(), "b (tt pt) -> b tt pt", tt=tt, pt=pt).all(-1)

    # ----------------------------------------------------------------------------------------
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically into ``directory``.

        Args:
            directory: target folder (created).
            state_dict: weights to write instead of this model's own (e.g. EMA weights).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(to_dict(self.config), indent=2)))
        atomic_write(directory / "model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "SparseDiT":
        """Load a model written by :meth:`save_pretrained`; every key's shape is checked."""
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing; expected a folder written by save_pretrained")
        config = from_dict(ModelConfig, json.loads((directory / "config.json").read_text()))
        model = cls(config)
        sd = load_file(str(directory / "model.safetensors"), device=str(map_location))
        own = model.state_dict()
        bad = state_mismatch(own, sd)
        if bad is not None:
            raise ValueError(f"checkpoint {directory}: {bad}")
        model.load_state_dict(sd)
        return model
