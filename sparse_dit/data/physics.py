"""A simulated physics world: pymunk ground truth, anti-aliased frames and templated captions.

Scenarios (issue 4), the first three from PhyWorld (Kang et al. 2024, "How Far is Video
Generation from World Model: A Physical Law Perspective"):

- ``uniform``: one ball moving at constant velocity, no gravity;
- ``collision``: two balls approach each other and collide elastically (restitution 1), no
  gravity, so kinetic energy and momentum are conserved;
- ``parabola``: one ball launched sideways under gravity;
- ``bounce``: 1-4 balls under gravity inside a box whose walls are the frame edges (fewer when
  large ood balls leave no room for the next one);
- ``occlusion``: 1-2 balls move horizontally between elastic side walls and pass behind a
  static grey bar (object permanence).

Units. Parameters are sampled in *world units*: the shorter frame side is 10 units (PhyWorld's
scene is 10 units across), so a scene looks the same at any resolution or aspect ratio and ball
radii scale with the frame. Time is in seconds; ``fps`` only sets how the trajectory is sampled.
States are stored in pixels: ``position`` in pixel coordinates (x right, y down, pixel centres at
j + 0.5, i + 0.5), ``velocity`` in pixels per frame, ``radius`` in pixels.

Splits. ``id`` samples radius and speed from PhyWorld's training ranges, ``ood`` puts the speed,
the radius or both outside them (PhyWorld's out-of-distribution bands; see ID_RANGES and
OOD_RANGES). ``params["ood"]`` lists which fields were moved out of distribution.

Determinism: video ``i`` of ``(scenario, split, seed)`` is drawn from its own generator seeded by
``(seed, scenario, split, i)``, so results do not depend on the number of workers.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pymunk

from sparse_dit.data.captions import caption_for
from sparse_dit.data.render import OCCLUDER_COLOR, PALETTE, PALETTE_NAMES, render_balls

__all__ = [
    "SCENARIOS",
    "SPLITS",
    "UNITS_PER_SHORT_SIDE",
    "ID_RANGES",
    "OOD_RANGES",
    "GRAVITY",
    "MIN_RADIUS_PX",
    "Ball",
    "Scene",
    "sample_scene",
    "simulate",
    "generate_video",
    "generate_physics_videos",
    "iter_physics_videos",
    "parse_scenarios",
]

SCENARIOS: tuple[str, ...] = ("uniform", "collision", "parabola", "bounce", "occlusion")
SPLITS: tuple[str, ...] = ("id", "ood")

# PhyWorld's scene is 10 units across; our shorter frame side is 10 units.
UNITS_PER_SHORT_SIDE = 10.0

# PhyWorld's in-distribution ranges (radius in units, speed in units/s) ...
ID_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    "radius": ((0.7, 1.5),),
    "speed": ((1.0, 4.0),),
}
# ... and its out-of-distribution bands. PhyWorld's upper radius band is [1.5, 2.0]; it starts at
# 1.6 here so that every ood radius is strictly outside the id range.
OOD_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    "radius": ((0.3, 0.6), (1.6, 2.0)),
    "speed": ((0.0, 0.8), (4.5, 6.0)),
}

# units/s^2: a ball dropped from the top reaches the bottom (10 units) in ~3.2 s, PhyWorld's clip
# length (32 frames at 0.1 s), so parabolas and bounces stay on screen for most of a clip.
GRAVITY = 2.0

# A ball thinner than this covers fewer than ~3 pixels and its colour mask becomes unreliable;
# radii (in pixels) are clamped up to it at very small resolutions.
MIN_RADIUS_PX = 1.0

# Tolerance (pixels) for "wholly inside the frame": the physics engine lets a ball sink this far
# into a wall for one substep, which moves its mask centroid by far less than a pixel.
_INSIDE_EPS = 0.1


@dataclass
class Ball:
    """One ball's initial state, in pixels (position) and pixels per second (velocity)."""

    color: str
    radius_units: float
    speed_units: float
    radius: float
    position: tuple[float, float]
    velocity: tuple[float, float]

    @property
    def mass(self) -> float:
        """Mass with unit density in world units: pi * r^2 (2D discs)."""
        return math.pi * self.radius_units**2


@dataclass
class Scene:
    """A sampled scene: balls, forces, walls and occluders, all in pixels and seconds."""

    scenario: str
    split: str
    height: int
    width: int
    balls: list[Ball]
    gravity: float = 0.0  # pixels / s^2, pointing down (+y)
    walls: bool = False
    wall_elasticity: float = 1.0
    occluders: list[tuple[float, float, float, float]] = field(default_factory=list)
    ood: list[str] = field(default_factory=list)

    @property
    def pixels_per_unit(self) -> float:
        return min(self.height, self.width) / UNITS_PER_SHORT_SIDE


def parse_scenarios(scenario: str | list[str] | tuple[str, ...]) -> list[str]:
    """Accept a scenario name, a comma-separated list, a sequence, or "all".

    Args:
        scenario: e.g. ``"collision"``, ``"uniform,parabola"`` or ``"all"``.
    """
    names = scenario.split(",") if isinstance(scenario, str) else list(scenario)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(SCENARIOS)
    bad = [n for n in names if n not in SCENARIOS]
    if bad or not names:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)} (comma-separated) or 'all', got {scenario!r}")
    return names


def _check(split: str, frames: int, height: int, width: int, fps: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if height < 8 or width < 8:
        raise ValueError(f"resolution must be at least 8x8 pixels, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")


def _uniform_bands(rng: np.random.Generator, bands: tuple[tuple[float, float], ...]) -> float:
    widths = np.array([hi - lo for lo, hi in bands])
    lo, hi = bands[int(rng.choice(len(bands), p=widths / widths.sum()))]
    return float(rng.uniform(lo, hi))


def _sample_fields(rng: np.random.Generator, split: str) -> tuple[dict, list[str]]:
    """Band tables for radius and speed, and which fields are out of distribution."""
    ood: list[str] = []
    if split == "ood":
        ood = [["speed"], ["radius"], ["speed", "radius"]][int(rng.integers(3))]
    bands = {f: (OOD_RANGES[f] if f in ood else ID_RANGES[f]) for f in ("radius", "speed")}
    return bands, ood


def _direction(theta: float) -> np.ndarray:
    return np.array([math.cos(theta), math.sin(theta)])


def sample_scene(scenario: str, split: str, height: int, width: int, duration: float, rng: np.random.Generator) -> Scene:
    """Sample the initial conditions of one scene.

    Args:
        scenario: one of SCENARIOS.
        split: ``"id"`` or ``"ood"``.
        height: frame height in pixels.
        width: frame width in pixels.
        duration: clip length in seconds (used to time collisions and occlusions).
        rng: the random generator (consumed).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ppu = min(height, width) / UNITS_PER_SHORT_SIDE
    bands, ood = _sample_fields(rng, split)
    if scenario == "bounce":
        num_balls = int(rng.integers(1, 5))
    elif scenario == "occlusion":
        num_balls = int(rng.integers(1, 3))
    else:
        num_balls = 2 if scenario == "collision" else 1
    colors = [PALETTE_NAMES[i] for i in rng.permutation(len(PALETTE_NAMES))[:num_balls]]
    r_units = [_uniform_bands(rng, bands["radius"]) for _ in range(num_balls)]
    v_units = [_uniform_bands(rng, bands["speed"]) for _ in range(num_balls)]
    r_px = [max(r * ppu, MIN_RADIUS_PX) for r in r_units]
    v_px = [v * ppu for v in v_units]
    W, H = float(width), float(height)
    scene = Scene(scenario, split, height, width, balls=[], ood=list(ood))

    def add(k: int, pos, vel) -> None:
        scene.balls.append(Ball(colors[k], r_units[k], v_units[k], r_px[k], (float(pos[0]), float(pos[1])), (float(vel[0]), float(vel[1]))))

    def inside(lo: float, hi: float) -> float:  # a coordinate in [lo, hi], centre if empty
        return float(rng.uniform(lo, hi)) if hi > lo else 0.5 * (lo + hi)

    if scenario == "uniform":
        # Start inside the frame and head towards a point near the centre, so that the ball is
        # on screen for as long as its speed allows.
        r, d = r_px[0], _direction(rng.uniform(0, 2 * math.pi))
        centre = np.array([inside(max(r, W / 3), min(W - r, 2 * W / 3)), inside(max(r, H / 3), min(H - r, 2 * H / 3))])
        # Largest step back along -d that keeps the ball wholly inside the frame.
        limits = [((W - r - centre[0]) if -d[0] > 0 else (centre[0] - r)) / max(abs(d[0]), 1e-9),
                  ((H - r - centre[1]) if -d[1] > 0 else (centre[1] - r)) / max(abs(d[1]), 1e-9)]
        back = rng.uniform(0.0, max(0.0, min(limits)))
        add(0, centre - back * d, v_px[0] * d)
    elif scenario == "collision":
        r1, r2 = r_px
        # Vertical offset below the sum of radii: collisions are head-on or oblique, never misses.
        dy = float(rng.uniform(-0.5, 0.5)) * (r1 + r2)
        contact = math.sqrt((r1 + r2) ** 2 - dy**2)  # horizontal centre distance at contact
        closing = v_px[0] + v_px[1]
        t_hit = float(rng.uniform(0.2, 0.5)) * duration
        room = W - r1 - r2 - contact  # largest extra separation that fits in the frame
        gap = min(closing * t_hit, max(room, 0.0))
        sep = contact + gap
        left = inside(r1, W - r2 - sep)
        y = inside(max(r1, r2) + abs(dy), H - max(r1, r2) - abs(dy))
        add(0, (left, y - dy / 2), (v_px[0], 0.0))
        add(1, (left + sep, y + dy / 2), (-v_px[1], 0.0))
        if rng.random() < 0.5:  # mirror left <-> right
            for b in scene.balls:
                b.position, b.velocity = (W - b.position[0], b.position[1]), (-b.velocity[0], b.velocity[1])
    elif scenario == "parabola":
        r = r_px[0]
        scene.gravity = GRAVITY * ppu
        sign = 1.0 if rng.random() < 0.5 else -1.0
        x = inside(r, min(W - r, r + 0.25 * W))
        y = inside(r + 0.1 * H, max(r + 0.1 * H, 0.4 * H))
        vy = -float(rng.uniform(0.0, 1.5)) * ppu  # an upward launch component (y points down)
        add(0, (x if sign > 0 else W - x, y), (sign * v_px[0], vy))
    elif scenario == "bounce":
        scene.gravity = GRAVITY * ppu
        scene.walls = True
        scene.wall_elasticity = float(rng.uniform(0.8, 1.0))
        placed: list[tuple[float, float, float]] = []
        for k in range(num_balls):
            r = r_px[k]
            for _ in range(200):  # rejection sampling of non-overlapping positions
                p = (inside(r, W - r), inside(r, H - r))
                if all(math.hypot(p[0] - qx, p[1] - qy) > r + rq + 0.5 for qx, qy, rq in placed):
                    break
            else:  # rare (large ood balls crowd the box): keep the balls placed so far
                break
            placed.append((p[0], p[1], r))
            add(k, p, v_px[k] * _direction(rng.uniform(0, 2 * math.pi)))
    else:  # occlusion
        # Elastic walls at the frame edges keep the balls on screen, so they pass behind the bar
        # again and again; the bar is just wider than the largest ball, so it can hide it whole.
        scene.walls = True
        r_max = max(r_px)
        bar_w = 2 * r_max + float(rng.uniform(0.2, 0.6)) * ppu
        bar_x = W / 2 + float(rng.uniform(-0.1, 0.1)) * W
        scene.occluders = [(bar_x - bar_w / 2, 0.0, bar_x + bar_w / 2, H)]
        lanes = [H / 2] if num_balls == 1 else [H * 0.28, H * 0.72]  # separate lanes: no contact
        for k in range(num_balls):
            r = r_px[k]
            if rng.random() < 0.5:  # start wholly visible left of the bar, move right
                x, vx = inside(r, bar_x - bar_w / 2 - r), v_px[k]
            else:
                x, vx = inside(bar_x + bar_w / 2 + r, W - r), -v_px[k]
            y = lanes[k] + float(rng.uniform(-0.05, 0.05)) * H
            add(k, (x, y), (vx, 0.0))
    return scene


def simulate(scene: Scene, frames: int, fps: float, substeps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run pymunk and sample ball states at the frame times t = i / fps.

    Args:
        scene: the sampled scene.
        frames: number of frames T.
        fps: frames per second.
        substeps: physics steps per frame; by default enough that no ball moves more than a
            quarter of the smallest radius per step (no tunnelling through walls or balls).

    Returns:
        ``(positions, velocities)``: float32 (T, K, 2) in pixels and pixels per frame.
    """
    space = pymunk.Space()
    space.gravity = (0.0, scene.gravity)
    space.collision_slop = 0.01  # pixels of allowed overlap; small so states match pixels
    bodies = []
    for ball in scene.balls:
        body = pymunk.Body(ball.mass, pymunk.moment_for_circle(ball.mass, 0.0, ball.radius))
        body.position = ball.position
        body.velocity = ball.velocity
        shape = pymunk.Circle(body, ball.radius)
        shape.elasticity = 1.0  # pymunk multiplies elasticities: ball-ball collisions are elastic
        shape.friction = 0.0  # no spin, so all kinetic energy is translational
        space.add(body, shape)
        bodies.append(body)
    if scene.walls:
        h, w = float(scene.height), float(scene.width)
        for a, b in [((0, 0), (w, 0)), ((w, 0), (w, h)), ((w, h), (0, h)), ((0, h), (0, 0))]:
            wall = pymunk.Segment(space.static_body, a, b, 0.0)
            wall.elasticity = scene.wall_elasticity
            wall.friction = 0.0
            space.add(wall)
    if substeps is None:
        fastest = max([math.hypot(*b.velocity) for b in scene.balls] + [0.0]) / fps
        fastest += scene.gravity * frames / fps / fps  # speed gained by falling during the clip
        smallest = min(b.radius for b in scene.balls)
        substeps = max(10, math.ceil(fastest / (0.25 * smallest)))
    dt = 1.0 / (fps * substeps)
    pos = np.empty((frames, len(bodies), 2), dtype=np.float64)
    vel = np.empty_like(pos)
    for i in range(frames):
        if i > 0:
            for _ in range(substeps):
                space.step(dt)
        for k, body in enumerate(bodies):
            pos[i, k] = body.position
            vel[i, k] = body.velocity
    return pos.astype(np.float32), (vel / fps).astype(np.float32)


def _visibility(scene: Scene, positions: np.ndarray) -> np.ndarray:
    """(T, K) bool: ball wholly inside the frame (within _INSIDE_EPS) and touching no occluder."""
    radii = np.array([b.radius for b in scene.balls], dtype=np.float64)[None, :]
    x, y = positions[..., 0].astype(np.float64), positions[..., 1].astype(np.float64)
    vis = (x - radii >= -_INSIDE_EPS) & (x + radii <= scene.width + _INSIDE_EPS)
    vis &= (y - radii >= -_INSIDE_EPS) & (y + radii <= scene.height + _INSIDE_EPS)
    for x0, y0, x1, y1 in scene.occluders:
        # Distance from the ball centre to the rectangle; the disc overlaps it when < radius.
        dx = np.maximum(np.maximum(x0 - x, 0.0), x - x1)
        dy = np.maximum(np.maximum(y0 - y, 0.0), y - y1)
        vis &= np.hypot(dx, dy) >= radii
    return vis


def generate_video(scenario: str, split: str, index: int, frames: int, height: int, width: int, seed: int, fps: float = 10.0) -> dict:
    """Simulate, render and caption one video; deterministic in its arguments.

    Args:
        scenario: one of SCENARIOS.
        split: ``"id"`` or ``"ood"``.
        index: the video's index in its dataset (selects its random stream).
        frames: number of frames T.
        height: frame height H.
        width: frame width W.
        seed: dataset seed.
        fps: frames per second (PhyWorld: 10, i.e. 0.1 s per frame).

    Returns:
        A row: ``video`` uint8 (T, H, W, 3), ``caption``, ``scenario``, ``states`` (numpy arrays
        ``position`` (T, K, 2), ``velocity`` (T, K, 2), ``radius`` (K,), ``color`` (K, 3) uint8,
        ``visible`` (T, K) bool), ``params`` (JSON string) and ``fps``.
    """
    _check(split, frames, height, width, fps)
    rng = np.random.default_rng([int(seed), SCENARIOS.index(scenario), SPLITS.index(split), int(index)])
    scene = sample_scene(scenario, split, height, width, frames / fps, rng)
    positions, velocities = simulate(scene, frames, fps)
    radii = np.array([b.radius for b in scene.balls], dtype=np.float32)
    colors = np.array([PALETTE[b.color] for b in scene.balls], dtype=np.uint8)
    video = render_balls(positions, radii, colors, height, width, np.array(scene.occluders).reshape(-1, 4) if scene.occluders else None)
    params = {
        "scenario": scenario,
        "split": split,
        "seed": int(seed),
        "index": int(index),
        "frames": frames,
        "height": height,
        "width": width,
        "fps": fps,
        "pixels_per_unit": scene.pixels_per_unit,
        "gravity_units": scene.gravity / scene.pixels_per_unit,
        "walls": scene.walls,
        "wall_elasticity": scene.wall_elasticity,
        "ball_elasticity": 1.0,
        "occluders": [list(o) for o in scene.occluders],
        "occluder_color": list(OCCLUDER_COLOR),
        "ood": scene.ood,
        "balls": [
            {
                "color": b.color,
                "radius_units": b.radius_units,
                "speed_units": b.speed_units,
                "mass": b.mass,
                "radius_px": b.radius,
                "position0_px": list(b.position),
                "velocity0_px_per_s": list(b.velocity),
            }
            for b in scene.balls
        ],
    }
    states = {
        "position": positions,
        "velocity": velocities,
        "radius": radii,
        "color": colors,
        "visible": _visibility(scene, positions),
    }
    return {
        "video": video,
        "caption": caption_for(scene, rng),
        "scenario": scenario,
        "states": states,
        "params": json.dumps(params),
        "fps": float(fps),
    }


def _job(args: tuple) -> dict:
    return generate_video(*args)


def _pool_context() -> mp.context.BaseContext:
    # fork is cheapest (no re-import); the children use numpy and pymunk only, never torch.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def iter_physics_videos(
    scenario: str | list[str],
    split: str,
    num_videos: int,
    frames: int,
    height: int,
    width: int,
    seed: int,
    fps: float = 10.0,
    workers: int | None = None,
    start: int = 0,
) -> Iterator[dict]:
    """Yield rows (see generate_video) in index order, generated by ``workers`` processes.

    Args:
        scenario: a scenario, a comma-separated list or "all"; video i uses scenario i mod n.
        split: ``"id"`` or ``"ood"``.
        num_videos: number of videos N.
        frames: frames per video T.
        height: frame height H.
        width: frame width W.
        seed: dataset seed.
        fps: frames per second.
        workers: processes (default: all cores); 1 or 0 generates in this process.
        start: index of the first video (to extend a dataset).
    """
    names = parse_scenarios(scenario)
    _check(split, frames, height, width, fps)
    if num_videos < 0:
        raise ValueError(f"num_videos must be >= 0, got {num_videos}")
    jobs = [(names[i % len(names)], split, i, frames, height, width, seed, fps) for i in range(start, start + num_videos)]
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or num_videos < 4:
        yield from map(_job, jobs)
        return
    with _pool_context().Pool(min(workers, num_videos)) as pool:
        yield from pool.imap(_job, jobs, chunksize=max(1, min(16, num_videos // (4 * workers))))


def generate_physics_videos(
    scenario: str | list[str],
    split: str,
    num_videos: int,
    frames: int,
    height: int,
    width: int,
    seed: int,
    fps: float = 10.0,
    workers: int | None = None,
) -> list[dict]:
    """Generate physics videos in memory (rows as in generate_video).

    Args:
        scenario: a scenario, a comma-separated list or "all".
        split: ``"id"`` or ``"ood"``.
        num_videos: number of videos.
        frames: frames per video.
        height: frame height.
        width: frame width.
        seed: dataset seed.
        fps: frames per second.
        workers: processes (default: all cores).
    """
    return list(iter_physics_videos(scenario, split, num_videos, frames, height, width, seed, fps, workers))
