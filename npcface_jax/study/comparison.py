"""Several training runs side by side, as the paper's Tables I-IV set them:
each run read from its workdir (run.json, analysis/*.jsonl,
eval/results.json), labelled by what its config does differently from the
others' (head, options, backbone, ...), and one table of what each
measured, one column per evaluation set and measure, the best per column
marked. Plain data and text: figures.py draws, report.py writes."""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, NamedTuple

from npcface_jax.common import jsonfile
from npcface_jax.serving import run_dir
from npcface_jax.training import hard_samples

# Config fields that say how a run was logged or checked, not what it
# trained: never a difference worth a label.
_BOOKKEEPING = frozenset({
    'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'eval_every_steps', 'eval_at_start', 'eval_batch_size', 'eval_flip',
    'verification_targets', 'analysis_every_steps', 'analysis_margin',
    'strict_records'})
_FIRST = ('head', 'model')  # label parts shown as the bare value, first

# What a head logs (Head.summarize as '<head>/<name>', its scalar state as
# 'head/<key>'), in words, keyed by metric name: the one place the report
# names a head. The report shows a head's quantities in this order; a key
# not here is shown as it is, after these.
DIAGNOSTIC_LABELS = {
    'npcface/margin': 'NPCFace: mean cooperative margin m_i',
    'npcface/hard_share': 'NPCFace: share of samples with a hard negative',
    'npcface/hard_count': 'NPCFace: hard negatives per sample',
    'adaface/norm': 'AdaFace: mean feature norm of the batch',
    'adaface/quality': 'AdaFace: mean margin scaler z (quality)',
    'head/norm_mean': 'AdaFace: running mean of the feature norm',
    'head/norm_std': 'AdaFace: running std of the feature norm',
    'magface/margin': 'MagFace: margin m(a), batch mean',
    'magface/norm': 'MagFace: feature norm a (clipped), batch mean',
    'elasticface_arc/margin': 'ElasticFace-Arc: mean drawn margin',
    'elasticface_arc/margin_std': 'ElasticFace-Arc: std of the drawn margins',
    'elasticface_cos/margin': 'ElasticFace-Cos: mean drawn margin',
    'elasticface_cos/margin_std': 'ElasticFace-Cos: std of the drawn margins',
    'elasticface_arc_plus/margin': 'ElasticFace-Arc+: mean drawn margin',
    'elasticface_arc_plus/margin_std':
        'ElasticFace-Arc+: std of the drawn margins',
    'elasticface_cos_plus/margin': 'ElasticFace-Cos+: mean drawn margin',
    'elasticface_cos_plus/margin_std':
        'ElasticFace-Cos+: std of the drawn margins',
    'sphereface2/bias': 'SphereFace2: learnt bias b',
    'uniface/bias': 'UniFace: learnt bias b',
    'head/scale': 'AdaCos: adaptive scale s',
    'head/t': 'CurricularFace: running mean t of the target cosine',
    'head/step': 'SphereFace: steps of the lambda annealing',
}
_STD = '_std'  # 'x_std' beside 'x': drawn as a band around x


class Run(NamedTuple):
  workdir: str
  name: str  # the workdir's folder name
  setup: dict[str, Any]  # describe(): what the run trained, flat
  metrics: list[dict]  # analysis/metrics.jsonl, the training curve
  stats: list[dict]  # analysis/stats.jsonl, the hard-sample records
  results: dict | None  # eval/results.json, None if never evaluated
  notes: list[str]  # what could not be read, in words


def flat(value, prefix: str = '') -> dict[str, Any]:
  """A nested dict as 'a.b.c' -> value (lists as tuples)."""
  if not isinstance(value, dict):
    return {prefix: tuple(value) if isinstance(value, list) else value}
  out = {}
  for key, item in value.items():
    out.update(flat(item, f'{prefix}.{key}' if prefix else key))
  return out


def _dict(value) -> dict:
  return value if isinstance(value, dict) else {}


def describe(info: dict) -> dict[str, Any]:
  """run.json as flat 'field' -> value: the config without bookkeeping,
  and of the head's and the criterion's options only the chosen one's
  (the head's as trained, its preset filled in), as 'npcface.alpha'."""
  config = dict(info['config'])
  head, criterion = str(config.get('head')), str(config.get('criterion'))
  head_options = _dict(info.get('head_options')) or _dict(
      _dict(config.get('head_options')).get(head))
  criterion_options = _dict(_dict(config.get('criterion_options')).get(
      criterion))
  config.pop('head_options', None)
  config.pop('criterion_options', None)
  setup = {k: v for k, v in flat(config).items()
           if k.split('.')[0] not in _BOOKKEEPING}
  setup.update(flat(head_options, head))
  setup.update(flat(criterion_options, f'criterion.{criterion}'))
  return setup


def load_run(workdir: str) -> Run:
  """A run's records; FileNotFoundError or ValueError (naming the file)
  when workdir is not a run, notes for what is missing or damaged."""
  run_dir.load_run(workdir)  # a clear error for a folder that is not a run
  info = jsonfile.read_object(os.path.join(workdir, run_dir.RUN_INFO))
  notes = []
  metrics, left = hard_samples.read_records(
      hard_samples.path(workdir, hard_samples.METRICS),
      hard_samples.check_metrics)
  stats, left_stats = hard_samples.read_records(hard_samples.path(workdir),
                                                hard_samples.check_stats)
  notes += left + left_stats
  results_path = os.path.join(workdir, 'eval', 'results.json')
  results = None
  if os.path.exists(results_path):
    try:
      results = jsonfile.read_object(results_path)
    except ValueError as e:
      notes.append(str(e))
  else:
    notes.append(f'{results_path} not found: never evaluated (python -m '
                 f'npcface_jax.evaluate --workdir={workdir} --run_sets)')
  name = os.path.basename(os.path.normpath(workdir))
  return Run(workdir, name, describe(info), metrics, stats, results, notes)


def _shown(value) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, tuple):
    return '(' + ', '.join(map(_shown, value)) + ')'
  return str(value)


def differences(runs: list[Run]) -> list[str]:
  """The fields whose values differ between runs: a head's (criterion's)
  options compared among the runs with that head (criterion) only."""
  differ = []
  for key in sorted({k for r in runs for k in r.setup}):
    having = [r for r in runs if key in r.setup]
    values = {repr(r.setup[key]) for r in having}
    if len(values) > 1 or (len(having) < len(runs)
                           and not _option_of_chosen(key, having)):
      differ.append(key)
  first = [k for k in _FIRST if k in differ]
  return first + [k for k in differ if k not in _FIRST]


def _option_of_chosen(key: str, having: list[Run]) -> bool:
  """Whether key is an option of the head or criterion these runs chose
  (present only where it is chosen, so absence elsewhere is no
  difference)."""
  owner = key.split('.')[0]
  if owner == 'criterion':
    name = key.split('.')[1]
    return all(r.setup.get('criterion') == name for r in having)
  return all(r.setup.get('head') == owner for r in having)


def _short_names(keys: list[str]) -> dict[str, str]:
  """Each key by its shortest dotted suffix that no other key shares."""
  out = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      short = '.'.join(parts[-n:])
      if not any(o == short or o.endswith('.' + short)
                 for o in keys if o != key):
        break
    out[key] = short
  return out


def labels(runs: list[Run]) -> list[str]:
  """One label per run naming what sets it apart ('npcface, alpha=0.1');
  the folder name where nothing does, or where two labels would match."""
  keys = differences(runs)
  short = _short_names(keys)
  out = []
  for run in runs:
    parts = [_shown(run.setup[k]) if k in _FIRST else
             f'{short[k]}={_shown(run.setup[k])}'
             for k in keys if k in run.setup]
    out.append(', '.join(parts) or run.name)
  repeated = {label for label in out if out.count(label) > 1}
  return [f'{label} ({run.name})' if label in repeated else label
          for label, run in zip(out, runs)]


def diagnostic_label(key: str) -> str:
  return DIAGNOSTIC_LABELS.get(key, key)


def diagnostic_keys(run: Run) -> list[str]:
  """The run's head's own quantities in its training curve: the keys
  under '<head>/' and 'head/' that hold a finite number in some record, in
  DIAGNOSTIC_LABELS' order, then the others sorted."""
  prefixes = (f"{run.setup.get('head')}/", 'head/')
  found = {k for r in run.metrics for k, v in r.items()
           if k.startswith(prefixes) and _finite(v)}
  order = list(DIAGNOSTIC_LABELS)
  return sorted(found, key=lambda k: (order.index(k) if k in order
                                      else len(order), k))


def diagnostic_panels(keys: list[str]) -> list[tuple[str, str | None]]:
  """(key, its std's key or None) per panel: a 'x_std' whose 'x' is
  logged too is x's band (mean +- std), not a panel of its own."""
  paired = {k for k in keys if k.endswith(_STD) and k[:-len(_STD)] in keys}
  return [(k, k + _STD if k + _STD in paired else None)
          for k in keys if k not in paired]


def roc_curves(run: Run) -> dict[str, tuple[list, list]]:
  """set -> (far, tar) of the ROC points results.json keeps (evaluate.py),
  where well formed; a malformed one is left out and noted."""
  found = {}
  for name, result in ((run.results or {}).get('targets') or {}).items():
    curve = result.get('roc_curve') if isinstance(result, dict) else None
    if curve is None:
      continue
    far, tar = (curve.get(k) if isinstance(curve, dict) else None
                for k in ('far', 'tar'))
    if (isinstance(far, list) and isinstance(tar, list)
        and 0 < len(far) == len(tar) <= 100_000
        and all(map(_finite, far + tar))):
      found[name] = (far, tar)
    else:
      run.notes.append(f'eval/results.json: the ROC of {name!r:.80} is not '
                       'lists of FAR and TAR; left out')
  return found


class Table(NamedTuple):
  columns: list[tuple[str, str]]  # (set, measure)
  rows: list[tuple[str, str, int | None, list[float | None]]]  # label, run,
  # evaluated step, values (fractions, as in results.json)


def _finite(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _measures(result: dict) -> dict[str, float]:
  """A set's numbers: accuracy, TAR at each FAR present, rank-1."""
  found = {}
  if _finite(result.get('accuracy')):
    found['accuracy'] = result['accuracy']
  rows = result.get('tar_at_far')
  for row in rows if isinstance(rows, list) else []:
    if isinstance(row, dict) and _finite(row.get('tar')) and _finite(
        row.get('far')):
      found[f"TAR@FAR={row['far']:g}"] = row['tar']
  if _finite(result.get('rank1')):
    found['rank-1'] = result['rank1']
  return found


def table(runs: list[Run]) -> Table:
  """Every run's evaluation results, one column per set and measure."""
  per_run = []
  for run in runs:
    targets = (run.results or {}).get('targets') or {}
    per_run.append({(name, measure): value
                    for name, result in targets.items()
                    if isinstance(result, dict)
                    for measure, value in _measures(result).items()})
  columns = sorted({c for found in per_run for c in found},
                   key=lambda c: (c[0], _measure_order(c[1])))
  rows = [(label, run.name, (run.results or {}).get('step'),
           [found.get(c) for c in columns])
          for label, run, found in zip(labels(runs), runs, per_run)]
  return Table(columns, rows)


def _measure_order(measure: str):
  if measure == 'accuracy':
    return (0, 0.0)
  if measure.startswith('TAR@FAR='):
    return (1, -float(measure.split('=')[1]))
  return (2, 0.0)


def best(values: list[float | None]) -> float | None:
  present = [v for v in values if v is not None]
  return max(present) if present else None


def cell(text) -> str:
  """Text for a Markdown table cell: no column bar, no line break."""
  return ' '.join(str(text).replace('|', '/').split())


def markdown(t: Table) -> str:
  """The table in Markdown, percentages to two decimals, the best value of
  each column in bold."""
  head = ['run', 'label', 'step'] + [cell(f'{s} {m} (%)')
                                     for s, m in t.columns]
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * 3 + '---:|' * len(t.columns)]
  tops = [best([row[3][i] for row in t.rows]) for i in range(len(t.columns))]
  for label, name, step, values in t.rows:
    cells = ['-' if v is None else (f'**{100 * v:.2f}**' if v == top else
                                    f'{100 * v:.2f}')
             for v, top in zip(values, tops)]
    lines.append('| ' + ' | '.join([cell(name), cell(label),
                                    '-' if step is None else str(step),
                                    *cells]) + ' |')
  return '\n'.join(lines) + '\n'


def csv_text(t: Table) -> str:
  """The same table as CSV, the values as results.json holds them
  (fractions, full precision), empty where a run lacks a column."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['run', 'label', 'step']
                  + [f'{s} {m}' for s, m in t.columns])
  for label, name, step, values in t.rows:
    writer.writerow([name, label, '' if step is None else step,
                     *('' if v is None else repr(float(v)) for v in values)])
  return out.getvalue()
