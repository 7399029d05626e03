"""A generated, Clickture-Dog-like sample: procedurally drawn dogs of 12 breeds
in 4 families of look-alikes, and a click log with realistic noise.

The sample is the offline test bed of the whole method, so it is built to be a
genuinely fine-grained problem:

* families (retriever, spitz, hound, bully) differ coarsely: body shape, ears,
  tail, snout, leg length;
* breeds inside a family differ by ONE subtle attribute: a coat texture, a hue
  or value shift, a coat pattern, or a leg-length cue that is large enough to
  survive a CNN stem's downsampling (2-4 px ear or tail cues are not learnt at
  64 px, measured on a prototype);
* every image varies strongly inside its class: scale, position, mirror,
  pose, coat colour jitter, lighting, background clutter, occlusion.

The click log mimics the real one: heavy-tailed click counts, query variants
(plurals, filler words, misspellings, sizes, years, aliases), images also or
only clicked under a look-alike breed, non-dog distractors clicked once or
twice under random breeds, and queries that name no breed.

Everything is deterministic from ``seed``: each image draws from its own
``numpy`` generator seeded by ``(seed, split, index)``.
"""
from __future__ import annotations

import base64
import colorsys
import contextlib
import functools
import io
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stages.lib import layout

CANVAS = 128  # drawn at 128 px, then resized to min_side..max_side (anti-aliasing)


@dataclass(frozen=True)
class Shape:
    """Body plan shared by a family (sizes in canvas pixels at scale 1)."""

    body_w: float
    body_h: float
    leg_len: float
    leg_w: float
    head_r: float
    snout_len: float
    ears: str  # floppy | long | upright | bat
    tail: str  # long | curled | up | stub


@dataclass(frozen=True)
class Breed:
    name: str
    family: str
    shape: Shape
    coat: tuple[float, float, float]  # HSV in [0, 1]
    pattern: str  # none | wavy | saddle | mask | tricolor | brindle | blaze | belly
    pattern_coat: tuple[float, float, float] = (0.0, 0.0, 0.1)
    white_face: bool = False  # a white face mask over the coat (the husky's)


RETRIEVER = Shape(60, 28, 22, 7, 15, 13, "floppy", "long")
SPITZ = Shape(56, 32, 20, 8, 17, 9, "upright", "curled")
HOUND = Shape(58, 25, 20, 7, 15, 12, "long", "up")
HOUND_SHORT = Shape(62, 25, 9, 8, 15, 12, "long", "up")
BULLY = Shape(44, 30, 14, 9, 20, 4, "bat", "stub")

BREEDS: tuple[Breed, ...] = (
    # retrievers: golden vs labrador differ by texture, golden vs chesapeake by hue/value
    Breed("golden retriever", "retriever", RETRIEVER, (0.10, 0.70, 0.85), "wavy", (0.08, 0.80, 0.60)),
    Breed("labrador retriever", "retriever", RETRIEVER, (0.11, 0.60, 0.90), "none"),
    Breed("chesapeake bay retriever", "retriever", RETRIEVER, (0.07, 0.70, 0.55), "wavy", (0.06, 0.80, 0.38)),
    # spitz: grey saddle (husky), darker saddle and no white mask (malamute), all white (samoyed)
    Breed("siberian husky", "spitz", SPITZ, (0.60, 0.05, 0.95), "saddle", (0.60, 0.10, 0.45), white_face=True),
    Breed("alaskan malamute", "spitz", SPITZ, (0.08, 0.10, 0.90), "saddle", (0.08, 0.25, 0.30)),
    Breed("samoyed", "spitz", SPITZ, (0.12, 0.08, 0.95), "none"),
    # hounds: beagle vs basset differ by leg length, basset vs dachshund by coat
    Breed("beagle", "hound", HOUND, (0.08, 0.65, 0.75), "tricolor", (0.0, 0.0, 0.12)),
    Breed("basset hound", "hound", HOUND_SHORT, (0.08, 0.65, 0.75), "tricolor", (0.0, 0.0, 0.12)),
    Breed("dachshund", "hound", HOUND_SHORT, (0.04, 0.75, 0.55), "none"),
    # bully: brindle stripes (french bulldog), black face mask (pug), black with white blaze (boston)
    Breed("french bulldog", "bully", BULLY, (0.09, 0.45, 0.75), "brindle", (0.07, 0.60, 0.35)),
    Breed("pug", "bully", BULLY, (0.10, 0.45, 0.78), "mask", (0.0, 0.0, 0.12)),
    Breed("boston terrier", "bully", BULLY, (0.0, 0.0, 0.15), "blaze", (0.0, 0.0, 0.95)),
)
BREED_NAMES = tuple(b.name for b in BREEDS)
DISTRACTOR = "distractor"

# Query templates: the filler words, misspellings, sizes and years of real logs.
OWN_QUERY_TEMPLATES = (
    "{b}", "{b}", "{b}", "{B}", "{b}s", "{b} puppies", "{B}s", "{b} dog", "{b} dog pictures",
    "{b} picures", "{b} pictues", "{b} imagenes", "{b} 1920x1080", "{b} wallpaper 2016",
    "cute {b} puppy", "{b} photos", "black and white {b}", "{b} images",
)
ALIAS_QUERIES = {
    "labrador retriever": ("lab puppies", "labs", "yellow lab"),
    "siberian husky": ("husky", "huskies puppy"),
    "french bulldog": ("frenchie", "frenchies"),
    "dachshund": ("doxie",),
}
NO_BREED_QUERIES = (
    "cute puppy wallpaper", "funny dogs", "dog pictures", "puppies 1920x1080",
    "best dog breeds 2016", "dog imagenes", "happy dog", "puppy love",
)


def _rgb(hsv: tuple[float, float, float], rng: np.random.Generator, jitter: float) -> tuple[int, int, int]:
    """HSV colour with per-image jitter, as 0-255 RGB."""
    h = (hsv[0] + rng.normal(0, 0.012 * jitter)) % 1.0
    s = float(np.clip(hsv[1] + rng.normal(0, 0.06 * jitter), 0, 1))
    v = float(np.clip(hsv[2] + rng.normal(0, 0.07 * jitter), 0, 1))
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator) -> Image.Image:
    """Gradient plus clutter: grass, furniture, toys."""
    top, bottom = np.array(_random_colour(rng)), np.array(_random_colour(rng))
    t = np.linspace(0, 1, CANVAS)[:, None, None]
    grad = (top * (1 - t) + bottom * t) * np.ones((1, CANVAS, 1))
    grad += rng.normal(0, 10, size=grad.shape)
    img = Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 10))):
        x, y = rng.uniform(-20, CANVAS, size=2)
        w, h = rng.uniform(8, 50, size=2)
        colour = _random_colour(rng)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        else:
            draw.line([x, y, x + w, y + h], fill=colour, width=int(rng.integers(1, 5)))
    return img


def _dog_masks(shape: Shape, rng: np.random.Generator, scale: float, cx: float, cy: float):
    """Draw the silhouette parts as masks; return (whole, head, body, legs) masks
    and the head centre. The dog faces right; mirroring happens later."""
    s = scale
    whole = Image.new("L", (CANVAS, CANVAS), 0)
    head = Image.new("L", (CANVAS, CANVAS), 0)
    body = Image.new("L", (CANVAS, CANVAS), 0)
    legs = Image.new("L", (CANVAS, CANVAS), 0)
    dw, dh_, dl = ImageDraw.Draw(whole), ImageDraw.Draw(head), ImageDraw.Draw(body)
    dlegs = ImageDraw.Draw(legs)
    bw, bh = shape.body_w * s, shape.body_h * s
    x0, y0 = cx - bw / 2, cy - bh / 2
    dw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=255)
    dl.ellipse([x0, y0, x0 + bw, y0 + bh], fill=255)
    # legs: walking pose jitter
    ll, lw = shape.leg_len * s * rng.uniform(0.9, 1.1), shape.leg_w * s
    for i, fx in enumerate((0.15, 0.32, 0.68, 0.85)):
        lx = x0 + fx * bw + rng.normal(0, 1.5 * s)
        ly = cy + bh * 0.25
        swing = rng.normal(0, 3 * s)
        poly = [(lx - lw / 2, ly), (lx + lw / 2, ly), (lx + lw / 2 + swing, ly + ll), (lx - lw / 2 + swing, ly + ll)]
        dw.polygon(poly, fill=255)
        dlegs.polygon(poly, fill=255)
    # tail
    tx, ty = x0 + 0.04 * bw, cy - bh * 0.15
    tail_w = max(2, int(round(shape.leg_w * s * 0.6)))
    if shape.tail == "long":
        ang = math.radians(rng.uniform(190, 230))
        tail = [(tx, ty), (tx + 26 * s * math.cos(ang), ty - 26 * s * math.sin(ang))]
        dw.line(tail, fill=255, width=tail_w)
    elif shape.tail == "up":
        ang = math.radians(rng.uniform(100, 140))
        tail = [(tx, ty), (tx + 22 * s * math.cos(ang), ty - 22 * s * math.sin(ang))]
        dw.line(tail, fill=255, width=max(2, tail_w - 1))
    elif shape.tail == "curled":
        r = 11 * s
        dw.arc([tx - r * 0.3, ty - 2 * r, tx + 1.7 * r, ty], start=90, end=360, fill=255, width=tail_w + 2)
    else:  # stub
        dw.ellipse([tx - 4 * s, ty - 4 * s, tx + 3 * s, ty + 3 * s], fill=255)
    # head and snout
    hr = shape.head_r * s
    hx = x0 + bw * 0.92 + rng.normal(0, 1.5 * s)
    hy = y0 - hr * 0.35 + rng.normal(0, 2 * s)
    for d in (dw, dh_):
        d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=255)
        sl = shape.snout_len * s
        d.ellipse([hx + hr * 0.3, hy - hr * 0.1, hx + hr * 0.5 + sl, hy + hr * 0.65], fill=255)
        d.polygon([(hx - hr * 0.6, hy + hr * 0.5), (hx + hr * 0.5, hy + hr * 0.5), (x0 + bw * 0.8, cy)], fill=255)
    # ears
    if shape.ears in ("floppy", "long"):
        el = hr * (1.6 if shape.ears == "long" else 1.1)
        ex = hx - hr * 0.35
        dw.ellipse([ex - hr * 0.35, hy - hr * 0.6, ex + hr * 0.35, hy - hr * 0.6 + el], fill=255)
    else:
        eh = hr * (1.2 if shape.ears == "bat" else 0.9)
        ew = hr * (0.6 if shape.ears == "bat" else 0.45)
        for ex in (hx - hr * 0.45, hx + hr * 0.2):
            dw.polygon([(ex - ew, hy - hr * 0.5), (ex + ew, hy - hr * 0.5), (ex + rng.normal(0, 1), hy - hr * 0.5 - eh)], fill=255)
    return whole, head, body, legs, (hx, hy, hr)


def _coat(breed: Breed, rng: np.random.Generator, masks, jitter: float) -> Image.Image:
    """Fill the coat colour and draw the breed's pattern on it."""
    whole, head, body, legs, (hx, hy, hr) = masks
    coat = Image.new("RGB", (CANVAS, CANVAS), _rgb(breed.coat, rng, jitter))
    pcol = _rgb(breed.pattern_coat, rng, jitter)
    layer = Image.new("RGB", (CANVAS, CANVAS), pcol)
    if breed.pattern in ("wavy", "brindle"):
        m = Image.new("L", (CANVAS, CANVAS), 0)
        d = ImageDraw.Draw(m)
        step = 5 if breed.pattern == "wavy" else 6
        phase = rng.uniform(0, 2 * math.pi)
        for k in range(-2, CANVAS // step + 2):
            if breed.pattern == "wavy":  # horizontal wavy lines: a texture
                pts = [(x, k * step + 2 * math.sin(x / 4 + phase + k)) for x in range(0, CANVAS, 3)]
            else:  # near-vertical stripes: brindle
                pts = [(k * step + 2 * math.sin(y / 6 + phase), y) for y in range(0, CANVAS, 3)]
            d.line(pts, fill=255, width=2)
        coat.paste(layer, mask=Image.composite(m, Image.new("L", m.size, 0), whole))
    elif breed.pattern in ("saddle", "tricolor"):
        coat.paste(layer, mask=Image.composite(body, Image.new("L", body.size, 0), _upper_half(body, rng)))
        if breed.pattern == "tricolor":  # white legs and muzzle
            white = Image.new("RGB", coat.size, _rgb((0.1, 0.05, 0.95), rng, jitter))
            coat.paste(white, mask=legs)
    elif breed.pattern == "mask":
        m = Image.new("L", (CANVAS, CANVAS), 0)
        ImageDraw.Draw(m).ellipse([hx - hr * 0.1, hy - hr * 0.4, hx + hr * 1.2, hy + hr * 0.8], fill=255)
        coat.paste(layer, mask=Image.composite(m, Image.new("L", m.size, 0), head))
    elif breed.pattern == "blaze":
        m = Image.new("L", (CANVAS, CANVAS), 0)
        d = ImageDraw.Draw(m)
        d.rectangle([hx - hr * 0.15, hy - hr, hx + hr * 0.25, hy + hr], fill=255)
        d.ellipse([hx - hr * 1.2, hy + hr * 0.3, hx + hr * 0.2, hy + hr * 2.0], fill=255)
        coat.paste(layer, mask=Image.composite(m, Image.new("L", m.size, 0), whole))
    if breed.white_face:
        m = Image.new("L", (CANVAS, CANVAS), 0)
        ImageDraw.Draw(m).ellipse([hx - hr * 0.2, hy - hr * 0.1, hx + hr * 1.3, hy + hr], fill=255)
        coat.paste(Image.new("RGB", coat.size, (240, 240, 240)), mask=Image.composite(m, Image.new("L", m.size, 0), head))
    return coat


def _upper_half(mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The upper part of a mask's bounding box (a saddle over the back)."""
    box = mask.getbbox() or (0, 0, CANVAS, CANVAS)
    cut = box[1] + (box[3] - box[1]) * rng.uniform(0.4, 0.55)
    m = Image.new("L", mask.size, 0)
    ImageDraw.Draw(m).rectangle([0, 0, CANVAS, cut], fill=255)
    return m


def draw_dog(breed: Breed, rng: np.random.Generator, size: int, *, jitter: float = 1.0) -> Image.Image:
    """One photo-like image of ``breed`` at ``size`` x ``size`` px."""
    img = _background(rng)
    scale = rng.uniform(0.6, 1.05)
    cx = rng.uniform(0.35, 0.6) * CANVAS
    cy = rng.uniform(0.45, 0.65) * CANVAS
    masks = _dog_masks(breed.shape, rng, scale, cx, cy)
    img.paste(_coat(breed, rng, masks, jitter), mask=masks[0])
    hx, hy, hr = masks[4]
    d = ImageDraw.Draw(img)
    d.ellipse([hx + hr * 0.1, hy - hr * 0.35, hx + hr * 0.3, hy - hr * 0.15], fill=(10, 10, 10))  # eye
    nx = hx + hr * 0.5 + breed.shape.snout_len * scale
    d.ellipse([nx - 2.5 * scale, hy, nx + 2 * scale, hy + 4 * scale], fill=(15, 10, 10))  # nose
    if rng.random() < 0.3:  # partial occlusion by a foreground object
        ox, oy = rng.uniform(0, CANVAS, size=2)
        ow, oh = rng.uniform(15, 40, size=2)
        d.rectangle([ox, oy, ox + ow, oy + oh], fill=_random_colour(rng))
    return _finish(img, rng, size)


def draw_distractor(rng: np.random.Generator, size: int) -> Image.Image:
    """A non-dog image: clutter, a car-like or house-like object."""
    img = _background(rng)
    d = ImageDraw.Draw(img)
    colour = _random_colour(rng)
    x, y = rng.uniform(10, 50, size=2)
    if rng.random() < 0.5:  # car
        d.rectangle([x, y + 20, x + 70, y + 45], fill=colour)
        d.rectangle([x + 15, y, x + 55, y + 22], fill=colour)
        for wx in (x + 15, x + 55):
            d.ellipse([wx - 9, y + 38, wx + 9, y + 56], fill=(20, 20, 20))
    else:  # house
        d.rectangle([x, y + 25, x + 60, y + 75], fill=colour)
        d.polygon([(x - 8, y + 25), (x + 68, y + 25), (x + 30, y - 5)], fill=_random_colour(rng))
        d.rectangle([x + 22, y + 50, x + 38, y + 75], fill=(60, 40, 20))
    return _finish(img, rng, size)


def _finish(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Mirror, lighting, slight blur, then resize to the output size."""
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32)
    gain, bias = rng.uniform(0.75, 1.25), rng.normal(0, 12)
    arr = np.clip(arr * gain + bias + rng.normal(0, 4, size=arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _jpeg_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _key(rng: np.random.Generator) -> str:
    """A Clickture-like opaque key (random, URL-safe)."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"))
    return "".join(rng.choice(alphabet, size=24))


def _query(breed: str, rng: np.random.Generator) -> str:
    if breed in ALIAS_QUERIES and rng.random() < 0.15:
        return str(rng.choice(ALIAS_QUERIES[breed]))
    template = str(rng.choice(OWN_QUERY_TEMPLATES))
    return template.format(b=breed, B=breed.title())


def _clicks(rng: np.random.Generator, mean_scale: float = 1.0) -> int:
    """Heavy-tailed click counts: most images get a few clicks, some very many."""
    return int(min(500, math.ceil(rng.pareto(1.3) * 2.0 * mean_scale + rng.random() * 1.5)))


def _lookalikes(breed: Breed) -> list[str]:
    return [b.name for b in BREEDS if b.family == breed.family and b.name != breed.name]


def _best_known(breed: Breed) -> str:
    """The family's best-known breed (listed first): its name draws the clicks
    of users who cannot tell the look-alikes apart."""
    return next(b.name for b in BREEDS if b.family == breed.family)


def click_rows(key: str, true_breed: str | None, rng: np.random.Generator, *, lookalike_share: float,
               lookalike_only_share: float, best_known_share: float,
               no_breed_query_share: float) -> list[tuple[str, str, int]]:
    """The click-log lines of one training image (``true_breed`` None: a distractor).

    A ``lookalike_share`` of dogs is also, or (``lookalike_only_share`` of
    them) only, clicked under a look-alike breed; that look-alike is the
    family's best-known breed with probability ``best_known_share``. The
    confusion is thus one-sided, as in real logs, and the best-known breed's
    click labels collect its look-alikes: noise a classifier does not average
    away, unlike symmetric flips.
    """
    if true_breed is None:  # non-dog, clicked once or twice under random breeds
        n = 1 if rng.random() < 0.7 else 2
        return [(key, _query(str(rng.choice(BREED_NAMES)), rng), int(rng.integers(1, 3))) for _ in range(n)]
    breed = BREEDS[BREED_NAMES.index(true_breed)]
    rows: list[tuple[str, str, int]] = []
    mode = "own"
    if rng.random() < lookalike_share:
        mode = "only" if rng.random() < lookalike_only_share else "also"
    if mode in ("own", "also"):
        for _ in range(1 + int(rng.random() < 0.4) + int(rng.random() < 0.15)):
            rows.append((key, _query(true_breed, rng), _clicks(rng)))
    if mode in ("also", "only"):
        best = _best_known(breed)
        other = best if best != true_breed and rng.random() < best_known_share else \
            str(rng.choice(_lookalikes(breed)))
        rows.append((key, _query(other, rng), _clicks(rng, 0.5 if mode == "also" else 0.8)))
    if rng.random() < no_breed_query_share:
        rows.append((key, str(rng.choice(NO_BREED_QUERIES)), _clicks(rng)))
    if rng.random() < 0.01:  # a query naming two breeds
        other = str(rng.choice(_lookalikes(breed)))
        rows.append((key, f"{true_breed} vs {other}", 1))
    return rows


def generate_sample(out_dir: Path, *, seed: int, n_train: int, test_per_breed: int, min_side: int,
                    max_side: int, lookalike_share: float, lookalike_only_share: float,
                    best_known_share: float, distractor_share: float,
                    no_breed_query_share: float) -> dict[str, int]:
    """Write the raw files of ``stages.lib.layout`` (plus ``truth.tsv``) to ``out_dir``.

    Returns counts for logging. The images are drawn in a process per core
    and written in order, as they come.
    """
    if not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
    if not all(0 <= x <= 1 for x in (lookalike_share, lookalike_only_share, best_known_share,
                                     distractor_share, no_breed_query_share)) or distractor_share == 1:
        raise ValueError("shares must lie in [0, 1]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    top = np.random.default_rng(seed)
    n_dist = int(round(n_train * distractor_share))
    true_breeds = [None] * n_dist + [BREED_NAMES[i % len(BREEDS)] for i in range(n_train - n_dist)]
    top.shuffle(true_breeds)
    with open(out_dir / layout.BREEDS, "w", encoding="utf-8") as f:
        f.writelines(f"{name}\t{i}\n" for i, name in enumerate(BREED_NAMES))
    n_clicks = 0
    # Each image draws from its own generator ([seed, split, i]), so the images can be drawn in worker
    # processes and written in order: the files are byte for byte those of a single process.
    train = functools.partial(_train_item, seed, sides=(min_side, max_side), shares=dict(
        lookalike_share=lookalike_share, lookalike_only_share=lookalike_only_share,
        best_known_share=best_known_share, no_breed_query_share=no_breed_query_share))
    test = functools.partial(_test_item, seed, sides=(min_side, max_side))
    n_test = test_per_breed * len(BREEDS)
    with _pool() as pool, open(out_dir / layout.TRAIN_IMAGES, "w", encoding="utf-8") as fi, \
            open(out_dir / layout.CLICKS, "w", encoding="utf-8") as fc, \
            open(out_dir / layout.TRUTH, "w", encoding="utf-8") as ft:
        for image_line, truth_line, click_lines in pool.map(train, enumerate(true_breeds), chunksize=64):
            fi.write(image_line)
            ft.write(truth_line)
            fc.writelines(click_lines)
            n_clicks += len(click_lines)
        with open(out_dir / layout.TEST_IMAGES, "w", encoding="utf-8") as fi, \
                open(out_dir / layout.TEST_LABELS, "w", encoding="utf-8") as fl:
            for image_line, label_line in pool.map(test, range(n_test), chunksize=64):
                fi.write(image_line)
                fl.write(label_line)
    return {"train_images": n_train, "distractors": n_dist, "click_lines": n_clicks, "test_images": n_test}


def _train_item(seed: int, item: tuple[int, str | None], *, sides: tuple[int, int],
                shares: dict[str, float]) -> tuple[str, str, list[str]]:
    """Training image ``i`` (``breed`` None: a distractor): its image, truth and click-log lines."""
    i, breed = item
    rng = np.random.default_rng([seed, 0, i])
    key = _key(rng)
    size = int(rng.integers(sides[0], sides[1] + 1))
    img = draw_distractor(rng, size) if breed is None else draw_dog(BREEDS[BREED_NAMES.index(breed)], rng, size)
    image_line, truth_line = f"{key}\t{_jpeg_b64(img)}\n", f"{key}\t{breed or DISTRACTOR}\n"
    return image_line, truth_line, [f"{k}\t{q}\t{c}\n" for k, q, c in click_rows(key, breed, rng, **shares)]


def _test_item(seed: int, i: int, *, sides: tuple[int, int]) -> tuple[str, str]:
    """Test image ``i``: its image line and its label line."""
    breed = BREEDS[i % len(BREEDS)]
    rng = np.random.default_rng([seed, 1, i])
    key = _key(rng)
    img = draw_dog(breed, rng, int(rng.integers(sides[0], sides[1] + 1)))
    return f"{key}\t{_jpeg_b64(img)}\n", f"{key}\t{breed.name}\n"


def _pool() -> contextlib.AbstractContextManager:
    """A process per core, or this process on one core. Spawned, not forked: a fork copies whatever
    threads and locks this process holds (BLAS, the stage's SIGTERM handler), and a forked worker that
    inherits a held lock waits for ever. Each item has its own generator, so the bytes are the same."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 2:
        return contextlib.nullcontext(_Serial())
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))


class _Serial:
    @staticmethod
    def map(fn, items, chunksize: int = 1):  # noqa: ANN001, ARG004 (Executor.map's signature)
        return map(fn, items)
