"""Small image helpers shared by decode and predict, so both see an image the
same way and accept the same untrusted input."""
from __future__ import annotations

from typing import IO

from PIL import Image

# The formats a search engine serves as photos. Pillow would otherwise open
# whatever it recognises, EPS and PDF included, which it hands to Ghostscript.
INPUT_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000  # params.yaml's decode.max_pixels; predict's default


class TooManyPixels(ValueError):
    """Larger than the pixel limit: refused before decoding (a decompression bomb)."""


def open_image(fp: str | IO[bytes], *, max_pixels: int) -> Image.Image:
    """Open an image lazily (header only) if its format is allow-listed
    (``PIL.UnidentifiedImageError`` otherwise) and it has at most
    ``max_pixels`` pixels (:class:`TooManyPixels` otherwise)."""
    img = Image.open(fp, formats=INPUT_FORMATS)
    if img.width * img.height > max_pixels:
        img.close()
        raise TooManyPixels(f"{img.width}x{img.height} pixels is more than the limit of {max_pixels}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white: their hidden colours
    are arbitrary, and convert("RGB") would expose them."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")
