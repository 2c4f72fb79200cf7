"""The PNG figures of a comparison report of training runs, drawn with
matplotlib: the NPCFace paper's Figs. 3 (Pearson's r and the angles of
the mis-classified samples), 5 (cosine histograms), 6 (overlap rate), 7
(cosine to the nearest negative), 8 (training curves) and 10 (ROC); a
head's own diagnostics over training, and the feature norms' histograms
(MagFace's Fig. 2).

Every function takes plain data (records already read, e.g. by
hard_samples.read_records) and writes one PNG; none reads a run directory.
matplotlib is the optional [report] extra, imported only when a figure is
drawn; figures are made with matplotlib.figure.Figure on an Agg canvas,
so no pyplot state (backend, open-figure registry) is touched or leaked.
A run with nothing to draw is left out of the legend; an axes with
nothing at all says "no data" instead of failing. Run i has the same
colour and line style in every figure, so figures of one report read
together (past ten runs the colours come round again, dashed).
"""

from __future__ import annotations

import math

import numpy as np

from npcface_jax.training import hard_samples

_MESSAGE = 'the report needs matplotlib: pip install "npcface_jax[report]"'
_DPI = 96
_COLOURS = ('#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b',
            '#e377c2', '#17becf', '#7f7f7f', '#bcbd22')
_WELL, _MIS, _ALL = '#1f77b4', '#d62728', '#555555'
_ROC_POINTS = 2000  # a ROC of millions of points, thinned on log FAR


class MissingExtra(ImportError):
  """matplotlib (the [report] extra) is not installed."""


def require():
  """(Figure, FigureCanvasAgg) of matplotlib, imported only when a figure
  is drawn; MissingExtra says which extra to install."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (the [report] extra)
    from matplotlib.figure import Figure  # noqa: PLC0415 (the [report] extra)
  except ImportError as e:
    raise MissingExtra(_MESSAGE) from e
  return Figure, FigureCanvasAgg


def _colour(i: int) -> str:
  return _COLOURS[i % len(_COLOURS)]


def _dash(i: int) -> str:
  """Run i's line style: solid, then dashed, dotted once the colours have
  come round (more than ten runs on one axes)."""
  return ('-', '--', ':', '-.')[(i // len(_COLOURS)) % 4]


def _figure(width: float, height: float):
  """A figure whose constrained layout keeps labels and the outside legend
  inside the image."""
  figure_class, _ = require()
  return figure_class(figsize=(width, height), dpi=_DPI, layout='constrained')


def _save(fig, path) -> str:
  """Writes the PNG with a 256-colour palette (a plot has few colours:
  a third of the bytes) and no timestamp (the same data gives the same
  bytes)."""
  from PIL import Image  # noqa: PLC0415 (with the figures only)
  _, canvas_class = require()
  canvas = canvas_class(fig)
  canvas.draw()
  image = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
  fig.clear()
  image.quantize(256, method=Image.Quantize.MEDIANCUT).save(
      path, 'PNG', optimize=True)
  return str(path)


def _number(value) -> float | None:
  """A finite float, or None for None, a bool, text or nan."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def _series(records, x_key: str, y_key: str):
  """(xs, ys) of the records where both values are numbers."""
  points = [(_number(r.get(x_key)), _number(r.get(y_key)))
            for r in records or () if isinstance(r, dict)]
  points = [(x, y) for x, y in points if x is not None and y is not None]
  return [x for x, _ in points], [y for _, y in points]


def _line(ax, xs, ys, colour: str, markers: bool = False,
          linestyle: str = '-'):
  """One run's curve; markers where points are few, so a lone point
  shows."""
  marker = 'o' if markers or len(xs) <= 30 else None
  return ax.plot(xs, ys, color=colour, marker=marker, markersize=3.5,
                 linewidth=1.5, linestyle=linestyle)[0]


def _no_data(ax) -> None:
  ax.text(0.5, 0.5, 'no data', transform=ax.transAxes, ha='center',
          va='center', fontsize='large', color='#666666')


def _legend(fig, entries: dict) -> None:
  """One legend under the axes (never over a curve), the figure taller by
  its rows; entries: label -> handle, in run order."""
  if not entries:
    return
  longest = max(len(str(label)) for label in entries)
  ncols = max(1, min(len(entries), 72 // (longest + 6)))
  width, height = fig.get_size_inches()
  fig.set_size_inches(width, height + 0.25 * math.ceil(len(entries) / ncols))
  fig.legend(list(entries.values()), [str(k) for k in entries],
             loc='outside lower center', ncols=ncols, fontsize='small',
             frameon=False)


def _lines(runs, x_key: str, panels) -> dict:
  """One line per run in each (axes, key) panel, run i in colour i; the
  legend's entries, runs with nothing drawn left out."""
  entries = {}
  for i, (label, records) in enumerate(runs):
    for ax, key in panels:
      xs, ys = _series(records, x_key, key)
      if xs:
        entries.setdefault(label, _line(ax, xs, ys, _colour(i),
                                        linestyle=_dash(i)))
  return entries


def training_curves(path, runs) -> str:
  """Fig. 8: training loss and top-1 accuracy against step, one line per
  run (the same colour in both panels). runs: [(label, metrics records)]."""
  require()
  fig = _figure(9.0, 3.8)
  loss_ax, acc_ax = fig.subplots(1, 2)
  entries = _lines(runs, 'step', ((loss_ax, 'loss'), (acc_ax, 'accuracy')))
  for ax, name in ((loss_ax, 'training loss'), (acc_ax, 'training accuracy')):
    ax.set_xlabel('step')
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    if not ax.lines:
      _no_data(ax)
  if acc_ax.lines:
    top = max(max(line.get_ydata()) for line in acc_ax.lines)
    acc_ax.set_ylim(0.0, max(1.0, top) * 1.02)
  _legend(fig, entries)
  return _save(fig, path)


def correlation(path, runs) -> str:
  """Fig. 3: Pearson's r between the angles to the ground-truth and to the
  nearest other centre of the mis-classified samples, against epoch; and
  those angles of each run's last record. runs: [(label, stats records)]."""
  require()
  fig = _figure(10.0, 4.2)
  r_ax, scatter_ax = fig.subplots(1, 2)
  entries = {}
  for i, (label, records) in enumerate(runs):
    xs, ys = _series(records, 'epoch', 'pearson')
    if xs:
      entries[label] = _line(r_ax, xs, ys, _colour(i), markers=True,
                             linestyle=_dash(i))
    last = records[-1] if records and isinstance(records[-1], dict) else {}
    points = _angles(last.get('scatter_degrees'))
    if len(points):
      handle = scatter_ax.scatter(points[:, 0], points[:, 1], s=6,
                                  alpha=0.45, color=_colour(i), linewidths=0)
      entries.setdefault(label, handle)
  for ax in (r_ax, scatter_ax):
    ax.grid(alpha=0.3)
    if not (ax.lines or ax.collections):
      _no_data(ax)
  if r_ax.lines:
    r_ax.axhline(0.0, color='black', linewidth=0.8)
  r_ax.set_ylim(-1.05, 1.05)
  r_ax.set(xlabel='epoch', ylabel="Pearson's r",
           title="Pearson's r of the two angles")
  scatter_ax.set(xlabel='angle to ground-truth centre (degrees)',
                 ylabel='angle to nearest other centre (degrees)',
                 title='last record of each run')
  if scatter_ax.collections:  # equal angles, for reference
    limits = scatter_ax.get_xlim(), scatter_ax.get_ylim()
    scatter_ax.axline((0.0, 0.0), slope=1.0, color='#999999',
                      linewidth=0.8, linestyle='--')
    scatter_ax.set(xlim=limits[0], ylim=limits[1])
  fig.suptitle('mis-classified samples: angle to ground-truth centre vs '
               'to nearest other centre')
  _legend(fig, entries)
  return _save(fig, path)


def _angles(value) -> np.ndarray:
  """(N, 2) finite degree pairs of a record's scatter_degrees."""
  try:
    points = np.asarray(value if value is not None else [], np.float64)
  except (TypeError, ValueError):
    return np.zeros((0, 2))
  if points.ndim != 2 or points.shape[1] != 2:
    return np.zeros((0, 2))
  return points[np.all(np.isfinite(points), axis=1)]


def overlap(path, runs) -> str:
  """Fig. 6: the overlap rate of the well- and mis-classified samples'
  cosine histograms against epoch, and the share of mis-classified
  samples. runs: [(label, stats records)]."""
  require()
  fig = _figure(9.0, 3.8)
  overlap_ax, share_ax = fig.subplots(1, 2)
  entries = _lines(runs, 'epoch', ((overlap_ax, 'overlap'),
                                   (share_ax, 'misclassified_share')))
  overlap_ax.set_ylim(-0.02, 1.02)
  overlap_ax.set(xlabel='epoch', ylabel='overlap rate',
                 title='overlap of well- and mis-classified')
  share_ax.set(xlabel='epoch', ylabel='share of samples',
               title='mis-classified samples')
  if share_ax.lines:
    share_ax.set_ylim(bottom=0.0)
  for ax in (overlap_ax, share_ax):
    ax.grid(alpha=0.3)
    if not ax.lines:
      _no_data(ax)
  _legend(fig, entries)
  return _save(fig, path)


def _edges(record: dict) -> np.ndarray:
  """The bin edges a record states (hard_samples.EDGES for the usual bins)."""
  bins = record.get('bins')
  if bins is None or list(bins) == [-1.0, 1.0, hard_samples.NUM_BINS]:
    return hard_samples.EDGES
  try:
    low, high, count = (float(b) for b in bins)
    return np.linspace(low, high, int(count) + 1)
  except (TypeError, ValueError):
    return hard_samples.EDGES


def _density(record, key: str):
  """(density, edges) of one histogram of a record, counts / total / bin
  width; None when it is empty or does not fit the bins."""
  if not isinstance(record, dict) or not isinstance(record.get('hist'), dict):
    return None
  edges = _edges(record)
  try:
    counts = np.asarray(record['hist'].get(key) or [], np.float64)
  except (TypeError, ValueError):
    return None
  if (counts.shape != (len(edges) - 1,) or not np.all(np.isfinite(counts))
      or counts.sum() <= 0):
    return None
  return counts / counts.sum() / np.diff(edges), edges


def _span(histograms) -> tuple[float, float] | None:
  """The cosine range the non-empty bins cover, padded, over all the
  (density, edges) given: the x limits that show every sample."""
  lows, highs = [], []
  for density, edges in histograms:
    used = np.flatnonzero(density > 0)
    lows.append(edges[used[0]])
    highs.append(edges[used[-1] + 1])
  if not lows:
    return None
  pad = 0.05 * max(max(highs) - min(lows), 0.1)
  return max(-1.0, min(lows) - pad), min(1.0, max(highs) + pad)


def _panels(records, max_panels: int) -> list:
  """At most max_panels records spread evenly from the first to the last,
  in epoch order."""
  records = [r for r in records or () if isinstance(r, dict)]
  records.sort(key=lambda r: (_number(r.get('epoch')) or 0.0,
                              _number(r.get('step')) or 0.0))
  if len(records) <= max_panels:
    return records
  chosen = np.linspace(0, len(records) - 1, max_panels).round().astype(int)
  return [records[i] for i in sorted(set(chosen.tolist()))]


def cosine_histograms(path, label, records, max_panels=6) -> str:
  """Fig. 5: densities of the cosine to the ground-truth centre of the
  well- (blue) and mis-classified (red) samples, one panel per chosen
  record of one run."""
  require()
  if max_panels < 1:
    raise ValueError(f'max_panels must be at least 1, got {max_panels}')
  chosen = _panels(records, max_panels) or [None]
  cols = min(3, len(chosen))
  rows = math.ceil(len(chosen) / cols)
  fig = _figure(max(5.0, 3.3 * cols + 0.4), 2.4 * rows + 0.9)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  drawn, entries = [], {}
  for ax, record in zip(axes, chosen):
    for key, colour, name in (('target_well', _WELL, 'well-classified'),
                              ('target_misclassified', _MIS,
                               'mis-classified')):
      hist = _density(record, key)
      if hist is not None:
        drawn.append(hist)
        ax.stairs(*hist, fill=True, color=colour, alpha=0.3)
        entries[name] = ax.stairs(*hist, color=colour, linewidth=1.2)
    ax.set_title(_panel_title(record), fontsize='medium')
    ax.grid(alpha=0.3)
    if not ax.patches:
      _no_data(ax)
  for ax in axes[len(chosen):]:
    ax.set_visible(False)
  span = _span(drawn)
  for n, ax in enumerate(axes[:len(chosen)]):
    ax.locator_params(axis='x', nbins=5)
    if span:
      ax.set_xlim(*span)
    if n + cols >= len(chosen):  # the lowest panel of its column
      ax.set_xlabel('cosine to ground-truth centre')
  fig.supylabel('density', fontsize='medium')
  fig.suptitle(str(label))
  _legend(fig, {k: entries[k] for k in ('well-classified', 'mis-classified')
                if k in entries})
  return _save(fig, path)


def _panel_title(record) -> str:
  if not isinstance(record, dict):
    return ''
  epoch, rate = _number(record.get('epoch')), _number(record.get('overlap'))
  title = (f'epoch {epoch:.2f}' if epoch is not None
           else f'step {record.get("step")}')
  return title + (f' (overlap {rate:.3f})' if rate is not None else '')


def nearest_negative(path, runs) -> str:
  """Fig. 7: the density of the mis-classified samples' cosine to the
  nearest other centre, one curve per run. runs: [(label, last stats
  record or None)]."""
  require()
  fig = _figure(6.4, 4.2)
  ax = fig.subplots()
  entries, drawn = {}, []
  for i, (label, record) in enumerate(runs):
    hist = _density(record, 'nearest_misclassified')
    if hist is not None:
      drawn.append(hist)
      ax.stairs(*hist, fill=True, color=_colour(i), alpha=0.12)
      entries[label] = ax.stairs(*hist, color=_colour(i), linewidth=1.5,
                                 linestyle=_dash(i))
  ax.set(xlabel='cosine to the nearest other centre', ylabel='density',
         title='mis-classified samples: nearest negative')
  ax.grid(alpha=0.3)
  span = _span(drawn)
  if span:
    ax.set_xlim(*span)
  else:
    _no_data(ax)
  _legend(fig, entries)
  return _save(fig, path)


def _grid(fig, count: int, cols: int):
  """count axes in rows of ``cols``, the spare ones hidden."""
  cols = max(1, min(cols, count))
  axes = fig.subplots(math.ceil(count / cols), cols, squeeze=False).ravel()
  for ax in axes[count:]:
    ax.set_visible(False)
  return axes[:count]


def head_diagnostics(path, label, records, panels, index: int = 0) -> str:
  """A head's own quantities against step, one panel each, in run
  ``index``'s colour; panels: [(title, key, std key or None)], a std key
  drawn as a band of mean +- std around key's line (a bar at a lone
  point). records: the run's
  metrics.jsonl records."""
  require()
  panels = list(panels) or [('', '', None)]
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = _figure(max(5.0, 3.6 * cols + 0.4), 2.5 * rows + 0.7)
  for ax, (title, key, band) in zip(_grid(fig, len(panels), cols), panels):
    xs, ys = _series(records, 'step', key)
    if band:
      std = dict(zip(*_series(records, 'step', band)))
      at = np.asarray([(x, y, std[x]) for x, y in zip(xs, ys) if x in std])
      if len(at) > 1:
        ax.fill_between(at[:, 0], at[:, 1] - at[:, 2], at[:, 1] + at[:, 2],
                        color=_colour(index), alpha=0.2, linewidth=0)
      elif len(at):  # a lone point: a bar, where a band has no width
        ax.errorbar(at[:, 0], at[:, 1], yerr=at[:, 2], fmt='none',
                    ecolor=_colour(index), alpha=0.5, capsize=3)
      title += ' (band: \u00b1 std)'
    if xs:
      _line(ax, xs, ys, _colour(index))
    else:
      _no_data(ax)
    ax.set_title('\n'.join(_wrap(title, 54)), fontsize='small')
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  fig.suptitle(str(label))
  return _save(fig, path)


def _wrap(text: str, width: int) -> list[str]:
  """Words in lines of at most about ``width`` characters."""
  lines = ['']
  for word in str(text).split():
    if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
      lines.append('')
    lines[-1] = f'{lines[-1]} {word}'.strip()
  return lines


def _norm_share(record):
  """(share of samples per bin, edges) of a record's norm histogram; None
  when it has none (written before norms were recorded), it is empty, or
  it does not fit its bins."""
  if not isinstance(record, dict):
    return None
  edges = hard_samples.norm_edges(record.get('norm_bins'))
  try:
    counts = np.asarray(record.get('norm_hist') or [], np.float64)
  except (TypeError, ValueError):
    return None
  if (edges is None or counts.shape != (len(edges) - 1,)
      or not np.all(np.isfinite(counts)) or counts.sum() <= 0):
    return None
  return counts / counts.sum(), edges


def norm_histograms(path, runs) -> str:
  """The distribution of the embeddings' norms (MagFace's Fig. 2: its
  quality score), one panel per run on a log axis (the bins are
  log-spaced), with the mean norm of the well- (blue) and mis-classified
  (red) samples. runs: [(label, last stats record or None)]; a run
  without norms is left out."""
  require()
  drawn = [(i, label, record, _norm_share(record))
           for i, (label, record) in enumerate(runs)]
  drawn = [d for d in drawn if d[3] is not None]
  count = max(len(drawn), 1)
  cols = min(4 if count > 6 else 3, count)
  fig = _figure(max(5.0, 2.7 * cols + 0.4),
                2.1 * math.ceil(count / cols) + 0.9)
  entries = {}
  axes = _grid(fig, count, cols)
  for n, (ax, (_, label, record, (share, edges))) in enumerate(zip(axes,
                                                                   drawn)):
    ax.stairs(share, edges, fill=True, color=_ALL, alpha=0.25)
    entries['all samples'] = ax.stairs(share, edges, color=_ALL,
                                       linewidth=1.2)
    for key, colour, name in (
        ('mean_norm_well', _WELL, 'well-classified: mean norm'),
        ('mean_norm_misclassified', _MIS, 'mis-classified: mean norm')):
      value = _number(record.get(key))
      if value is not None and value > 0:
        entries[name] = ax.axvline(value, color=colour, linestyle='--',
                                   linewidth=1.0)
    used = np.flatnonzero(share > 0)
    low, high = edges[used[0]], edges[used[-1] + 1]
    pad = (high / low) ** 0.08
    _log_axis(ax, low / pad, high * pad)
    ax.set_title(_norm_title(label, record), fontsize='small')
    ax.grid(alpha=0.3, which='both')
    if n + cols >= len(drawn):  # the lowest panel of its column
      ax.set_xlabel('feature norm (log scale)')
  if not drawn:
    _no_data(axes[0])
  fig.supylabel('share of samples per bin', fontsize='medium')
  fig.suptitle('Feature norm distribution (the last record of each run)')
  _legend(fig, {k: entries[k] for k in (
      'all samples', 'well-classified: mean norm', 'mis-classified: mean norm')
                if k in entries})
  return _save(fig, path)


def _log_axis(ax, low: float, high: float) -> None:
  """A log x axis from low to high, its ticks as plain numbers ('20', not
  2 x 10^1), the in-between ones labelled only on a short span."""
  from matplotlib import ticker  # noqa: PLC0415 (the [report] extra)
  ax.set_xscale('log')
  ax.set_xlim(low, high)
  ax.xaxis.set_major_formatter(ticker.LogFormatter())
  ax.xaxis.set_minor_formatter(ticker.LogFormatter(
      labelOnlyBase=False, minor_thresholds=(1.2, 0.6)))
  ax.tick_params(axis='x', which='minor', labelsize='x-small')


def _norm_title(label, record) -> str:
  mean, std = (_number(record.get(k)) for k in ('mean_norm', 'std_norm'))
  if mean is None:
    return str(label)
  return f'{label}\nmean {mean:.3g}' + (f' \u00b1 {std:.2g}' if std is not None
                                         else '')


def _roc_points(far, tar):
  """(far, tar) with FAR 0 (not on a log axis) and non-finite points
  dropped, sorted by FAR and thinned to about _ROC_POINTS on log FAR."""
  try:
    far = np.asarray(far if far is not None else [], np.float64).ravel()
    tar = np.asarray(tar if tar is not None else [], np.float64).ravel()
  except (TypeError, ValueError):
    return np.zeros(0), np.zeros(0)
  if far.shape != tar.shape:
    return np.zeros(0), np.zeros(0)
  keep = np.isfinite(far) & np.isfinite(tar) & (far > 0)
  far, tar = far[keep], tar[keep]
  order = np.lexsort((tar, far))
  far, tar = far[order], tar[order]
  if len(far) > _ROC_POINTS:
    grid = np.geomspace(far[0], far[-1], _ROC_POINTS)
    at = np.unique(np.append(np.searchsorted(far, grid, side='right') - 1,
                             len(far) - 1))
    far, tar = far[at], tar[at]
  return far, tar


def roc(path, set_name, curves) -> str:
  """Fig. 10: TAR against FAR on a log FAR axis, one line per run.
  curves: [(label, far, tar)]."""
  require()
  fig = _figure(6.4, 4.4)
  ax = fig.subplots()
  entries = {}
  for i, (label, far, tar) in enumerate(curves):
    far, tar = _roc_points(far, tar)
    if len(far):
      entries[label] = _line(ax, far, tar, _colour(i), markers=False,
                             linestyle=_dash(i))
  if ax.lines:
    ax.set_xscale('log')
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.01)
  else:
    _no_data(ax)
  ax.set(xlabel='false accept rate (FAR)', ylabel='true accept rate (TAR)',
         title=f'{set_name}: ROC')
  ax.grid(which='major', alpha=0.4)
  ax.grid(which='minor', alpha=0.12)
  _legend(fig, entries)
  return _save(fig, path)
