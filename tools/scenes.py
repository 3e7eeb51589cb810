"""Synthetic clips for the demo model: one coloured shape moving in a straight line over a plain background, with the
caption that says so, and the inverse: reading those attributes back from a video (the semantic tests' measure).

A scene is drawn from a seed, so the training data is generated on the fly and is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The colours the captions name, as RGB; an object never has its background's colour.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("ball", "square", "triangle")
# caption phrase -> unit motion (x right, y down, in pixels)
DIRECTIONS = {"to the right": (1, 0), "to the left": (-1, 0), "up": (0, -1), "down": (0, 1)}


def caption(colour: str, shape: str, direction: str, background: str) -> str:
    return f"a {colour} {shape} moves {direction} on a {background} background"


def vocabulary() -> list[str]:
    """Every word a caption can hold, in a fixed order (the demo tokenizer's words)."""
    words: list[str] = []
    for text in ("a moves on background", *COLOURS, *SHAPES, *DIRECTIONS):
        words += [w for w in text.split() if w not in words]
    return words


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    direction: str
    background: str
    size: float  # half the object's width, pixels
    start: tuple[float, float]  # centre at the first frame (x, y)
    travel: float  # pixels moved from the first frame to the last

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction, self.background)

    def centre(self, progress: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.start[0] + dx * self.travel * progress, self.start[1] + dy * self.travel * progress


def random_scene(rng: np.random.Generator, size: int = 64, anywhere: bool = False, **fixed) -> Scene:
    """A scene whose object stays inside a ``size`` x ``size`` frame; ``fixed`` attributes (``colour="red"``) are
    kept, the others drawn from ``rng``. The path is centred in the frame (give or take 3 px on each axis), so the
    caption says nearly all there is to draw; ``anywhere``: it may start anywhere it stays in frame (the VAE's
    wider training set)."""
    colour = fixed.get("colour") or str(rng.choice([c for c in COLOURS if c != fixed.get("background")]))
    background = fixed.get("background") or str(rng.choice([c for c in COLOURS if c != colour]))
    shape = fixed.get("shape") or str(rng.choice(SHAPES))
    direction = fixed.get("direction") or str(rng.choice(list(DIRECTIONS)))
    half = float(rng.uniform(0.11, 0.15) * size)
    if anywhere:
        travel = float(rng.uniform(0.38, 0.52) * size)
        low, high = half + 2, size - half - 2
        along, across = float(rng.uniform(low, high - travel)), float(rng.uniform(low, high))
    else:
        travel = float(rng.uniform(0.40, 0.48) * size)
        along, across = size / 2 - travel / 2 + float(rng.uniform(-3, 3)), size / 2 + float(rng.uniform(-3, 3))
    dx, dy = DIRECTIONS[direction]
    along = along if dx + dy > 0 else size - along  # moving left / up starts at the far side
    start = (along, across) if dx else (across, along)
    return Scene(colour, shape, direction, background, half, start, travel)


def coverage(scene: Scene, progress: float, size: int) -> np.ndarray:
    """How much of each pixel the object covers, ``[size, size]`` in [0, 1] (edges antialiased over one pixel)."""
    cx, cy = scene.centre(progress)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u, v = x - cx, y - cy
    r = scene.size
    if scene.shape == "ball":
        outside = np.hypot(u, v) - r
    elif scene.shape == "square":
        outside = np.maximum(np.abs(u), np.abs(v)) - r
    else:  # triangle pointing up: apex (0, -r), base corners (+-r, r); half-width (v + r) / 2 at height v
        outside = np.maximum(v - r, (2 * np.abs(u) - (v + r)) / np.sqrt(5.0))
    return np.clip(0.5 - outside, 0.0, 1.0)


def render(scene: Scene, frames: int = 17, size: int = 64) -> np.ndarray:
    """The clip, ``[frames, size, size, 3]`` uint8."""
    background = np.array(COLOURS[scene.background], np.float32)
    colour = np.array(COLOURS[scene.colour], np.float32)
    video = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        alpha = coverage(scene, i / max(frames - 1, 1), size)[..., None]
        video[i] = np.rint(background + alpha * (colour - background))
    return video


# --- reading a video back -------------------------------------------------------------------------------------

def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    distances = [np.linalg.norm(rgb - np.array(COLOURS[n], np.float32)) for n in names]
    return names[int(np.argmin(distances))]


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no object found
    direction: str | None  # None: it did not move clearly
    motion: tuple[float, float]  # centroid shift from the first frame to the last (x, y), pixels
    object_pixels: float  # mean object area per frame


def read_video(video: np.ndarray, min_travel: float = 0.12) -> Reading:
    """What a ``[frames, H, W, 3]`` uint8 video shows: the background colour (the median pixel), the object (pixels
    far from the background), its colour (the median object pixel) and where its centroid went (``direction`` when
    it moved at least ``min_travel`` of the frame width, mostly along one axis)."""
    pixels = video.astype(np.float32)
    background_rgb = np.median(pixels.reshape(-1, 3), axis=0)
    far = np.linalg.norm(pixels - background_rgb, axis=-1) > 80  # [frames, H, W]
    area = far.sum(axis=(1, 2))
    if area.min() < 4:
        return Reading(nearest_colour(background_rgb), None, None, (0.0, 0.0), float(area.mean()))
    colour = nearest_colour(np.median(pixels[far], axis=0))
    y, x = np.mgrid[0:video.shape[1], 0:video.shape[2]]
    centroids = np.array([(x[m].mean(), y[m].mean()) for m in far])
    quarter = max(len(centroids) // 4, 1)
    shift = centroids[-quarter:].mean(axis=0) - centroids[:quarter].mean(axis=0)
    direction = None
    axis = int(np.argmax(np.abs(shift)))
    if abs(shift[axis]) >= min_travel * video.shape[2] and abs(shift[1 - axis]) < 0.5 * abs(shift[axis]):
        unit = [0, 0]
        unit[axis] = int(np.sign(shift[axis]))
        direction = next(name for name, d in DIRECTIONS.items() if list(d) == unit)
    return Reading(nearest_colour(background_rgb), colour, direction, (float(shift[0]), float(shift[1])),
                   float(area.mean()))
