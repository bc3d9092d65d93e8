"""Synthetic CelebA: cartoon faces in K known modes, written in the exact release layout.

Tests and demos run the real CelebA parsing and shard building on it, and because every
image's mode is known (recorded as its identity), a trainer can measure how many modes a
generator covers. Modes differ in background hue and pattern, hair style and colour,
glasses, hats and skin tone, so a small classifier tells them apart at 64x64; within a mode,
position, size, skin tone, colours and expression vary, so diversity is measurable too.
"""
from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import dcgan_dist
from dcgan_dist.data.build.celeba import ATTRIBUTES, BBOXES, IDENTITIES, IMAGES_NAME, LANDMARKS, PARTITION
from dcgan_dist.data.build.workers import default_workers, ordered_map, process_pool
from dcgan_dist.fileio import atomic_write

WIDTH, HEIGHT = 178, 218  # CelebA's aligned-and-cropped images
OFFICIAL_SPLIT_SIZES = (162_770, 19_867, 19_962)  # train, valid, test ids, in id order
SYNTH_JSON = "synth.json"
ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
LANDMARK_NAMES = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"

HAIR_STYLES = ("bald", "short", "long", "bangs", "curly")
HAIR_COLOURS = {"black": (30, 24, 22), "blond": (236, 204, 112), "brown": (112, 66, 30), "gray": (170, 170, 176)}
SKIN_TONES = {"light": (242, 208, 182), "medium": (204, 152, 112), "dark": (122, 82, 56)}
BACKGROUNDS = ("solid", "gradient", "stripes")
EXPRESSIONS = ("neutral", "smile", "open")
STYLES = ("photo", "flat")
PHOTO_ZOOM = 1.3


@dataclass(frozen=True)
class ModeLook:
    """What every face of one mode shares."""

    hue: float  # background hue in [0, 1); the shirt takes the opposite hue
    background: str
    hair_style: str
    hair_colour: str
    skin: str
    glasses: bool
    hat: bool

    @property
    def name(self) -> str:
        hair = "bald" if self.hair_style == "bald" else f"{self.hair_style} {self.hair_colour} hair"
        extras = "".join([", glasses" if self.glasses else "", ", hat" if self.hat else ""])
        return (f"{hair}, {self.skin} skin{extras}, "
                f"{self.background} background at hue {round(self.hue * 360)}")


def mode_looks(modes: int) -> list[ModeLook]:
    """K looks that differ pairwise in background hue (evenly spaced) and in several other features."""
    colours = list(HAIR_COLOURS)
    return [ModeLook(hue=k / modes, background=BACKGROUNDS[k % 3], hair_style=HAIR_STYLES[k % 5],
                     hair_colour=colours[(k + k // 5) % 4], skin=list(SKIN_TONES)[(k // 2) % 3],
                     glasses=(k // 5) % 2 == 1, hat=(k // 10) % 2 == 1)
            for k in range(modes)]


def split_sizes(count: int) -> tuple[int, int, int]:
    """Train, valid, test counts in the official proportions (about 80/10/10)."""
    total = sum(OFFICIAL_SPLIT_SIZES)
    train = round(count * OFFICIAL_SPLIT_SIZES[0] / total)
    valid = round(count * OFFICIAL_SPLIT_SIZES[1] / total)
    return train, valid, count - train - valid


def _face_parameters(count: int, modes: int, seed: int, zoom: float = 1.0) -> dict[str, np.ndarray]:
    """Every random choice of every image, drawn at once, so the output does not depend on the worker count.
    `zoom` enlarges the faces about the image centre (the photo style's faces fill the frame as CelebA's do)."""
    rng = np.random.default_rng(seed)
    n = count
    p = {
        "mode": rng.permutation(np.arange(n) % modes),  # balanced modes, shuffled over ids
        "cx": 89 + zoom * rng.uniform(-7, 7, n),
        "cy": 109 + zoom * (9 + rng.uniform(-7, 7, n)),
        "scale": zoom * rng.uniform(0.86, 1.14, n),
        "aspect": rng.uniform(1.15, 1.4, n),  # face height / width
        "skin_gain": rng.uniform(0.88, 1.1, n),
        "hue_jitter": rng.uniform(-0.12, 0.12, n) / modes,
        "bg_value": rng.uniform(0.75, 1.0, n),
        "stripe_phase": rng.integers(0, 24, n),
        "hair_gain": rng.uniform(0.85, 1.15, n),
        "eye_size": rng.uniform(0.8, 1.25, n),
        "expression": rng.integers(0, len(EXPRESSIONS), n),
        "tilt": rng.uniform(-3, 3, n),  # eye-line slope in pixels
    }
    fw = 40 * p["scale"]
    fh = fw * p["aspect"]
    eye_y = p["cy"] - 0.12 * fh
    p["fw"], p["fh"] = fw, fh
    p["landmarks"] = np.stack([
        p["cx"] - 0.42 * fw, eye_y - p["tilt"], p["cx"] + 0.42 * fw, eye_y + p["tilt"],  # eyes, image left first
        p["cx"], p["cy"] + 0.18 * fh,  # nose tip
        p["cx"] - 0.36 * fw, p["cy"] + 0.5 * fh, p["cx"] + 0.36 * fw, p["cy"] + 0.5 * fh,  # mouth corners
    ], axis=1)
    return p


def _rgb(hue: float, sat: float, value: float) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, sat, value))


def _scaled(colour: tuple[int, int, int], gain: float) -> tuple[int, int, int]:
    return tuple(min(255, round(c * gain)) for c in colour)


_MASKS: dict[str, Image.Image] = {}


def _background_mask(pattern: str, phase: int) -> Image.Image:
    """Where the background's second colour shows (L mode, 0..255); built once per process."""
    if not _MASKS:
        ramp = np.linspace(0, 255, HEIGHT, dtype=np.float32)[:, None].repeat(WIDTH, 1)
        stripes = np.where((np.arange(WIDTH + 24) // 12) % 2 == 0, 255, 0)[None, :].repeat(HEIGHT, 0)
        _MASKS["solid"] = Image.new("L", (WIDTH, HEIGHT), 0)
        _MASKS["gradient"] = Image.fromarray(ramp.astype(np.uint8))
        _MASKS["stripes"] = Image.fromarray(stripes.astype(np.uint8))
    mask = _MASKS[pattern]
    return mask.crop((phase, 0, phase + WIDTH, HEIGHT)) if pattern == "stripes" else mask


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, **kw) -> None:
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), **kw)


def draw_face(look: ModeLook, p: dict) -> Image.Image:
    """One 178x218 face from its mode's look and its own parameters (a row of `_face_parameters`)."""
    hue = look.hue + p["hue_jitter"]
    front = Image.new("RGB", (WIDTH, HEIGHT), _rgb(hue, 0.75, 0.45 * p["bg_value"]))
    img = Image.new("RGB", (WIDTH, HEIGHT), _rgb(hue, 0.6, p["bg_value"]))
    img.paste(front, (0, 0), _background_mask(look.background, int(p["stripe_phase"])))
    d = ImageDraw.Draw(img)
    cx, cy, fw, fh = p["cx"], p["cy"], p["fw"], p["fh"]
    skin = _scaled(SKIN_TONES[look.skin], p["skin_gain"])
    hair = _scaled(HAIR_COLOURS[look.hair_colour], p["hair_gain"])
    dark = (20, 16, 16)

    _ellipse(d, cx, cy + fh + 40, fw * 2.1, 48, fill=_rgb(hue + 0.5, 0.7, 0.8))  # shoulders
    d.rectangle((cx - 0.38 * fw, cy + 0.6 * fh, cx + 0.38 * fw, cy + fh + 6), fill=_scaled(skin, 0.9))  # neck
    if look.hair_style == "long":
        d.rounded_rectangle((cx - 1.25 * fw, cy - 1.2 * fh, cx + 1.25 * fw, cy + 1.05 * fh), radius=fw, fill=hair)
    elif look.hair_style == "curly":
        for ax, ay in ((-1.0, -0.6), (1.0, -0.6), (-0.6, -1.05), (0.6, -1.05), (0.0, -1.2), (-1.15, 0.0), (1.15, 0.0)):
            _ellipse(d, cx + ax * fw, cy + ay * fh, 0.55 * fw, 0.55 * fw, fill=hair)
    _ellipse(d, cx - fw, cy, 0.18 * fw, 0.25 * fh * 0.6, fill=skin)  # ears
    _ellipse(d, cx + fw, cy, 0.18 * fw, 0.25 * fh * 0.6, fill=skin)
    _ellipse(d, cx, cy, fw, fh, fill=skin)
    top = (cx - 1.02 * fw, cy - 1.08 * fh, cx + 1.02 * fw, cy + 0.2 * fh)
    if look.hair_style in ("short", "long", "curly"):
        d.chord(top, 180, 360, fill=hair)
    elif look.hair_style == "bangs":
        d.chord(top, 180, 360, fill=hair)
        d.rectangle((cx - 0.95 * fw, cy - 0.55 * fh, cx + 0.95 * fw, cy - 0.3 * fh), fill=hair)
    if look.hat:
        hat = _rgb(look.hue + 0.25, 0.8, 0.35)
        d.rectangle((cx - 0.9 * fw, cy - 1.75 * fh, cx + 0.9 * fw, cy - 0.75 * fh), fill=hat)
        d.rectangle((cx - 1.4 * fw, cy - 0.85 * fh, cx + 1.4 * fw, cy - 0.65 * fh), fill=hat)

    lx, ly, rx, ry, nx, ny, mlx, mly, mrx, mry = p["landmarks"]
    er = 0.16 * fw * p["eye_size"]
    for ex, ey in ((lx, ly), (rx, ry)):
        _ellipse(d, ex, ey, er * 1.4, er, fill=(248, 248, 248))
        _ellipse(d, ex, ey, er * 0.6, er * 0.6, fill=dark)
        d.line((ex - er * 1.5, ey - er * 2.0, ex + er * 1.5, ey - er * 2.2), fill=_scaled(hair, 0.7), width=3)
    d.line((nx, ny - 0.2 * fh, nx - 4, ny, nx + 3, ny), fill=_scaled(skin, 0.7), width=2)
    expression = EXPRESSIONS[int(p["expression"])]
    if expression == "neutral":
        d.line((mlx, mly, mrx, mry), fill=(150, 40, 50), width=3)
    elif expression == "smile":
        d.arc((mlx, mly - 0.15 * fh, mrx, mry + 0.12 * fh), 10, 170, fill=(150, 40, 50), width=4)
    else:
        _ellipse(d, (mlx + mrx) / 2, mly, 0.6 * (mrx - mlx) / 2, 0.08 * fh, fill=(90, 20, 30))
    if look.glasses:
        gr = er * 2.3
        for ex, ey in ((lx, ly), (rx, ry)):
            _ellipse(d, ex, ey, gr, gr * 0.85, outline=dark, width=4)
        d.line((lx + gr, ly, rx - gr, ry), fill=dark, width=4)
    return img


def _write_chunk(task: tuple[Path, list[ModeLook], list[tuple[int, dict]], str, int]) -> None:
    images, looks, rows, style, seed = task
    if style == "photo":
        from dcgan_dist.data.build.photo import render_face  # it imports this module's looks
    for number, p in rows:
        look = looks[int(p["mode"])]
        if style == "photo":  # a generator per image: the output does not depend on the chunking
            face = render_face(look, p, np.random.default_rng([seed, number]), len(looks))
        else:
            face = draw_face(look, p)
        face.save(images / f"{number:06d}.jpg", quality=92)


def _attribute_row(look: ModeLook, expression: str) -> list[int]:
    """The 40 CelebA attributes (1 or -1) that the drawing actually shows."""
    hair = "" if look.hair_style == "bald" else look.hair_colour
    shown = {
        "Bald": look.hair_style == "bald", "Bangs": look.hair_style == "bangs",
        "Straight_Hair": look.hair_style == "long", "Wavy_Hair": look.hair_style == "curly",
        "Black_Hair": hair == "black", "Blond_Hair": hair == "blond",
        "Brown_Hair": hair == "brown", "Gray_Hair": hair == "gray",
        "Eyeglasses": look.glasses, "Wearing_Hat": look.hat, "Pale_Skin": look.skin == "light",
        "Smiling": expression == "smile", "Mouth_Slightly_Open": expression == "open", "No_Beard": True,
    }
    return [1 if shown.get(name, False) else -1 for name in ATTRIBUTE_NAMES]


def _write_text(path: Path, lines: list[str]) -> None:
    atomic_write(path, "".join(line + "\n" for line in lines))


def write_synthetic_celeba(out: Path, count: int, modes: int = 10, seed: int = 0, style: str = "photo") -> Path:
    """Write `count` synthetic faces in `modes` modes to `out` in CelebA's release layout; returns `out`.

    `style`: "photo" (soft, shaded, textured faces that the lab's DCGAN learns, data/build/photo.py)
    or "flat" (the cartoon drawing: hard edges and saturated colour, which D separates from G's
    output at once; the diagnostics' tests use it for a discriminator that wins).

    Files: img_align_celeba/NNNNNN.jpg (178x218), list_eval_partition.txt (ids split by range,
    about 80/10/10), list_attr_celeba.txt, identity_CelebA.txt (identity = mode, 0..K-1),
    list_landmarks_align_celeba.txt, list_bbox_celeba.txt, and synth.json, written last.
    """
    if not 1 <= count <= 999_999:
        raise ValueError(f"count: got {count}, expected 1 to 999999 (six-digit CelebA file names)")
    if modes < 1:
        raise ValueError(f"modes: got {modes}, expected at least 1")
    if style not in STYLES:
        raise ValueError(f"style: got {style!r}, expected one of {', '.join(STYLES)}")
    out = Path(out)
    images = out / IMAGES_NAME
    images.mkdir(parents=True, exist_ok=True)
    (out / SYNTH_JSON).unlink(missing_ok=True)  # present only when the set is complete
    looks = mode_looks(modes)
    params = _face_parameters(count, modes, seed, zoom=PHOTO_ZOOM if style == "photo" else 1.0)
    rows = [(i + 1, {k: v[i] for k, v in params.items()}) for i in range(count)]
    chunk = 250
    tasks = [(images, looks, rows[i:i + chunk], style, seed) for i in range(0, count, chunk)]
    processes = min(default_workers(), len(tasks))
    with process_pool(processes) as pool:
        for _ in ordered_map(pool, _write_chunk, tasks, 2 * processes):
            pass

    names = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    train, valid, _ = split_sizes(count)
    split_codes = np.searchsorted([train, train + valid], np.arange(count), side="right")
    mode = params["mode"]
    landmarks = np.rint(params["landmarks"]).astype(int)
    x0, y0 = np.rint(params["cx"] - params["fw"]).astype(int), np.rint(params["cy"] - params["fh"]).astype(int)
    w, h = np.rint(2 * params["fw"]).astype(int), np.rint(2 * params["fh"]).astype(int)
    _write_text(out / f"{PARTITION}.txt", [f"{n} {s}" for n, s in zip(names, split_codes)])
    _write_text(out / f"{IDENTITIES}.txt", [f"{n} {m}" for n, m in zip(names, mode)])
    _write_text(out / f"{ATTRIBUTES}.txt", [str(count), " ".join(ATTRIBUTE_NAMES) + " "] + [
        f"{n} " + " ".join(f"{v:2d}" for v in _attribute_row(looks[m], EXPRESSIONS[e]))
        for n, m, e in zip(names, mode, params["expression"])])
    _write_text(out / f"{LANDMARKS}.txt", [str(count), LANDMARK_NAMES] + [
        f"{n} " + " ".join(f"{v:4d}" for v in row) for n, row in zip(names, landmarks)])
    _write_text(out / f"{BBOXES}.txt", [str(count), "image_id x_1 y_1 width height"] + [
        f"{n} {a:4d} {b:4d} {c:4d} {e:4d}" for n, a, b, c, e in zip(names, x0, y0, w, h)])
    synth = {"modes": modes, "seed": seed, "count": count, "style": style, "tool": f"dcgan_dist {dcgan_dist.__version__}",
             "mode_names": [look.name for look in looks]}
    _write_text(out / SYNTH_JSON, [json.dumps(synth, indent=1)])
    return out
