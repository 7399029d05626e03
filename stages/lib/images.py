"""Small image helpers shared by decode and predict, so both see an image the
same way and accept the same untrusted input."""
from __future__ import annotations

from typing import IO

import numpy as np
from PIL import ExifTags, Image

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


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1, upright, when absent or invalid)."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block is no reason to lose the photo
        return 1
    return value if value in _UPRIGHT else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB and upright, the one rule of decode and predict:

    - transparent pixels composited on white (their hidden colours are
      arbitrary, and convert("RGB") would expose them);
    - 16-bit greyscale scaled to 8 bits (convert("RGB") clips it: nearly
      every pixel of a 16-bit photo came out white);
    - turned as its EXIF orientation says: a phone photo is stored sideways
      with a tag, and the camera's view is the one the clicks were made on.
    """
    orientation = exif_orientation(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
    elif img.mode.startswith("I"):  # I;16, I;16B, I: 16-bit samples in a wider integer
        grey = np.right_shift(np.asarray(img, dtype=np.uint32), 8).clip(0, 255).astype(np.uint8)
        out = Image.fromarray(grey, "L").convert("RGB")
    else:
        out = img.convert("RGB")
    return out.transpose(_UPRIGHT[orientation]) if orientation != 1 else out
