"""Templated natural-language captions for physics-world scenes.

A caption names every ball's colour and size, its motion (speed word and direction) and what
happens in the scenario. Size and speed words are relative to PhyWorld's in-distribution ranges
(radius 0.7-1.5 units, speed 1-4 units/s), so out-of-distribution balls read as "tiny"/"huge"
and "very slowly"/"very fast". A few phrasings per scenario (picked by the video's own random
generator) keep the text encoder from seeing one fixed sentence.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from sparse_dit.data.physics import Ball, Scene

__all__ = ["size_word", "speed_word", "direction_word", "caption_for"]

_NUMBERS = {1: "One", 2: "Two", 3: "Three", 4: "Four"}


def size_word(radius_units: float) -> str:
    """Size adjective for a radius in world units.

    Args:
        radius_units: ball radius in world units.
    """
    for bound, word in ((0.65, "tiny"), (0.97, "small"), (1.23, "medium"), (1.55, "large")):
        if radius_units < bound:
            return word
    return "huge"


def speed_word(speed_units: float) -> str:
    """Adverb for a speed in world units per second.

    Args:
        speed_units: speed in world units per second.
    """
    for bound, word in ((0.9, "very slowly"), (2.0, "slowly"), (3.0, "steadily"), (4.25, "fast")):
        if speed_units < bound:
            return word
    return "very fast"


def direction_word(vx: float, vy: float) -> str:
    """Compass-like direction of a velocity in pixel coordinates (y points down).

    Args:
        vx: horizontal velocity (positive = right).
        vy: vertical velocity (positive = down).
    """
    if math.hypot(vx, vy) < 1e-9:
        return "nowhere"
    angle = math.degrees(math.atan2(-vy, vx)) % 360.0  # counter-clockwise from "right", y up
    words = ["to the right", "up and to the right", "upwards", "up and to the left",
             "to the left", "down and to the left", "downwards", "down and to the right"]
    return words[int(((angle + 22.5) % 360.0) // 45.0)]


def _describe(ball: "Ball") -> str:
    return f"{size_word(ball.radius_units)} {ball.color} ball"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption_for(scene: "Scene", rng: np.random.Generator) -> str:
    """Caption one scene.

    Args:
        scene: the sampled scene (initial conditions).
        rng: the video's random generator (picks one phrasing).
    """
    balls = scene.balls
    pick = int(rng.integers(2))
    if scene.scenario == "uniform":
        b = balls[0]
        what, speed, where = _describe(b), speed_word(b.speed_units), direction_word(*b.velocity)
        text = [f"{_article(what)} moves {speed} {where} in a straight line.",
                f"{_article(what)} glides {where} at a constant speed, moving {speed}."][pick]
    elif scene.scenario == "collision":
        a, b = balls
        heavier = a if a.mass > b.mass else b
        text = [f"{_article(_describe(a))} and {_article(_describe(b))} move towards each other and collide.",
                f"{_article(_describe(a))} moving {speed_word(a.speed_units)} collides with {_article(_describe(b))} moving {speed_word(b.speed_units)}."][pick]
        text += f" The {heavier.color} ball is heavier." if abs(a.mass - b.mass) > 0.15 * max(a.mass, b.mass) else " Both balls weigh about the same."
    elif scene.scenario == "parabola":
        b = balls[0]
        side = "to the right" if b.velocity[0] > 0 else "to the left"
        text = [f"{_article(_describe(b))} is thrown {side} and falls along a parabola.",
                f"{_article(_describe(b))} flies {speed_word(b.speed_units)} {side} while gravity pulls it down."][pick]
    elif scene.scenario == "bounce":
        if len(balls) == 1:
            text = f"{_article(_describe(balls[0]))} bounces off the walls of a box under gravity."
        else:
            parts = [_article(_describe(b)) for b in balls]
            listing = ", ".join(parts[:-1]) + " and " + parts[-1]
            text = [f"{_NUMBERS[len(balls)]} balls, {listing}, bounce around a box under gravity.",
                    f"{listing[0].upper() + listing[1:]} fall and bounce off the walls and each other."][pick]
    else:  # occlusion
        parts = [f"{_article(_describe(b))} moves {speed_word(b.speed_units)} {direction_word(*b.velocity)}" for b in balls]
        text = " and ".join(parts)
        text = text[0].upper() + text[1:]
        text += ", passing behind a grey wall." if len(balls) == 1 else "; both pass behind a grey wall."
    return text[0].upper() + text[1:]
