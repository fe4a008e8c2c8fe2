"""Generation API: text-to-video, image-to-video, extension both ways, interpolation, loops,
SDEdit editing and single images, all from one model trained with context frames.

Every task is the same operation: lay out a latent video in which some frames are given clean
(the *context*) and let the flow sampler fill in the rest (Sora report, "prompting with images
and videos"). The tasks only differ in where the given frames sit::

    image_to_video   [img, _, _, _, _]
    extend forward   [v0 v1 v2, _, _, _]        backward  [_, _, _, v0 v1 v2]
    interpolate      [a0 a1, _, _, _, b0 b1]
    loop             [v_end, _, _, v_start]      -> video + transition loops seamlessly
    sdedit           all frames noised to t = strength, then denoised (no context)

With a compressing VAE the prompts are encoded on their own, so frame counts are in latent
frames (``num_frames`` of the output are pixel frames; see ``VideoPipeline.latent_frames``).

# B = batch, C = channels, T = frames
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sparse_dit.diffusion import sample
from sparse_dit.vae import IdentityVAE

__all__ = ["VideoPipeline"]


class VideoPipeline:
    """Sampling front-end around a :class:`~sparse_dit.dit.SparseDiT`.

    Args:
        model: the denoiser (eval mode is set).
        vae: video compression network; default :class:`~sparse_dit.vae.IdentityVAE` (pixel space).
        text_encoder: callable ``captions -> TextEmbeddings(tokens, mask, pooled)``
            (``sparse_dit.data.load_text_encoder``); needed for prompts.
        shift: timestep shift of the sampling grid (1.0 = none).
        sampler: ``"euler"`` or ``"heun"``.

    Call arguments follow diffusers' names: ``prompt, negative_prompt, height, width, num_frames,
    num_inference_steps, guidance_scale, generator, latents, output_type``. ``output_type`` is
    ``"pt"`` ((B, 3, T, H, W) in [-1, 1]), ``"np"`` (uint8 (B, T, H, W, 3)) or ``"latent"``.
    """

    def __init__(self, model: nn.Module, vae: nn.Module | None = None, text_encoder: Any = None, shift: float = 1.0, sampler: str = "euler") -> None:
        self.model = model.eval()
        self.vae = vae if vae is not None else IdentityVAE(getattr(model.config, "in_channels", 3))
        self.text_encoder = text_encoder
        self.shift, self.sampler = shift, sampler

    # -- helpers -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def latent_frames(self, num_frames: int) -> int:
        return self.vae.latent_shape(num_frames, *(self.vae.spatial_compression,) * 2)[1]

    def _cond(self, prompt: str | Sequence[str] | None, batch: int, negative_prompt: str | Sequence[str] | None) -> tuple[dict, dict | None]:
        if prompt is None:
            return {}, None
        if self.text_encoder is None:
            raise ValueError("a prompt was given but the pipeline has no text_encoder")
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}")
        emb = self.text_encoder(prompts).to(self.device)
        cond = {"text_emb": emb.tokens, "text_mask": emb.mask}
        uncond = None
        if negative_prompt is not None:
            negs = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            n = self.text_encoder(negs).to(self.device)
            uncond = {"text_emb": n.tokens, "text_mask": n.mask}
        return cond, uncond

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim == 4:  # a single (B, C, H, W) image
            video = video[:, :, None]
        if video.ndim != 5:
            raise ValueError(f"prompt videos must be (B, C, T, H, W) or images (B, C, H, W), got {tuple(video.shape)}")
        return self.vae.encode(video.to(self.device))

    def _output(self, latents: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        video = self.vae.decode(latents).clamp(-1, 1)
        if output_type == "pt":
            return video
        if output_type == "np":
            return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        raise ValueError(f"output_type={output_type!r} is not supported; choose 'pt', 'np' or 'latent'")

    @torch.no_grad()
    def _run(self, shape: tuple[int, ...], context: torch.Tensor | None, mask: torch.Tensor | None, prompt, negative_prompt,
             num_inference_steps: int, guidance_scale: float, generator, latents, output_type: str) -> Any:
        cond, uncond = self._cond(prompt, shape[0], negative_prompt)
        out = sample(self.model, shape, cond, uncond_kwargs=uncond, guidance_scale=guidance_scale,
                     num_inference_steps=num_inference_steps, sampler=self.sampler, shift=self.shift,
                     generator=generator, latents=latents, context=context, context_mask=mask, device=self.device)
        return self._output(out, output_type)

    @staticmethod
    def _layout(parts: Sequence[torch.Tensor | int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate given latent clips and gaps (ints = free frames) along time -> (context, mask)."""
        ref = next(p for p in parts if isinstance(p, torch.Tensor))
        B, C, _, h, w = ref.shape
        clips, flags = [], []
        for p in parts:
            if isinstance(p, int):
                if p < 0:
                    raise ValueError(f"a gap of {p} frames is not allowed; use >= 0")
                clips.append(ref.new_zeros(B, C, p, h, w))
                flags += [False] * p
            else:
                if p.shape[0] != B or p.shape[1] != C or p.shape[3:] != (h, w):
                    raise ValueError(f"prompt clips must share (B, C, h, w); got {tuple(p.shape)} vs {tuple(ref.shape)}")
                clips.append(p)
                flags += [True] * p.shape[2]
        mask = torch.tensor(flags, device=ref.device).expand(B, -1).clone()
        return torch.cat(clips, dim=2), mask

    # -- tasks ---------------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 height: int = 32, width: int = 32, num_frames: int = 8, num_inference_steps: int = 25,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt", batch_size: int = 1) -> Any:
        """Text-to-video (``num_frames=1``: an image)."""
        c, t, h, w = self.vae.latent_shape(num_frames, height, width)
        return self._run((batch_size, c, t, h, w), None, None, prompt, negative_prompt, num_inference_steps,
                         guidance_scale, generator, latents, output_type)

    def image_to_video(self, image: torch.Tensor, num_frames: int = 8, **kwargs: Any) -> Any:
        """Animate ``image`` (B, C, H, W) in [-1, 1]: it becomes the clean first frame."""
        first = self._encode(image)
        total = self.latent_frames(num_frames)
        context, mask = self._layout([first, total - first.shape[2]])
        return self._task(context, mask, **kwargs)

    def extend(self, video: torch.Tensor, num_new_frames: int, direction: str = "forward", **kwargs: Any) -> Any:
        """Continue ``video`` (B, C, T, H, W) forward in time, or backward (what came before)."""
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction={direction!r} must be 'forward' or 'backward'")
        z = self._encode(video)
        gap = num_new_frames // self.vae.temporal_compression
        if gap < 1:
            raise ValueError(f"num_new_frames={num_new_frames} must be >= the VAE's temporal compression {self.vae.temporal_compression}")
        parts = [z, gap] if direction == "forward" else [gap, z]
        return self._task(*self._layout(parts), **kwargs)

    def interpolate(self, start: torch.Tensor, end: torch.Tensor, num_frames_between: int, **kwargs: Any) -> Any:
        """Fill ``num_frames_between`` frames that connect clip ``start`` to clip ``end``."""
        gap = num_frames_between // self.vae.temporal_compression
        return self._task(*self._layout([self._encode(start), gap, self._encode(end)]), **kwargs)

    def loop(self, video: torch.Tensor, num_transition_frames: int, context_frames: int = 2, **kwargs: Any) -> Any:
        """Make ``video`` loop seamlessly: generate frames that lead from its end back to its start.

        Returns the video followed by the transition (drop nothing: playing it on repeat loops).
        """
        z = self._encode(video)
        k = min(context_frames, z.shape[2])
        gap = num_transition_frames // self.vae.temporal_compression
        output_type = kwargs.pop("output_type", "pt")
        out = self._task(*self._layout([z[:, :, -k:], gap, z[:, :, :k]]), output_type="latent", **kwargs)
        return self._output(torch.cat([z, out[:, :, k : k + gap]], dim=2), output_type)

    def sdedit(self, video: torch.Tensor, strength: float = 0.6, **kwargs: Any) -> Any:
        """SDEdit (Meng et al. 2022): noise ``video`` to t = ``strength``, then denoise it (toward
        ``prompt`` if given). Small strengths keep layout and motion; 1.0 ignores the input."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength} must lie in [0, 1]")
        z0 = self._encode(video)
        output_type = kwargs.pop("output_type", "pt")
        if strength == 0:
            return self._output(z0, output_type)
        cond, uncond = self._cond(kwargs.pop("prompt", None), z0.shape[0], kwargs.pop("negative_prompt", None))
        with torch.no_grad():
            out = sample(self.model, tuple(z0.shape), cond, uncond_kwargs=uncond, sampler=self.sampler, shift=self.shift,
                         device=self.device, init_latents=z0, strength=strength, **kwargs)
        return self._output(out, output_type)

    def _task(self, context: torch.Tensor, mask: torch.Tensor, prompt=None, negative_prompt=None, num_inference_steps: int = 25,
              guidance_scale: float = 1.0, generator=None, latents=None, output_type: str = "pt") -> Any:
        return self._run(tuple(context.shape), context, mask, prompt, negative_prompt, num_inference_steps,
                         guidance_scale, generator, latents, output_type)
