"""Generation API: text-to-video, image-to-video, extension both ways, interpolation, loops,
SDEdit editing and single images, all from one model trained with context frames.

Every task is the same operation: lay out a latent video in which some frames are given clean
(the *context*) and let the flow sampler fill in the rest (Sora report, "prompting with images
and videos"). The tasks only differ in where the given frames sit::

    image_to_video   [img, _, _, _, _]
    extend forward   [v0 v1 v2, _, _, _]        backward  [_, _, _, v0 v1 v2]
    interpolate      [a0 a1, _, _, _, b0 b1]
    loop             [v_end, _, _, v_start]      -> video + transition loops seamlessly
    sdedit           the last `strength` of the schedule run on the noised video (no context)

Every count is in pixel frames. The given clips are laid out with the gaps into one full-length
pixel video that is encoded as a whole (``sparse_dit.context_layout``): with a causal VAE the
latent groups then line up with its ``[0], [1..ft], ...`` grouping wherever a clip sits, and a
latent frame is held as context only when every pixel frame of its group is given (given frames
that share a group with generated ones are generated, with a warning naming them).

Each mode is one entry of ``GENERATION_MODES``: a function ``layout(pipe, **inputs) -> Layout``
that builds the context layout; :meth:`VideoPipeline.generate` samples any of them by name
(``pipe.generate("extend_backward", video=v, num_new_frames=4)``), and the named methods
(``image_to_video``, ``extend``, ...) are thin lookups into the table.

# B = batch, C = channels, T = frames
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from sparse_dit.config import DiffusionConfig
from sparse_dit.context_layout import fitting_lengths, place_clips
from sparse_dit.diffusion import count_tokens, resolution_shift, sample
from sparse_dit.pretrained import load_pretrained
from sparse_dit.vae import IdentityVAE

__all__ = ["VideoPipeline", "Layout", "GenerationMode", "GENERATION_MODES"]


@dataclass(frozen=True)
class Layout:
    """What the sampler fills: a latent video whose ``mask`` frames are given clean.

    Args:
        shape: (B, C, T, h, w) of the latent video to sample.
        context: (B, C, T, h, w) clean latents of the given frames (None: nothing given).
        mask: (B, T) bool, True where a frame is given (None: nothing given).
        init_latents: a clean latent video to edit (SDEdit): the last ``strength`` of the
            schedule is run on it (diffusers' img2img); ``strength == 0`` returns it unchanged.
        strength: see ``init_latents`` (1.0 = start from pure noise).
        finish: maps the sampled latents to the output latents; None = the sampled latents.
        finish_video: maps the decoded video to the output video (``loop`` appends its
            transition to the input video); None = the decoded video.
        partial: given pixel frames that share a latent group with generated frames, so are
            generated rather than held (``sparse_dit.context_layout``).
    """

    shape: tuple[int, ...]
    context: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    init_latents: Optional[torch.Tensor] = None
    strength: float = 1.0
    finish: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    finish_video: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    partial: tuple[int, ...] = ()


class VideoPipeline:
    """Sampling front-end around a :class:`~sparse_dit.dit.SparseDiT`.

    Args:
        model: the denoiser (eval mode is set).
        vae: video compression network; default :class:`~sparse_dit.vae.IdentityVAE` (pixel space).
        text_encoder: callable ``captions -> TextEmbeddings(tokens, mask, pooled)``
            (``sparse_dit.data.load_text_encoder``); needed for prompts.
        shift: timestep shift of the sampling grid (1.0 = none; None = the resolution shift
            sqrt(tokens / shift_base_tokens) of each layout, as training's ``diffusion.shift: null``).
        sampler: ``"euler"`` or ``"heun"``.
        grid: timestep grid, ``"diffusers"`` (FlowMatchEulerDiscreteScheduler's) or ``"uniform"``.
        num_inference_steps, guidance_scale: defaults of every call. ``guidance_scale`` may be one
            scale per noise range of a noise-level MoE model, highest noise first
            (:func:`sparse_dit.diffusion.guidance_schedule`).
        shift_base_tokens: see ``shift``.

    :meth:`from_config` takes all of them from a recipe's ``diffusion`` section.

    Call arguments follow diffusers' names: ``prompt, negative_prompt, height, width, num_frames,
    num_inference_steps, guidance_scale, generator, latents, output_type``. ``output_type`` is
    ``"pt"`` ((B, 3, T, H, W) in [-1, 1]), ``"np"`` (uint8 (B, T, H, W, 3)) or ``"latent"``.
    """

    def __init__(self, model: nn.Module, vae: nn.Module | None = None, text_encoder: Any = None, shift: float | None = 1.0,
                 sampler: str = "euler", grid: str = "diffusers", num_inference_steps: int = 25, guidance_scale: float | Sequence[float] = 1.0,
                 shift_base_tokens: int = 256) -> None:
        self.model = model.eval()
        self.vae = vae if vae is not None else IdentityVAE(getattr(model.config, "in_channels", 3))
        self.text_encoder = text_encoder
        self.shift, self.sampler, self.grid = shift, sampler, grid
        self.num_inference_steps, self.guidance_scale, self.shift_base_tokens = num_inference_steps, guidance_scale, shift_base_tokens

    @classmethod
    def from_config(cls, model: nn.Module, diffusion: DiffusionConfig, vae: nn.Module | None = None, text_encoder: Any = None) -> "VideoPipeline":
        """A pipeline that samples as the recipe says: its steps, sampler, guidance, grid and the
        shift training used (``diffusion.shift``, or the resolution shift when that is null)."""
        return cls(model, vae, text_encoder, shift=diffusion.shift, sampler=diffusion.sampler, grid=diffusion.timestep_grid,
                   num_inference_steps=diffusion.num_inference_steps, guidance_scale=diffusion.guidance,
                   shift_base_tokens=diffusion.shift_base_tokens)

    @classmethod
    def from_pretrained(cls, path: str | Any, weights: str = "auto", map_location: Any = "cpu", text_encoder: Any = None,
                        vae: nn.Module | None = None, **overrides: Any) -> "VideoPipeline":
        """The pipeline of a run folder or a model folder, as diffusers' ``from_pretrained``:
        the weights, the recipe's text encoder and its sampler settings (steps, sampler, guidance,
        shift, grid). Nothing in the folder is executed (JSON, YAML, safetensors, weights-only
        checkpoints); see :mod:`sparse_dit.pretrained` for which weights a run folder gives.

        Args:
            path: a run folder (``output_dir``) or a folder with ``config.json`` + ``model.safetensors``.
            weights: run folders only: ``"auto"`` (``final/`` if the run finished, else the latest
                checkpoint's EMA weights), ``"final"`` or ``"latest"``.
            map_location: device of the weights.
            text_encoder: an encoder to use instead of the recipe's.
            vae: the compression network (default: the recipe's ``autoencoder``; pixel space without a recipe).
            **overrides: constructor arguments that replace the recipe's (``num_inference_steps=10``).

        Example::

            pipe = VideoPipeline.from_pretrained("runs/tiny-moe")
            video = pipe("a red square moving left", num_frames=6, height=12, width=12)
        """
        found = load_pretrained(path, weights=weights, map_location=map_location, text_encoder=text_encoder)
        pipe = cls.from_config(found.model, found.diffusion, vae=vae if vae is not None else found.autoencoder, text_encoder=found.text_encoder)
        for key, value in overrides.items():
            if key not in ("shift", "sampler", "grid", "num_inference_steps", "guidance_scale", "shift_base_tokens"):
                raise TypeError(f"from_pretrained() got an unexpected argument {key!r}")
            setattr(pipe, key, value)
        pipe.source = found.weights  # where the weights came from
        return pipe

    def shift_for(self, shape: tuple[int, ...]) -> float:
        """The shift used for latents of ``shape`` (B, C, T, h, w)."""
        if self.shift is not None:
            return self.shift
        return resolution_shift(count_tokens(shape, getattr(self.model.config, "patch_size", (1, 1, 1))), self.shift_base_tokens)

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

    def _as_video(self, video: torch.Tensor) -> torch.Tensor:
        """A prompt as a (B, C, T, H, W) video on the model's device (an image is one frame)."""
        if video.ndim == 4:  # a single (B, C, H, W) image
            video = video[:, :, None]
        if video.ndim != 5:
            raise ValueError(f"prompt videos must be (B, C, T, H, W) or images (B, C, H, W), got {tuple(video.shape)}")
        return video.to(self.device)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(self._as_video(video))

    def _output(self, latents: torch.Tensor, output_type: str,
                finish_video: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Any:
        if output_type == "latent":
            if finish_video is None:
                return latents
            if not isinstance(self.vae, IdentityVAE):  # the loop's output joins two decoded videos
                raise ValueError("output_type='latent' is not available for 'loop' with a compressing VAE (its output joins "
                                 "decoded videos); use 'pt' or 'np'")
            return finish_video(latents)
        video = self.vae.decode(latents)
        if finish_video is not None:
            video = finish_video(video)
        video = video.clamp(-1, 1)
        if output_type == "pt":
            return video
        if output_type == "np":
            return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        raise ValueError(f"output_type={output_type!r} is not supported; choose 'pt', 'np' or 'latent'")

    # -- tasks: each one entry of GENERATION_MODES --------------------------------------------
    @torch.no_grad()
    def generate(self, mode: str, *, prompt: str | Sequence[str] | None = None,
                 negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | Sequence[float] | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt",
                 model_kwargs: dict[str, Any] | None = None, **inputs: Any) -> Any:
        """Generate with the mode ``mode`` of :data:`GENERATION_MODES`.

        Args:
            mode: a table key (``"text_to_video"``, ``"image"``, ``"image_to_video"``,
                ``"extend_forward"``, ``"extend_backward"``, ``"interpolate"``, ``"loop"``,
                ``"sdedit"``).
            prompt, negative_prompt: captions (need a ``text_encoder``).
            num_inference_steps, guidance_scale: None = the pipeline's.
            generator, latents, output_type: as ``__call__``.
            model_kwargs: extra conditioning passed to the model as is (``class_labels``, or
                ``text_emb``/``text_mask`` encoded elsewhere), batch-first like the layout.
            **inputs: the mode's inputs (``GENERATION_MODES[mode].inputs``), e.g. ``video``.
        """
        entry = GENERATION_MODES.get(mode)
        if entry is None:
            raise ValueError(f"mode={mode!r} is not a generation mode; allowed: {list(GENERATION_MODES)}")
        unknown = sorted(set(inputs) - set(entry.inputs))
        if unknown:
            raise ValueError(f"mode {mode!r} takes inputs {list(entry.inputs)}; got unknown {unknown}")
        lay = entry.layout(self, **inputs)
        if lay.init_latents is not None and lay.strength == 0:
            return self._output(lay.init_latents, output_type)  # nothing destroyed, nothing to restore
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        out = self._sample(lay, prompt, negative_prompt, steps, guidance, generator, latents, model_kwargs)
        return self._output(lay.finish(out) if lay.finish is not None else out, output_type, lay.finish_video)

    def _sample(self, lay: Layout, prompt, negative_prompt, num_inference_steps: int, guidance_scale: float | Sequence[float],
                generator, latents, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        cond, uncond = self._cond(prompt, lay.shape[0], negative_prompt)
        cond = {**(model_kwargs or {}), **cond}
        return sample(self.model, lay.shape, cond, uncond_kwargs=uncond, guidance_scale=guidance_scale,
                      num_inference_steps=num_inference_steps, sampler=self.sampler, shift=self.shift_for(lay.shape),
                      grid=self.grid, generator=generator, latents=latents, context=lay.context, context_mask=lay.mask,
                      device=self.device, init_latents=lay.init_latents, strength=lay.strength)

    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 height: int = 32, width: int = 32, num_frames: int = 8, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt", batch_size: int = 1) -> Any:
        """Text-to-video (``num_frames=1``: an image)."""
        return self.generate("text_to_video", prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                             num_frames=num_frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             generator=generator, latents=latents, output_type=output_type, batch_size=batch_size)

    def image_to_video(self, image: torch.Tensor, num_frames: int = 8, **kwargs: Any) -> Any:
        """Animate ``image`` (B, C, H, W) in [-1, 1]: it becomes the clean first frame."""
        return self.generate("image_to_video", image=image, num_frames=num_frames, **kwargs)

    def extend(self, video: torch.Tensor, num_new_frames: int, direction: str = "forward", **kwargs: Any) -> Any:
        """Continue ``video`` (B, C, T, H, W) forward in time, or backward (what came before)."""
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction={direction!r} must be 'forward' or 'backward'")
        return self.generate(f"extend_{direction}", video=video, num_new_frames=num_new_frames, **kwargs)

    def interpolate(self, start: torch.Tensor, end: torch.Tensor, num_frames_between: int, **kwargs: Any) -> Any:
        """Fill ``num_frames_between`` frames that connect clip ``start`` to clip ``end``."""
        return self.generate("interpolate", start=start, end=end, num_frames_between=num_frames_between, **kwargs)

    def loop(self, video: torch.Tensor, num_transition_frames: int, context_frames: int = 2, **kwargs: Any) -> Any:
        """Make ``video`` loop seamlessly: generate frames that lead from its end back to its start.

        Returns the video followed by the transition (drop nothing: playing it on repeat loops).
        """
        return self.generate("loop", video=video, num_transition_frames=num_transition_frames,
                             context_frames=context_frames, **kwargs)

    @torch.no_grad()
    def rollout(self, video: torch.Tensor, num_frames: int, window: int, context_frames: int,
                generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """World rollout: extend ``video`` forward, window by window, to ``num_frames`` frames.

        Each window gives the model the last ``context_frames`` frames made so far and asks for
        up to ``window - context_frames`` new ones (``extend_forward``), so every model call sees
        at most ``window`` frames whatever ``num_frames`` is: memory stays flat in the length.

        Args:
            video: (B, C, T, H, W) in [-1, 1], T >= ``context_frames``: the start of the rollout.
            num_frames: frames of the returned video (the given ones included), > T.
            window: frames per model call (the length the model was trained on).
            context_frames: frames carried from one window to the next, in [1, window - 1].
            generator: shared by all windows (reproducible rollouts).
            **kwargs: sampling arguments of :meth:`generate` (``prompt``, ``model_kwargs``, ...).

        Returns:
            (B, C, num_frames, H, W) float in [-1, 1] on the CPU.
        """
        T = video.shape[2]
        if not 1 <= context_frames < window:
            raise ValueError(f"context_frames={context_frames} must lie in [1, window - 1 = {window - 1}]")
        if T < context_frames:
            raise ValueError(f"the video has {T} frames; a rollout with context_frames={context_frames} needs at least that many")
        if num_frames <= T:
            raise ValueError(f"num_frames={num_frames} must exceed the {T} frames given")
        kwargs.pop("output_type", None)
        chunks, last = [video.cpu()], video[:, :, -context_frames:]
        made = T
        while made < num_frames:
            new = min(window - context_frames, num_frames - made)
            out = self.generate("extend_forward", video=last, num_new_frames=new, generator=generator, output_type="pt", **kwargs)
            fresh = out[:, :, context_frames:]
            chunks.append(fresh.cpu())
            last = out[:, :, -context_frames:]
            made += fresh.shape[2]
        return torch.cat(chunks, dim=2)

    def sdedit(self, video: torch.Tensor, strength: float = 0.6, **kwargs: Any) -> Any:
        """SDEdit (Meng et al. 2022): run the last ``strength`` of the schedule on ``video`` noised
        to that point (diffusers' img2img meaning), toward ``prompt`` if given. Small strengths
        keep layout and motion; 1.0 ignores the input; 0 returns it."""
        return self.generate("sdedit", video=video, strength=strength, **kwargs)


# ---------------------------------------------------------------------------------------------
# Generation modes: each builds one context layout (the Sora report's prompting modes).
# ---------------------------------------------------------------------------------------------


def _text_to_video(pipe: VideoPipeline, height: int = 32, width: int = 32, num_frames: int = 8, batch_size: int = 1) -> Layout:
    c, t, h, w = pipe.vae.latent_shape(num_frames, height, width)
    return Layout((batch_size, c, t, h, w))  # nothing given


def _image(pipe: VideoPipeline, height: int = 32, width: int = 32, batch_size: int = 1) -> Layout:
    return _text_to_video(pipe, height, width, 1, batch_size)  # one frame


def _layout(pipe: VideoPipeline, parts: Sequence[torch.Tensor | int], names: str,
            finish_video: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Layout:
    """The layout of given pixel clips and free pixel gaps (``sparse_dit.context_layout``): the
    clips are encoded in their place in a full-length video, so latent groups line up with a
    causal VAE's ``1 + k * ft`` grouping; ``names`` says which inputs set the length (errors)."""
    parts = [pipe._as_video(p) if isinstance(p, torch.Tensor) else p for p in parts]
    total = sum(p if isinstance(p, int) else p.shape[2] for p in parts)
    ft = pipe.vae.temporal_compression
    if ft > 1 and (total - 1) % ft:
        lo, hi = fitting_lengths(total, ft)
        raise ValueError(f"the layout has {total} frames ({names}); the VAE (temporal compression {ft}) needs 1 + {ft}k frames: "
                         f"change the counts by {lo - total} or +{hi - total}")
    lay = place_clips(parts, pipe.vae.encode, ft)
    if lay.partial:
        warnings.warn(f"given frames {list(lay.partial)} share a latent group (the VAE groups frames as [0], [1..{ft}], "
                      f"[{ft + 1}..{2 * ft}], ...) with generated frames: they are generated, guided by the given groups, not "
                      f"held; a clip is held whole when it starts the video with 1 + {ft}a frames, or starts at 1 + {ft}j "
                      f"with {ft}a frames or runs to the end (docs/generation.md)", stacklevel=4)
    return Layout(tuple(lay.context.shape), lay.context, lay.mask, partial=lay.partial, finish_video=finish_video)


def _image_to_video(pipe: VideoPipeline, image: torch.Tensor, num_frames: int = 8) -> Layout:
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    return _layout(pipe, [image, num_frames - 1], f"num_frames={num_frames}")  # [img, _, _, _]


def _count(name: str, frames: int) -> int:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"{name}={frames!r} is not allowed; use an int >= 1 (pixel frames)")
    return frames


def _extend_forward(pipe: VideoPipeline, video: torch.Tensor, num_new_frames: int) -> Layout:
    n = _count("num_new_frames", num_new_frames)
    return _layout(pipe, [video, n], f"video {pipe._as_video(video).shape[2]} + num_new_frames={n}")  # [v0 v1 v2, _, _]


def _extend_backward(pipe: VideoPipeline, video: torch.Tensor, num_new_frames: int) -> Layout:
    n = _count("num_new_frames", num_new_frames)
    return _layout(pipe, [n, video], f"num_new_frames={n} + video {pipe._as_video(video).shape[2]}")  # [_, _, v0 v1 v2]


def _interpolate(pipe: VideoPipeline, start: torch.Tensor, end: torch.Tensor, num_frames_between: int) -> Layout:
    n = _count("num_frames_between", num_frames_between)
    a, b = pipe._as_video(start), pipe._as_video(end)
    return _layout(pipe, [a, n, b], f"start {a.shape[2]} + num_frames_between={n} + end {b.shape[2]}")  # [a0 a1, _, _, b0 b1]


def _loop(pipe: VideoPipeline, video: torch.Tensor, num_transition_frames: int, context_frames: int = 2) -> Layout:
    v = pipe._as_video(video)
    gap = _count("num_transition_frames", num_transition_frames)
    k = min(_count("context_frames", context_frames), v.shape[2])
    recon = pipe.vae.decode(pipe.vae.encode(v))  # the video as the VAE gives it back (itself in pixel space)
    # Sampled: [v_end, transition, v_start]; returned: the video followed by the transition
    # (decoded in its layout), so playing it on repeat loops.
    return _layout(pipe, [v[:, :, -k:], gap, v[:, :, :k]], f"context_frames={k} + num_transition_frames={gap} + context_frames={k}",
                   finish_video=lambda out: torch.cat([recon, out[:, :, k : k + gap]], dim=2))


def _sdedit(pipe: VideoPipeline, video: torch.Tensor, strength: float = 0.6) -> Layout:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength} must lie in [0, 1]")
    z0 = pipe._encode(video)
    return Layout(tuple(z0.shape), init_latents=z0, strength=strength)  # no context: every frame noised


@dataclass(frozen=True)
class GenerationMode:
    """One entry of :data:`GENERATION_MODES`.

    Args:
        name: the table key (``--mode`` of a CLI).
        layout: ``layout(pipe, **inputs) -> Layout``.
        description: one line for help texts.
    """

    name: str
    layout: Callable[..., Layout]
    description: str

    @property
    def inputs(self) -> tuple[str, ...]:
        """The mode's input names, in order (the ``layout`` function's parameters after ``pipe``)."""
        return tuple(inspect.signature(self.layout).parameters)[1:]


GENERATION_MODES: dict[str, GenerationMode] = {
    m.name: m
    for m in (
        GenerationMode("text_to_video", _text_to_video, "a video from noise (and a prompt); nothing given"),
        GenerationMode("image", _image, "a single frame from noise (and a prompt)"),
        GenerationMode("image_to_video", _image_to_video, "an image is the clean first frame; the rest is generated"),
        GenerationMode("extend_forward", _extend_forward, "a video is given; frames after it are generated"),
        GenerationMode("extend_backward", _extend_backward, "a video is given; frames before it are generated"),
        GenerationMode("interpolate", _interpolate, "two clips are given; the frames between are generated"),
        GenerationMode("loop", _loop, "a video's end and start are given; the transition back is appended"),
        GenerationMode("sdedit", _sdedit, "a video is noised and the last `strength` of the schedule denoises it (SDEdit)"),
    )
}
