"""The report's head diagnostics from run folders (no training): each
head's own logged quantities in a figure of their own, labelled in words
(a raw key where the label table has none, an ElasticFace-style 'x_std' as
x's band), the feature norm distribution from the hard-sample records and
the mean norm in the hard-samples table; runs whose records predate the
norms, or that logged nothing, still give a report that says so."""

import json
import math
import pathlib
import re

import numpy as np
import pytest

from npcface_jax.common import jsonfile
from npcface_jax.study import comparison
from npcface_jax.training import hard_samples
from tests.helpers import fresh_rng
from tests.test_sweep import _check_pngs, fake_run


def _diagnostics(workdir: pathlib.Path, values: dict) -> None:
  """Adds the head's quantities to every record of the run's curve: key ->
  value per record (a list) or one value for all."""
  file = pathlib.Path(hard_samples.path(str(workdir), hard_samples.METRICS))
  records = [json.loads(line) for line in file.read_text().splitlines()]
  for n, record in enumerate(records):
    record.update({k: v[n] if isinstance(v, list) else v
                   for k, v in values.items()})
  file.write_text(''.join(json.dumps(r) + '\n' for r in records))


def _with_norms(workdir: pathlib.Path, rng, scale: float) -> list[float]:
  """Rewrites the run's hard-sample records with embedding norms; the last
  record's norms."""
  file = pathlib.Path(hard_samples.path(str(workdir)))
  file.unlink()
  for step in (32, 64):
    window = hard_samples.Window(step - 31)
    c_y = np.tanh(rng.normal(0.5, 0.3, 500))
    near = np.clip(rng.normal(0.3, 0.2, 500), -1, 1)
    norms = np.exp(rng.normal(np.log(scale), 0.3, 500))
    window.add(c_y, near, near > np.cos(np.arccos(c_y) + 0.4), norm=norms)
    jsonfile.append_line(str(file), window.record(step, step / 32, 0.4))
  return norms


def _row(text: str, label: str) -> list[str]:
  """The cells of the hard-samples table's row of ``label``."""
  row = next(line for line in text.split('The last record of each run')[1]
             .splitlines() if line.startswith(f'| {label} |'))
  return [c.strip() for c in row.strip('|').split('|')]


def test_report_shows_each_heads_diagnostics_and_the_norms(tmp_path):
  from npcface_jax import report  # noqa: PLC0415 (matplotlib)
  rng, seed = fresh_rng()
  ada = fake_run(tmp_path / 'ada', rng, 'adaface')
  _diagnostics(ada, {'adaface/norm': [11.0, 12.5], 'adaface/quality': -0.02,
                     'head/norm_mean': [19.0, 17.5], 'head/norm_std': 80.0,
                     'magface/margin': 0.5})  # another head's: not its own
  norms = _with_norms(ada, rng, 15.0)
  elastic = fake_run(tmp_path / 'elastic', rng, 'elasticface_arc')
  _diagnostics(elastic, {'elasticface_arc/margin': [0.5, math.nan],
                         'elasticface_arc/margin_std': 0.05,
                         'elasticface_arc/new_thing': [1.0, 2.0]})
  _with_norms(elastic, rng, 40.0)
  arc = fake_run(tmp_path / 'arc', rng, 'arcface')  # no norms, no diagnostics
  runs = [comparison.load_run(str(w)) for w in (ada, elastic, arc)]
  assert comparison.diagnostic_keys(runs[0]) == [
      'adaface/norm', 'adaface/quality', 'head/norm_mean', 'head/norm_std']
  keys = comparison.diagnostic_keys(runs[1])
  assert comparison.diagnostic_panels(keys) == [
      ('elasticface_arc/margin', 'elasticface_arc/margin_std'),
      ('elasticface_arc/new_thing', None)]
  assert comparison.diagnostic_label('head/norm_mean') == (
      'AdaFace: running mean of the feature norm')
  assert comparison.diagnostic_label('elasticface_arc/new_thing') == (
      'elasticface_arc/new_thing')  # no label: the raw key
  assert comparison.diagnostic_keys(runs[2]) == []

  out = tmp_path / 'out'
  text = pathlib.Path(report.write_report(
      [str(ada), str(elastic), str(arc)], str(out))).read_text()
  section = text.split('## Head diagnostics')[1].split('## Hard samples')[0]
  shown = _check_pngs(out, text)
  assert {'fig11_head_0_adaface.png', 'fig11_head_1_elasticface_arc.png',
          'fig12_norms.png'} <= set(shown), f'seed {seed}'
  assert not any(re.match(r'fig11_head_2', name) for name in shown)
  assert 'The head of arcface logs no diagnostics' in section
  assert '### Feature norm distribution' in section
  assert _row(text, 'adaface')[-1] == f'{norms.mean():.3f}'
  assert _row(text, 'arcface')[-1] == '-'
  # data-driven: the words around the figures name no head
  words = (section.strip().split('\n\n')[0]
           + section.split('### Feature norm distribution')[1].split('![')[0])
  assert not re.search('face|softmax', words, re.I), words


def test_runs_without_norms_or_a_curve_still_report(tmp_path):
  """Records written before norms were recorded, and a run that logged
  nothing (failed before its first log), still give a report that says
  what it lacks."""
  from npcface_jax import report  # noqa: PLC0415 (matplotlib)
  rng, seed = fresh_rng()
  old = fake_run(tmp_path / 'old', rng, 'magface')
  failed = fake_run(tmp_path / 'failed', rng, 'adaface')
  pathlib.Path(hard_samples.path(str(failed), hard_samples.METRICS)).unlink()
  pathlib.Path(hard_samples.path(str(failed))).unlink()
  out = tmp_path / 'out'
  text = pathlib.Path(report.write_report([str(old), str(failed)],
                                          str(out))).read_text()
  assert 'No run recorded the embeddings\' norms' in text, f'seed {seed}'
  assert 'No training curve: adaface' in text
  assert 'The head of magface logs no diagnostics' in text
  assert _row(text, 'magface')[-1] == '-'
  assert 'fig12_norms.png' not in _check_pngs(out, text)


@pytest.mark.slow
def test_every_heads_diagnostics_have_words():
  """What each registered head logs of itself (its summarize and scalar
  state, on a small batch) has a label in the table, so that no report
  shows a raw key for a head of this repository."""
  import jax  # noqa: PLC0415 (only here)
  from npcface_jax.loss import classifier, registry  # noqa: PLC0415
  x = jax.random.normal(jax.random.key(0), (8, 16))
  w = jax.random.normal(jax.random.key(1), (10, 16))
  missing = []
  for name in registry.head_names():
    head = registry.get_head(name)
    _, out = classifier.classifier_loss(
        x, w, np.arange(8), head, head.init_state(10),
        head.init_params(jax.random.key(2), 10), num_classes=10,
        head_key=jax.random.key(3))
    missing += [f'{name}: {k}' for k in head.diagnostics(out)
                if k not in comparison.DIAGNOSTIC_LABELS]
  assert not missing, missing
