"""Procedural billiards clips with exact ground truth.

A 2-D pool simulation (table coordinates in metres, x along the long rail, y across) with
rolling friction, elastic ball-ball collisions, cushion rebounds and six pockets, rendered
top-down with some camera realism (offset, lighting gradient, sensor noise, several cloth
colours). Image directions: x grows to the right, y grows downwards, so pocket ``top-left`` is
the corner at (0, 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

BALL_COLOURS: dict[str, tuple[int, int, int]] = {
    "yellow": (238, 200, 30),
    "blue": (30, 70, 205),
    "red": (212, 28, 28),
    "purple": (112, 40, 150),
    "orange": (245, 122, 20),
    "green": (24, 150, 60),
    "maroon": (120, 30, 36),
    "black": (18, 18, 18),
    "pink": (240, 125, 175),
}
CUE_COLOUR = (245, 245, 235)
CLOTH_COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (36, 112, 62),
    "blue": (40, 88, 150),
    "teal": (24, 112, 112),
    "burgundy": (112, 34, 48),
    "grey": (96, 100, 104),
}
POCKET_NAMES = ("top-left", "top-middle", "top-right", "bottom-left", "bottom-middle", "bottom-right")
DIRECTIONS = ("right", "bottom-right", "bottom", "bottom-left", "left", "top-left", "top", "top-right")


@dataclass
class TableConfig:
    """Physical and rendering settings. Defaults are a 7-ft table and real ball size x1.5."""

    length: float = 2.0  # metres, along x
    width: float = 1.0
    ball_radius: float = 0.0286 * 1.5
    pocket_radius: float = 0.075  # capture radius around each pocket centre
    rolling_decel: float = 0.55  # m/s^2
    cushion_restitution: float = 0.8
    ball_restitution: float = 0.95
    dt: float = 1 / 600
    image_size: int = 224
    min_balls: int = 2
    max_balls: int = 7
    stripes: bool = False
    noise_std: float = 3.0  # sensor noise, in 8-bit levels
    aimed_shot_rate: float = 0.8  # the rest are struck in a random direction


@dataclass
class Ball:
    colour: str  # "cue" for the cue ball
    x: float
    y: float
    striped: bool = False


@dataclass
class Pocketing:
    ball: str
    pocket: str
    time: float


@dataclass
class ShotTruth:
    """Everything the questions are about, measured by the simulation itself."""

    balls: list[Ball]
    cloth: str
    duration: float
    fps: int
    pocketed: list[Pocketing] = field(default_factory=list)
    first_contact: str | None = None
    scratch: bool = False
    cue_cushions: int = 0
    cue_direction: str = "right"
    balls_left: list[str] = field(default_factory=list)

    @property
    def object_pocketed(self) -> list[Pocketing]:
        return [p for p in self.pocketed if p.ball != "cue"]

    def to_json(self) -> dict:
        return asdict(self)


def pocket_centres(cfg: TableConfig) -> np.ndarray:
    """[6, 2] pocket centres, slightly outside the cushion line, in POCKET_NAMES order."""
    o = cfg.ball_radius * 0.6
    mid_o = cfg.ball_radius * 1.2
    length, width = cfg.length, cfg.width
    return np.array([
        [-o, -o], [length / 2, -mid_o], [length + o, -o],
        [-o, width + o], [length / 2, width + mid_o], [length + o, width + o],
    ])


def direction_name(vx: float, vy: float) -> str:
    """One of eight image directions (y grows downwards)."""
    angle = math.degrees(math.atan2(vy, vx)) % 360  # 0 = right, 90 = down
    return DIRECTIONS[int(((angle + 22.5) % 360) // 45)]


class Simulation:
    """Balls on a table; ``step`` advances by ``cfg.dt`` and records events."""

    def __init__(self, cfg: TableConfig, balls: list[Ball], velocity: tuple[float, float]):
        self.cfg = cfg
        self.names = [b.colour for b in balls]
        self.pos = np.array([[b.x, b.y] for b in balls], dtype=np.float64)  # [N, 2]
        self.vel = np.zeros_like(self.pos)
        self.vel[0] = velocity  # the cue ball is index 0
        self.on_table = np.ones(len(balls), dtype=bool)
        self.pockets = pocket_centres(cfg)
        self.time = 0.0
        self.pocketed: list[Pocketing] = []
        self.first_contact: str | None = None
        self.cue_cushions = 0

    def kinetic_energy(self) -> float:
        return float(0.5 * (self.vel[self.on_table] ** 2).sum())

    def moving(self) -> bool:
        return bool((np.abs(self.vel[self.on_table]) > 1e-6).any())

    def step(self) -> None:
        cfg, dt = self.cfg, self.cfg.dt
        live = self.on_table
        # rolling friction: speed drops by decel*dt, never reverses
        speed = np.linalg.norm(self.vel, axis=1)
        factor = np.maximum(speed - cfg.rolling_decel * dt, 0) / np.maximum(speed, 1e-12)
        self.vel *= factor[:, None]
        self.pos[live] += self.vel[live] * dt
        self._pockets()
        self._collisions()
        self._cushions()
        self.time += dt

    def _pockets(self) -> None:
        r = self.cfg.ball_radius
        d = np.linalg.norm(self.pos[:, None, :] - self.pockets[None], axis=2)  # [N, 6]
        off_table = ((self.pos < -r) | (self.pos > [self.cfg.length + r, self.cfg.width + r])).any(axis=1)
        falling = self.on_table & ((d.min(axis=1) < self.cfg.pocket_radius) | off_table)
        for i in np.flatnonzero(falling):
            self.on_table[i] = False
            self.vel[i] = 0
            self.pocketed.append(Pocketing(self.names[i], POCKET_NAMES[int(np.argmin(d[i]))], round(self.time, 4)))

    def _collisions(self) -> None:
        r2 = 2 * self.cfg.ball_radius
        delta = self.pos[None, :, :] - self.pos[:, None, :]  # [N, N, 2], b - a
        dist = np.linalg.norm(delta, axis=2)
        live = self.on_table[:, None] & self.on_table[None, :]
        hits = np.argwhere(np.triu(live & (dist < r2), k=1))
        for a, b in hits:  # rare: only the pairs in contact this step
            gap = self.pos[b] - self.pos[a]
            d = float(np.hypot(*gap))
            normal = gap / d if d > 1e-12 else np.array([1.0, 0.0])
            overlap = r2 - d  # push apart so they no longer overlap (equal masses: half each)
            self.pos[a] -= normal * overlap / 2
            self.pos[b] += normal * overlap / 2
            approach = float(np.dot(self.vel[a] - self.vel[b], normal))
            if approach > 0:
                impulse = (1 + self.cfg.ball_restitution) / 2 * approach * normal
                self.vel[a] -= impulse
                self.vel[b] += impulse
                if self.first_contact is None and 0 in (a, b):
                    self.first_contact = self.names[b if a == 0 else a]

    def _cushions(self) -> None:
        cfg = self.cfg
        r = cfg.ball_radius
        high = np.array([cfg.length - r, cfg.width - r])
        out = self.on_table[:, None] & ((self.pos < r) | (self.pos > high))  # [N, 2]
        # how far along a rail from each pocket centre a ball drops in rather than rebounds:
        # corner jaws open wider than side pockets
        mouth = np.array([2.2, 1.2, 2.2, 2.2, 1.2, 2.2]) * cfg.pocket_radius
        for i, axis in np.argwhere(out):
            p = self.pos[i, axis]
            rail = 0.0 if p < r else (cfg.length, cfg.width)[axis]
            # near a pocket mouth the ball may run on into the pocket
            on_rail = np.abs(self.pockets[:, axis] - rail) < 0.1
            if np.any(on_rail & (np.abs(self.pockets[:, 1 - axis] - self.pos[i, 1 - axis]) < mouth)):
                continue
            bound = r if p < r else high[axis]
            self.pos[i, axis] = 2 * bound - p
            if (p < r and self.vel[i, axis] < 0) or (p > high[axis] and self.vel[i, axis] > 0):
                self.vel[i, axis] *= -cfg.cushion_restitution
                if i == 0:
                    self.cue_cushions += 1


def random_layout(cfg: TableConfig, rng: np.random.Generator) -> list[Ball]:
    """The cue ball plus 2-7 object balls of distinct colours, not touching, away from pockets."""
    n = int(rng.integers(cfg.min_balls, cfg.max_balls + 1))
    colours = list(rng.choice(list(BALL_COLOURS), size=n, replace=False))
    pockets = pocket_centres(cfg)
    margin = cfg.ball_radius * 2
    balls: list[Ball] = []
    while len(balls) < n + 1:
        x = rng.uniform(margin, cfg.length - margin)
        y = rng.uniform(margin, cfg.width - margin)
        if np.min(np.linalg.norm(pockets - [x, y], axis=1)) < cfg.pocket_radius * 2.5:
            continue
        if any(math.hypot(b.x - x, b.y - y) < cfg.ball_radius * 3 for b in balls):
            continue
        colour = "cue" if not balls else str(colours[len(balls) - 1])
        balls.append(Ball(colour, float(x), float(y), striped=bool(cfg.stripes and colour != "cue" and rng.random() < 0.5)))
    return balls


def aim(cfg: TableConfig, balls: list[Ball], rng: np.random.Generator) -> tuple[float, float]:
    """Cue velocity: usually aimed with the ghost-ball method at a ball and a pocket, with error."""
    speed = rng.uniform(1.5, 3.0)
    cue = np.array([balls[0].x, balls[0].y])
    if rng.random() < cfg.aimed_shot_rate:
        target = balls[int(rng.integers(1, len(balls)))]
        tpos = np.array([target.x, target.y])
        # the pocket with the straightest line (smallest cut angle) from the cue through the target
        pockets = pocket_centres(cfg)
        to_pockets = (pockets - tpos) / np.linalg.norm(pockets - tpos, axis=1, keepdims=True)
        to_target = (tpos - cue) / np.linalg.norm(tpos - cue)
        to_pocket = to_pockets[int(np.argmax(to_pockets @ to_target))]
        ghost = tpos - to_pocket * 2 * cfg.ball_radius
        angle = math.atan2(*(ghost - cue)[::-1]) + rng.normal(0, 0.008)
    else:
        angle = rng.uniform(0, 2 * math.pi)
    return speed * math.cos(angle), speed * math.sin(angle)


def simulate(cfg: TableConfig, rng: np.random.Generator, fps: int | None = None,
             duration: float | None = None) -> tuple[ShotTruth, np.ndarray, np.ndarray]:
    """Run one shot (at a random frame rate and length unless given). Returns the truth, ball
    positions per frame [F, N, 2] and on-table flags [F, N]."""
    balls = random_layout(cfg, rng)
    drawn_fps = int(rng.choice([10, 12, 15]))
    drawn_duration = float(rng.choice([2.0, 2.5, 3.0, 3.5, 4.0]))
    fps, duration = fps or drawn_fps, duration or drawn_duration
    vx, vy = aim(cfg, balls, rng)
    sim = Simulation(cfg, balls, (vx, vy))
    frames = int(round(duration * fps))
    steps_per_frame = int(round(1 / (fps * cfg.dt)))
    positions, present = [], []
    for _ in range(frames):
        positions.append(sim.pos.copy())
        present.append(sim.on_table.copy())
        for _ in range(steps_per_frame):
            if not sim.moving():
                break  # everything has stopped: nothing more can happen
            sim.step()
    cloth = str(rng.choice(list(CLOTH_COLOURS)))
    truth = ShotTruth(
        balls=balls, cloth=cloth, duration=duration, fps=fps, pocketed=sim.pocketed,
        first_contact=sim.first_contact, scratch=any(p.ball == "cue" for p in sim.pocketed),
        cue_cushions=sim.cue_cushions, cue_direction=direction_name(vx, vy),
        balls_left=[n for n, on in zip(sim.names, sim.on_table, strict=True) if on and n != "cue"],
    )
    # pocketings after the last rendered frame are not visible: keep the truth to what is shown
    shown_until = (frames - 1) / fps
    truth.pocketed = [p for p in truth.pocketed if p.time <= shown_until + 1 / fps]
    return truth, np.stack(positions), np.stack(present)


@dataclass
class Camera:
    """Where the table sits in the image, and the light."""

    scale: float  # pixels per metre
    offset: tuple[float, float]  # pixel position of table (0, 0)
    light: np.ndarray  # [S, S, 1] multiplicative gradient


def random_camera(cfg: TableConfig, rng: np.random.Generator) -> Camera:
    s = cfg.image_size
    scale = s * 0.84 / cfg.length
    jitter = s * 0.025
    offset = ((s - cfg.length * scale) / 2 + rng.uniform(-jitter, jitter),
              (s - cfg.width * scale) / 2 + rng.uniform(-jitter, jitter))
    yy, xx = np.mgrid[0:s, 0:s] / s
    cx, cy = rng.uniform(0.2, 0.8, 2)
    light = 1.08 - 0.25 * ((xx - cx) ** 2 + (yy - cy) ** 2)
    return Camera(scale, offset, light[..., None])


def image_tracks(cfg: TableConfig, truth: ShotTruth, positions: np.ndarray, present: np.ndarray,
                 camera: Camera) -> dict:
    """Where every ball is drawn in every frame, in image coordinates scaled to [0, 1]
    (-1 for a ball off the table), and the drawn radius on the same scale: the per-frame
    facts the towers can be pretrained on."""
    s = cfg.image_size
    ox, oy = camera.offset
    xy = np.stack([(ox + positions[..., 0] * camera.scale) / s, (oy + positions[..., 1] * camera.scale) / s], -1)
    xy = np.where(present[..., None], xy, -1.0)  # [F, N, 2]
    return {"names": [b.colour for b in truth.balls], "fps": truth.fps,
            "radius": round(cfg.ball_radius * camera.scale / s, 5),
            "xy": np.round(xy.reshape(len(xy), -1), 4).tolist()}


def render(cfg: TableConfig, truth: ShotTruth, positions: np.ndarray, present: np.ndarray,
           camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames [F, S, S, 3]."""
    s = cfg.image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    ox, oy = camera.offset
    k = camera.scale
    base = np.empty((s, s, 3), np.float32)
    base[:] = (60, 38, 22)  # wooden frame
    rail = cfg.ball_radius * 1.6 * k
    x0, y0, x1, y1 = ox, oy, ox + cfg.length * k, oy + cfg.width * k
    cloth = np.array(CLOTH_COLOURS[truth.cloth], np.float32)
    cushion = (xx > x0 - rail) & (xx < x1 + rail) & (yy > y0 - rail) & (yy < y1 + rail)
    base[cushion] = cloth * 0.72
    inside = (xx > x0) & (xx < x1) & (yy > y0) & (yy < y1)
    base[inside] = cloth
    for px, py in pocket_centres(cfg):
        hole = (xx - (ox + px * k)) ** 2 + (yy - (oy + py * k)) ** 2 < (cfg.pocket_radius * k * 0.9) ** 2
        base[hole] = (8, 8, 8)
    radius = cfg.ball_radius * k
    colours = [np.array(CUE_COLOUR if b.colour == "cue" else BALL_COLOURS[b.colour], np.float32) for b in truth.balls]
    frames = np.empty((len(positions), s, s, 3), np.uint8)
    for f, (pos, on) in enumerate(zip(positions, present, strict=True)):
        img = base.copy()
        for i in np.flatnonzero(on):
            cx, cy = ox + pos[i, 0] * k, oy + pos[i, 1] * k
            box = (slice(max(0, int(cy - radius - 2)), min(s, int(cy + radius + 3))),
                   slice(max(0, int(cx - radius - 2)), min(s, int(cx + radius + 3))))
            dx, dy = xx[box] - cx, yy[box] - cy
            alpha = np.clip(radius + 0.5 - np.sqrt(dx * dx + dy * dy), 0, 1)[..., None]
            colour = np.broadcast_to(colours[i], alpha.shape[:2] + (3,)).copy()
            if truth.balls[i].striped:
                colour[np.abs(dy) > radius * 0.45] = CUE_COLOUR
            highlight = np.clip(1.25 - 0.25 * ((dx + radius * 0.35) ** 2 + (dy + radius * 0.35) ** 2) / radius**2,
                                0.85, 1.25)[..., None]
            img[box] = img[box] * (1 - alpha) + np.clip(colour * highlight, 0, 255) * alpha
        img = img * camera.light + rng.normal(0, cfg.noise_std, img.shape)
        frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    return frames
