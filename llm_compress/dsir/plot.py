"""The weights histogram (``weights_hist.png``), drawn with Pillow.

matplotlib used to draw it, but importing matplotlib alone takes 0.3-0.4 s on one core, about half as long as
the rest of a ``compress select`` over a 19 MB pool takes. Pillow (which matplotlib depends on) imports in about
15 ms and draws these panels in a few more. The picture is the same kind, in matplotlib's default font and
colours: per target, density histograms on 60 shared bins of all eligible documents and of the selected ones,
translucent so the overlap shows, with axes, ticks, labels and a legend.
"""

from __future__ import annotations

import importlib.util
import math
import os
import uuid
from pathlib import Path

import numpy as np

W, H = 640, 320  # pixels per panel (matplotlib's former 6.4 x 3.2 in at 100 dpi)
LEFT, RIGHT, TOP, BOTTOM = 76, 16, 12, 44  # margins around each panel's plot area
BINS = 60
COLORS = ((31, 119, 180), (255, 127, 14))  # matplotlib's first two default colours
ALPHA = 153  # 0.6 opacity


def nice_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Round values in [lo, hi], 1, 2, 2.5 or 5 times a power of ten apart, at most ``most + 1`` of them."""
    if not hi > lo:
        return [lo]
    rough = (hi - lo) / most
    mag = 10.0 ** math.floor(math.log10(rough))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= rough)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _font(image_font):
    """matplotlib's DejaVu Sans, found without importing matplotlib (it covers far more scripts than Pillow's
    built-in font, which draws target names in other scripts as boxes); else Pillow's built-in one."""
    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        try:
            return image_font.truetype(str(Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), 12)
        except OSError:
            pass
    return image_font.load_default(size=12)


def weights_histogram(path: Path, panels: list[tuple[str, list[tuple[str, np.ndarray]]]]) -> None:
    """Write a PNG of one panel per ``(x label, [(series label, values [n]), ...])``, atomically.

    Each series is a filled density histogram; the bins span the first series (the others must lie inside it, as
    the selected documents lie among the eligible ones). At most two series per panel; an empty one draws nothing.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = _font(ImageFont)
    img = Image.new("RGB", (W, H * len(panels)), "white")
    draw = ImageDraw.Draw(img, "RGBA")  # RGBA fills blend into the RGB image
    for p, (xlabel, series) in enumerate(panels):
        x0, y0, x1, y1 = LEFT, p * H + TOP, W - RIGHT, (p + 1) * H - BOTTOM  # plot area
        bins = np.histogram_bin_edges(series[0][1], bins=BINS)
        dens = [np.histogram(w, bins=bins, density=True)[0] if len(w) else np.zeros(BINS) for _, w in series]
        pad = 0.05 * (bins[-1] - bins[0])  # matplotlib's margins
        lo, hi = bins[0] - pad, bins[-1] + pad
        top = 1.05 * max(float(d.max()) for d in dens) or 1.0

        def px(v: float) -> float:
            return x0 + (v - lo) / (hi - lo) * (x1 - x0)

        def py(v: float) -> float:
            return y1 - v / top * (y1 - y0)

        for d, color in zip(dens, COLORS):
            for a, b, h in zip(bins[:-1].tolist(), bins[1:].tolist(), d.tolist()):
                if h > 0:
                    draw.rectangle([px(a), py(h), px(b), y1], fill=(*color, ALPHA))
        draw.rectangle([x0, y0, x1, y1], outline="black")
        for v in nice_ticks(lo, hi):
            draw.line([px(v), y1, px(v), y1 + 4], fill="black")
            draw.text((px(v), y1 + 6), f"{v:g}", font=font, fill="black", anchor="ma")
        for v in nice_ticks(0.0, top):
            draw.line([x0 - 4, py(v), x0, py(v)], fill="black")
            draw.text((x0 - 6, py(v)), f"{v:g}", font=font, fill="black", anchor="rm")
        draw.text(((x0 + x1) / 2, (p + 1) * H - 6), xlabel, font=font, fill="black", anchor="md")
        ylabel = Image.new("RGBA", (int(draw.textlength("density", font=font)) + 4, 16), (255, 255, 255, 0))
        ImageDraw.Draw(ylabel).text((2, 8), "density", font=font, fill="black", anchor="lm")
        ylabel = ylabel.rotate(90, expand=True)
        img.paste(ylabel, (4, (y0 + y1 - ylabel.height) // 2), ylabel)
        # The legend goes in the upper corner over the lower half of the bins, so it hides fewer bars.
        labels = [f"{name} ({len(w)})" for name, w in series]
        box_w = 40 + max(int(draw.textlength(t, font=font)) for t in labels)
        bx = x0 + 8 if dens[0][: BINS // 2].max() <= dens[0][BINS // 2:].max() else x1 - 8 - box_w
        draw.rectangle([bx, y0 + 6, bx + box_w, y0 + 12 + 18 * len(labels)], fill=(255, 255, 255, 200),
                       outline=(204, 204, 204))
        for i, (text, color) in enumerate(zip(labels, COLORS)):
            ly = y0 + 12 + 18 * i
            draw.rectangle([bx + 8, ly + 2, bx + 28, ly + 12], fill=(*color, ALPHA))
            draw.text((bx + 34, ly + 7), text, font=font, fill="black", anchor="lm")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.png")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
