"""The report's figures (figures.py) from synthetic runs: each writes a
small PNG that Pillow decodes, different data gives a different image,
the same data the same bytes, empty and None values still give a PNG
("no data"), records written before norms were recorded are left out of
the norm figure, and without matplotlib require() names the extra."""

import io
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from npcface_jax.study import figures
from npcface_jax.training import hard_samples
from tests.helpers import fresh_rng

PNG = b'\x89PNG\r\n\x1a\n'


def metrics_records(rng, steps=40, speed=1.0):
  """Training curves: a loss falling and an accuracy rising, noisy."""
  step = np.arange(1, steps + 1) * 50
  t = step / step[-1]
  loss = 20 * np.exp(-3 * speed * t) + rng.normal(0, 0.3, steps) + 2
  acc = np.clip(1 - np.exp(-3 * speed * t) + rng.normal(0, 0.02, steps), 0, 1)
  return [{'step': int(s), 'epoch': float(s / 500), 'loss': float(lo),
           'accuracy': float(a), 'cross_entropy': float(lo),
           'learning_rate': 0.1} for s, lo, a in zip(step, loss, acc)]


def stats_records(rng, epochs=8, shift=0.0, batch=512, norms=True):
  """Records as training writes them (hard_samples.Window), of samples whose
  cosines to their centre grow with the epoch (by ``shift`` more), and
  whose embedding norms grow with the cosine (without ``norms``, records
  as written before norms were recorded)."""
  records = []
  for epoch in range(1, epochs + 1):
    window = hard_samples.Window(first_step=(epoch - 1) * 100)
    for _ in range(3):
      c_y = np.clip(rng.normal(0.1 + 0.07 * epoch + shift, 0.2, batch),
                    -1, 1)
      near = np.clip(rng.normal(0.15, 0.1, batch) + 0.3 * (0.5 - c_y), -1, 1)
      mis = near > np.cos(np.arccos(c_y) + 0.4)
      norm = np.exp(rng.normal(2.5 + c_y + shift, 0.2)) if norms else None
      window.add(c_y, near, mis, norm=norm)
    records.append(window.record(epoch * 100, float(epoch), 0.4))
  return records


def roc_curve(rng, quality):
  """(far, tar) of random scores, genuine pairs ``quality`` apart."""
  same = np.r_[np.ones(2000, bool), np.zeros(20000, bool)]
  score = rng.normal(0, 1, len(same)) + quality * same
  order = np.argsort(-score)
  tar = np.cumsum(same[order]) / same.sum()
  far = np.cumsum(~same[order]) / (~same).sum()
  return np.r_[0.0, far].tolist(), np.r_[0.0, tar].tolist()


def _bytes(path):
  return pathlib.Path(path).read_bytes()


def _check_png(path, low=5_000, high=200_000):
  data = _bytes(path)
  assert data.startswith(PNG), path
  assert low <= len(data) <= high, (path, len(data))
  width, height = Image.open(io.BytesIO(data)).size
  assert 300 <= width <= 1600 and 200 <= height <= 1200, (width, height)
  return data


LONG = 'head=npcface, alpha=0.1'  # a label as long as the report's
KINDS = ('training_curves', 'correlation', 'overlap', 'cosine_histograms',
         'nearest_negative', 'roc', 'head_diagnostics', 'norm_histograms')
PANELS = [('AdaFace: running mean of the feature norm', 'head/norm_mean', None),
          ('ElasticFace: mean drawn margin', 'x/margin', 'x/margin_std')]


def diagnostics_records(rng, steps=20, speed=1.0):
  """A head's logged diagnostics: a norm statistic and a drawn margin's
  mean and std per step."""
  records = metrics_records(rng, steps, speed)
  for r in records:
    r.update({'head/norm_mean': 20 - speed * r['epoch'],
              'x/margin': float(rng.normal(0.5, 0.01)),
              'x/margin_std': float(rng.uniform(0.03, 0.06) * speed)})
  return records


def _draw(kind, path, rng, a, b):
  """One figure of runs a and b, each a dict of keywords for the
  builders: {'metrics': {...}, 'stats': {...}, 'roc': quality}."""
  if kind == 'training_curves':
    return figures.training_curves(path, [
        (LONG, metrics_records(rng, **a['metrics'])),
        ('head=arcface', metrics_records(rng, **b['metrics']))])
  if kind == 'roc':
    (fa, ta), (fb, tb) = roc_curve(rng, a['roc']), roc_curve(rng, b['roc'])
    return figures.roc(path, 'IJB-C', [(LONG, fa, ta), ('arc', fb, tb)])
  if kind == 'head_diagnostics':
    return figures.head_diagnostics(
        path, LONG, diagnostics_records(rng, **a['metrics']), PANELS, 1)
  sa, sb = stats_records(rng, **a['stats']), stats_records(rng, **b['stats'])
  if kind == 'cosine_histograms':
    return figures.cosine_histograms(path, LONG, sa)
  if kind == 'nearest_negative':
    return figures.nearest_negative(path, [(LONG, sa[-1]), ('arc', sb[-1])])
  if kind == 'norm_histograms':
    return figures.norm_histograms(path, [(LONG, sa[-1]), ('arc', sb[-1])])
  return getattr(figures, kind)(path, [(LONG, sa), ('head=arcface', sb)])


@pytest.mark.slow  # a second each; the quick tier draws in the tests below
@pytest.mark.parametrize('kind', KINDS)
def test_a_small_png_that_depends_on_the_data(tmp_path, kind):
  _, seed = fresh_rng()
  one = {'metrics': {}, 'stats': {}, 'roc': 3.0}
  other = {'metrics': {'speed': 2.0}, 'stats': {'shift': 0.2}, 'roc': 4.0}
  a = _draw(kind, tmp_path / 'a.png', np.random.default_rng(seed), one, other)
  b = _draw(kind, tmp_path / 'b.png', np.random.default_rng(seed), other, one)
  assert a == str(tmp_path / 'a.png')
  assert _check_png(a) != _check_png(b), f'{kind} unchanged, seed {seed}'


def test_same_data_same_bytes(tmp_path):
  rng, seed = fresh_rng()
  records = stats_records(rng, epochs=5)
  a = figures.cosine_histograms(tmp_path / 'a.png', 'run', records, 2)
  b = figures.cosine_histograms(tmp_path / 'b.png', 'run', records, 2)
  assert _bytes(a) == _bytes(b), f'seed {seed}'


def test_nothing_to_draw_still_writes_a_png(tmp_path):
  empty = {'step': 1, 'epoch': 1.0, 'pearson': None, 'overlap': None,
           'misclassified_share': None, 'scatter_degrees': [],
           'hist': dict.fromkeys(hard_samples.HISTOGRAMS, [0] * 200)}
  paths = [
      figures.training_curves(tmp_path / 'c.png', []),
      figures.training_curves(tmp_path / 'c2.png', [('a', []),
                                                    ('b', [{'step': 1}])]),
      figures.correlation(tmp_path / 'r.png', [('a', []), ('b', [empty])]),
      figures.overlap(tmp_path / 'o.png', [('a', [empty])]),
      figures.cosine_histograms(tmp_path / 'h.png', 'a', []),
      figures.cosine_histograms(tmp_path / 'h2.png', 'a', [empty]),
      figures.nearest_negative(tmp_path / 'n.png', [('a', None),
                                                    ('b', empty)]),
      figures.roc(tmp_path / 'roc.png', 'LFW', [('a', [0.0], [0.5])]),
      figures.head_diagnostics(tmp_path / 'd.png', 'a', [], []),
      figures.head_diagnostics(tmp_path / 'd2.png', 'a', [{'step': 1}],
                               PANELS),
      figures.norm_histograms(tmp_path / 'norm.png', [('a', None),
                                                      ('b', empty)]),
  ]
  for path in paths:
    _check_png(path, low=3_000)


def test_norm_figure_leaves_out_records_without_norms(tmp_path):
  """A run whose records predate the norms (or whose norm histogram does
  not fit its bins) adds nothing to the norm figure: not even a panel."""
  rng, seed = fresh_rng()
  new = stats_records(rng, epochs=1)[-1]
  old = stats_records(rng, epochs=1, norms=False)[-1]
  assert 'norm_hist' in new and 'norm_hist' not in old
  bad = dict(new, norm_hist=new['norm_hist'][1:])
  share, edges = figures._norm_share(new)  # noqa: SLF001 (what is drawn)
  np.testing.assert_allclose(share * sum(new['norm_hist']), new['norm_hist'])
  np.testing.assert_allclose(edges, hard_samples.NORM_EDGES)
  both = figures.norm_histograms(tmp_path / 'a.png', [
      ('run', new), ('old', old), ('bad', bad), ('none', None)])
  alone = figures.norm_histograms(tmp_path / 'b.png', [('run', new)])
  assert _bytes(both) == _bytes(alone), f'seed {seed}'


def test_more_runs_than_colours_differ_by_line_style():
  styles = {(figures._colour(i), figures._dash(i))  # noqa: SLF001
            for i in range(30)}
  assert len(styles) == 30


def test_none_values_are_skipped_and_runs_without_data_left_out(tmp_path):
  rng, seed = fresh_rng()
  records = stats_records(rng, epochs=6)
  holes = [dict(r, pearson=None if i % 2 else r['pearson'])
           for i, r in enumerate(records)]
  with_empty = figures.correlation(tmp_path / 'a.png',
                                   [('run', holes), ('empty', [])])
  without = figures.correlation(tmp_path / 'b.png', [('run', holes)])
  # the empty run adds nothing: not even a legend entry
  assert _bytes(with_empty) == _bytes(without), (
      f'seed {seed}')


def test_histogram_panels_are_spread_from_first_to_last():
  records = [{'step': s, 'epoch': s / 10} for s in range(23, 0, -1)]
  chosen = figures._panels(records, 4)  # noqa: SLF001 (the choice itself)
  assert [r['step'] for r in chosen] == [1, 8, 16, 23]
  assert figures._panels(records[:3], 6) == sorted(  # noqa: SLF001
      records[:3], key=lambda r: r['epoch'])
  with pytest.raises(ValueError, match='max_panels'):
    figures.cosine_histograms('unused.png', 'a', records, max_panels=0)


def test_roc_drops_zero_far_and_thins_long_curves():
  far = np.r_[0.0, 0.0, np.linspace(1e-6, 1, 100_000)]
  tar = np.r_[0.0, 0.1, np.linspace(0.2, 1, 100_000)]
  got_far, got_tar = figures._roc_points(far, tar)  # noqa: SLF001
  assert got_far.min() > 0 and len(got_far) <= figures._ROC_POINTS + 1  # noqa: SLF001
  assert got_far[-1] == 1.0 and got_tar[-1] == 1.0
  assert np.all(np.diff(got_far) > 0)


def test_require_names_the_extra(monkeypatch):
  for name in [m for m in sys.modules if m.split('.')[0] == 'matplotlib']:
    monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  with pytest.raises(figures.MissingExtra,
                     match=r'pip install "npcface_jax\[report\]"'):
    figures.require()
  with pytest.raises(ImportError):  # MissingExtra is an ImportError
    figures.roc('unused.png', 'LFW', [])
