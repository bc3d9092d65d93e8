"""Photo-like synthetic faces: the same modes and landmarks as the flat drawing, rendered the way
a camera sees a face, so that the lab's G and D can learn them.

A DCGAN's generator makes smooth, grainy images first and sharp detail last. Against flat,
saturated cartoons with hard edges its discriminator wins at once (no gradient reaches G);
against photographs it does not. So this renderer gives the faces what photographs have and
cartoons lack: soft edges, shading from a light that moves, muted colour, textured hair,
backgrounds with low-frequency variation, and sensor grain. Each mode keeps a look (background
and shirt hue, hair style and colour, skin tone, glasses, hat) that an 8x8 colour classifier still
tells apart, so mode coverage stays measurable.
"""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from dcgan_dist.data.build.synth import BACKGROUNDS, EXPRESSIONS, HAIR_COLOURS, HEIGHT, SKIN_TONES, WIDTH, ModeLook

CONTRAST = 1.5
# Drawn on a grid of half the release size (in release-pixel coordinates), then upsampled: the
# trainer's images are 64x64, so the other three quarters of the pixels would add nothing but time.
GRID = (HEIGHT // 2, WIDTH // 2)
_Y, _X = (np.mgrid[0:GRID[0], 0:GRID[1]].astype(np.float32) + 0.25) * 2


def _muted(hue: float, sat: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, value), np.float32)


def _soft(distance: np.ndarray, edge: float) -> np.ndarray:
    """Coverage of a shape from its signed distance (negative inside), with an edge `edge` pixels wide."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / edge, -30, 30)))


def _ellipse(cx: float, cy: float, rx: float, ry: float, edge: float = 1.5) -> np.ndarray:
    d = np.sqrt(((_X - cx) / rx) ** 2 + ((_Y - cy) / ry) ** 2)
    return _soft((d - 1.0) * min(rx, ry), edge)


def _smooth_noise(rng: np.random.Generator, cell: int) -> np.ndarray:
    """Zero-mean, unit-scale noise on the grid, varying over about `cell` release pixels."""
    coarse = rng.standard_normal((HEIGHT // cell + 1, WIDTH // cell + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize(GRID[::-1], Image.BILINEAR))


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    img *= 1.0 - alpha[..., None]
    img += alpha[..., None] * colour


def render_face(look: ModeLook, p: dict, rng: np.random.Generator, modes: int) -> Image.Image:
    """One 178x218 photo-like face from its mode's look, its own parameters (a row of the flat
    drawing's `_face_parameters`: position, size, landmarks, expression), its own generator, and
    the number of modes (whose hues are 1/modes apart)."""
    # Photographs are diverse: a discriminator fits a narrow set (every face alike) at once and a
    # young G has no way in. So beyond its mode's look each image draws its own exposure, light,
    # background pattern and brightness, skin tone (toward another tone) and shirt shade.
    hue = look.hue + rng.uniform(-0.35, 0.35) / modes
    cx, cy, fw, fh = p["cx"], p["cy"], p["fw"], p["fh"]
    light = rng.uniform(-0.9, 0.9)  # horizontal light direction, shared by every shaded part
    exposure = rng.uniform(0.8, 1.2)

    # background: near the mode's muted hue, lit from the side, with soft blotches
    pattern = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = _muted(hue, rng.uniform(0.2, 0.45), rng.uniform(0.25, 0.85))
    shade = 1.0 + 0.3 * light * (_X - WIDTH / 2) / WIDTH + 0.15 * _smooth_noise(rng, 30) + 0.06 * _smooth_noise(rng, 8)
    if pattern == "gradient":
        shade += rng.uniform(-0.4, 0.4) * (_Y / HEIGHT - 0.5)
    elif pattern == "stripes":
        shade += 0.12 * np.sin(2 * np.pi * (_X + p["stripe_phase"]) / rng.uniform(30, 60))
    img = base * shade[..., None]

    tones = list(SKIN_TONES.values())
    skin = np.array(SKIN_TONES[look.skin], np.float32) / 255
    skin = (skin + rng.uniform(0, 0.5) * (np.array(tones[rng.integers(len(tones))], np.float32) / 255 - skin)) \
        * p["skin_gain"]
    hair = np.array(HAIR_COLOURS[look.hair_colour], np.float32) / 255 * p["hair_gain"]
    hair_texture = 1.0 + 0.35 * _smooth_noise(rng, 3) * (0.7 + 0.3 * _smooth_noise(rng, 12))
    shirt_shade = 1.0 + 0.25 * light * (_X - cx) / (2 * fw)

    # shoulders and neck
    shirt = _muted(hue + 0.5, rng.uniform(0.15, 0.4), rng.uniform(0.2, 0.8))  # the mode's opposite hue
    _paint(img, _ellipse(cx, cy + fh + 1.05 * fw, fw * 2.1, 1.25 * fw, 3.0), shirt)
    img *= np.where(_Y > cy + fh - 10, shirt_shade, 1.0)[..., None]
    neck = _soft(np.maximum(np.abs(_X - cx) - 0.38 * fw, (cy + 0.6 * fh) - _Y), 1.5) * (_Y < cy + fh + 8)
    _paint(img, neck, skin * 0.72)

    # hair behind the head
    if look.hair_style == "long":
        back = _ellipse(cx, cy - 0.05 * fh, 1.28 * fw, 1.12 * fh, 3.0) * (_Y < cy + 1.05 * fh)
        _paint(img, back, hair * 0.8)
    elif look.hair_style == "curly":
        for ax, ay in ((-1.0, -0.6), (1.0, -0.6), (-0.6, -1.05), (0.6, -1.05), (0.0, -1.2), (-1.15, 0.0), (1.15, 0.0)):
            _paint(img, _ellipse(cx + ax * fw, cy + ay * fh, 0.55 * fw, 0.55 * fw, 2.5), hair * 0.9)

    # the face: an ellipse shaded as a sphere lit from `light`
    face = _ellipse(cx, cy, fw, fh, 1.5)
    ears = np.maximum(_ellipse(cx - fw, cy, 0.18 * fw, 0.15 * fh), _ellipse(cx + fw, cy, 0.18 * fw, 0.15 * fh))
    nx_, ny_ = (_X - cx) / fw, (_Y - cy) / fh
    nz_ = np.sqrt(np.clip(1.0 - nx_ ** 2 - ny_ ** 2, 0.0, 1.0))
    lambert = np.clip(light * nx_ + 0.35 * -ny_ + 0.85 * nz_, 0.0, None)
    face_shade = (0.4 + 0.7 * lambert)[..., None]
    _paint(img, ears, skin * 0.8)
    img = img * (1.0 - face[..., None]) + face[..., None] * skin * face_shade

    # hair on top, textured
    if look.hair_style in ("short", "long", "curly", "bangs"):
        cap = _ellipse(cx, cy - 0.08 * fh, 1.04 * fw, 1.02 * fh, 2.0)
        line = cy - (0.3 if look.hair_style == "bangs" else 0.42) * fh
        cap = cap * _soft(_Y - line - 0.08 * fh * np.cos(np.pi * (_X - cx) / (2 * fw)), 2.5)
        _paint(img, cap, hair)
        img *= np.where(cap > 0.3, hair_texture, 1.0)[..., None]
    if look.hat:
        hat = _muted(look.hue + 0.25, 0.35, 0.3)
        crown = _soft(np.maximum(np.abs(_X - cx) - 0.9 * fw, np.abs(_Y - (cy - 1.25 * fh)) - 0.5 * fh), 2.0)
        brim = _soft(np.maximum(np.abs(_X - cx) - 1.4 * fw, np.abs(_Y - (cy - 0.75 * fh)) - 0.1 * fh), 2.0)
        _paint(img, np.maximum(crown, brim), hat)

    # features: soft eyes, brows, nose shadow, mouth
    lx, ly, rx, ry, nx, ny, mlx, mly, mrx, mry = p["landmarks"]
    er = 0.16 * fw * p["eye_size"]
    for ex, ey in ((lx, ly), (rx, ry)):
        _paint(img, _ellipse(ex, ey, er * 1.35, er * 0.8, 1.2), np.array([0.78, 0.74, 0.72], np.float32))
        _paint(img, _ellipse(ex, ey, er * 0.6, er * 0.6, 1.0), np.array([0.16, 0.11, 0.09], np.float32))
        brow = _ellipse(ex, ey - er * 2.0, er * 1.6, er * 0.32, 1.2)
        _paint(img, brow * 0.8, hair * 0.55)
    _paint(img, _ellipse(nx + 2 * light, ny + 0.02 * fh, 0.12 * fw, 0.05 * fh, 2.0) * 0.5, skin * 0.5)
    mouth_x, width = (mlx + mrx) / 2, (mrx - mlx) / 2
    expression = EXPRESSIONS[int(p["expression"])]
    lips = np.array([0.55, 0.25, 0.25], np.float32)
    if expression == "open":
        _paint(img, _ellipse(mouth_x, mly, 0.6 * width, 0.08 * fh, 1.2), np.array([0.3, 0.1, 0.1], np.float32))
    else:
        bend = 0.06 * fh if expression == "smile" else 0.0
        curve = mly - bend * (1 - ((_X - mouth_x) / width) ** 2)
        mouth = _soft(np.maximum(np.abs(_Y - curve) - 0.02 * fh, np.abs(_X - mouth_x) - width), 1.2)
        _paint(img, mouth * 0.85, lips)
    if look.glasses:
        gr = er * 2.3
        for ex, ey in ((lx, ly), (rx, ry)):
            d = np.sqrt(((_X - ex) / gr) ** 2 + ((_Y - ey) / (0.85 * gr)) ** 2)
            _paint(img, _soft(np.abs(d - 1.0) * gr - 1.5, 1.0) * 0.9, np.array([0.08, 0.07, 0.07], np.float32))

    # camera: vignette, sensor grain (about 2 pixels, so it survives the resize to 64x64), slight desaturation
    vignette = 1.0 - 0.25 * (((_X - WIDTH / 2) / WIDTH) ** 2 + ((_Y - HEIGHT / 2) / HEIGHT) ** 2)
    img *= vignette[..., None]
    grey = img.mean(2, keepdims=True)
    img = grey + 0.6 * (img - grey)  # muted colour
    img = 0.45 + CONTRAST * (img * exposure - 0.45)  # a photograph's tonal range
    img += 0.05 * _smooth_noise(rng, 3)[..., None] + 0.02 * rng.standard_normal((*GRID, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
