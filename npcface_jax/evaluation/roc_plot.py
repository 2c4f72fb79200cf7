"""ROC curves as PNG, drawn with Pillow (already a dependency for decoding
images) rather than pulling in a plotting library for one figure.

True accept rate against false accept rate on a log axis, as face
verification papers plot them (IJB-B/C, BLUFR). A curve of millions of
points is reduced to its upper envelope per pixel column before drawing.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_COLOURS = ('#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b',
            '#e377c2', '#17becf')
_SIZE = (720, 540)
_MARGIN = (80, 50, 30, 60)  # left, top, right, bottom


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def lowest_far(curves: dict) -> float:
  """The x axis starts at the decade below the smallest positive FAR of any
  curve (at most 1e-1), so every measured point is on the plot."""
  smallest = min((float(np.min(far[far > 0])) for far, _ in curves.values()
                  if np.any(far > 0)), default=1e-6)
  return 10.0 ** min(-1, math.floor(math.log10(smallest)))


def save_roc_png(path: str, curves: dict, title: str) -> None:
  """curves: name -> (far, tar) arrays, e.g. from protocols.roc_curve."""
  if not curves:
    raise ValueError('save_roc_png needs at least one curve')
  image = Image.new('RGB', _SIZE, 'white')
  draw = ImageDraw.Draw(image)
  small, large = _font(13), _font(16)
  left, top, right, bottom = _MARGIN
  x0, x1 = left, _SIZE[0] - right
  y0, y1 = _SIZE[1] - bottom, top
  decades = -int(round(math.log10(lowest_far(curves))))

  def px(far):
    pos = (np.log10(np.maximum(far, 10.0 ** -decades)) + decades) / decades
    return x0 + pos * (x1 - x0)

  def py(tar):
    return y0 + np.asarray(tar) * (y1 - y0)

  for d in range(decades + 1):  # vertical grid and FAR labels
    x = float(px(10.0 ** -d))
    draw.line([(x, y0), (x, y1)], fill='#dddddd')
    label = '1' if d == 0 else f'1e-{d}'
    draw.text((x, y0 + 6), label, fill='black', font=small, anchor='ma')
  for i in range(11):  # horizontal grid and TAR labels
    y = float(py(i / 10))
    draw.line([(x0, y), (x1, y)], fill='#dddddd')
    draw.text((x0 - 6, y), f'{i / 10:.1f}', fill='black', font=small,
              anchor='rm')
  draw.rectangle([x0, y1, x1, y0], outline='black')
  draw.text(((x0 + x1) / 2, _SIZE[1] - 22), 'false accept rate',
            fill='black', font=small, anchor='mm')
  draw.text((14, (y0 + y1) / 2), 'TAR', fill='black', font=small,
            anchor='lm')
  draw.text(((x0 + x1) / 2, 22), title, fill='black', font=large,
            anchor='mm')

  for n, (name, (far, tar)) in enumerate(curves.items()):
    colour = _COLOURS[n % len(_COLOURS)]
    draw.line(_envelope(px(np.asarray(far, np.float64)),
                        py(np.asarray(tar, np.float64))),
              fill=colour, width=2)
    y = y0 - 20 - 18 * (len(curves) - 1 - n)  # legend, bottom right
    draw.line([(x1 - 170, y), (x1 - 145, y)], fill=colour, width=3)
    draw.text((x1 - 140, y), name, fill='black', font=small, anchor='lm')
  image.save(path, format='PNG')


def _envelope(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
  """The highest point per pixel column (ROC points are monotone, so this
  keeps the curve's shape), as a polyline."""
  columns = np.floor(xs).astype(np.int64)
  order = np.argsort(columns, kind='stable')
  columns, ys = columns[order], ys[order]
  starts = np.flatnonzero(np.append(True, columns[1:] != columns[:-1]))
  highest = np.minimum.reduceat(ys, starts)  # image y grows downwards
  return [(float(c), float(y)) for c, y in zip(columns[starts], highest)]
