"""Small image helpers shared by decode and predict, so both see an image the
same way."""
from __future__ import annotations

from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white: their hidden colours
    are arbitrary, and convert("RGB") would expose them."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")
