"""``python -m npcface_jax.sweep --config=FILE --grid='FIELD=V1,V2,...'
[--grid=...] [--variant='FIELD=V,FIELD=V'] --workdir=DIR``: a grid of
training runs, one after another, each evaluated, then compared in one
report (report.py).

The runs are the product of the variants (each a set of fields changed
together, e.g. Table I's "positive part only": t=1 and alpha=0) and every
grid's values; ``--config.FIELD=...`` fixes a field for all of them. Each
run trains in DIR/runs/NAME, NAME made of the values it changes
('alpha=0.1,t=1.1'). Resumable at any point: a run already trained and
evaluated is skipped, a half-trained one resumes from its checkpoint
(loop.py), and DIR/sweep.json records which are done; every run's config
is checked (config_checks.py) before the first trains; a rerun with other
fixed fields is refused, since its runs would not be the same. Runs are
evaluated with ``evaluate --run_sets`` (the sets the config verifies on:
its .bin targets, synthetic held-out identities) plus ``--targets``. The
report goes to DIR/report. One process (a GPU host); the runs use all of
its devices.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import re
import sys

from npcface_jax.common import jsonfile
from npcface_jax.study import comparison

SWEEP = 'sweep.json'
_KINDS = {bool: 'true or false', int: 'an integer', float: 'a number',
          str: 'text'}


class SweepError(ValueError):
  """A grid, variant or workdir that cannot run, with what to change."""


def _node(config, field: str):
  """(the ConfigDict holding field, its last name); SweepError if the
  config has no such field."""
  *path, leaf = field.split('.')
  node = config
  for part in path:
    node = node.get(part) if hasattr(node, 'get') else None
  if node is None or not hasattr(node, 'get_ref') or leaf not in node:
    raise SweepError(f'the config has no field {field!r}: name one as '
                     '--config.<field> would (e.g. head_options.npcface.alpha)')
  return node, leaf


def parse_value(config, field: str, text: str):
  """text as the field's type (bool, int, float or str)."""
  node, leaf = _node(config, field)
  kind = node.get_ref(leaf).get_type()
  try:
    if kind is bool:
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError
      return text.lower() in ('true', '1')
    if kind in (int, float, str):
      return kind(text)
  except ValueError:
    raise SweepError(f'{field}={text!r}: not {_KINDS[kind]}') from None
  raise SweepError(f'{field} is a {kind.__name__}: a sweep sets bool, int, '
                   'float and str fields; fix it with --config.' + field)


def _assignment(config, text: str) -> tuple[str, str]:
  if '=' not in text:
    raise SweepError(f'{text!r}: write FIELD=VALUE')
  field, value = (part.strip() for part in text.split('=', 1))
  _node(config, field)
  return field, value


def runs_of(config, grids: list[str], variants: list[str]
            ) -> list[dict[str, object]]:
  """The sweep's runs, each the fields it sets (field -> value), in order:
  variants outermost, then the grids in the order given."""
  axes = []
  for grid in grids:
    field, values = _assignment(config, grid)
    items = [v.strip() for v in values.split(',') if v.strip()]
    if not items:
      raise SweepError(f'--grid={grid!r} has no values: FIELD=V1,V2,...')
    axes.append([{field: parse_value(config, field, v)} for v in items])
  fields = [next(iter(axis[0])) for axis in axes]
  if len(set(fields)) < len(fields):
    raise SweepError(f'a field has two --grid flags: {fields}')
  chosen = [{f: parse_value(config, f, v) for f, v in (
      _assignment(config, part) for part in _parts(variant))}
            for variant in variants] or [{}]
  both = sorted(set(fields) & {f for c in chosen for f in c})
  if both:
    raise SweepError(f'{", ".join(both)} set by a --variant and a --grid: '
                     'give each field in one of them')
  runs = [dict(itertools.chain.from_iterable(d.items() for d in combo))
          for combo in itertools.product(chosen, *axes)]
  names = [run_name(r) for r in runs]
  if len(set(names)) < len(names):
    raise SweepError('two runs set the same values; drop the repeated '
                     'variant or grid value')
  return runs


def _parts(variant: str) -> list[str]:
  """A variant's assignments, split at the commas that start one."""
  return [p for p in re.split(r',(?=[^,=]+=)', variant) if p.strip()]


def run_name(fields: dict) -> str:
  """A run's folder name from what it sets: the last part of each field
  (the whole field where two would share it), 'base' for none."""
  if not fields:
    return 'base'
  last = [f.split('.')[-1] for f in fields]
  parts = []
  for (field, value), short in zip(fields.items(), last):
    key = short if last.count(short) == 1 else field
    shown = f'{value:g}' if isinstance(value, float) else str(value)
    parts.append(f'{key}={shown}')
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', ','.join(parts))


def configured(base, fields: dict):
  """A copy of the base config with the run's fields set."""
  config = copy.deepcopy(base)
  for field, value in fields.items():
    node, leaf = _node(config, field)
    node[leaf] = value
  return config


def _check_all(base, runs: list[dict]) -> None:
  """Every run's config through config_checks before the first trains, so
  that a value run 7 cannot use fails now, not hours from now."""
  import jax  # noqa: PLC0415 (the device count the runs will have)
  from npcface_jax.training import config_checks  # noqa: PLC0415 (with the training)
  problems = []
  for fields in runs:
    try:
      config_checks.check(configured(base, fields),
                          num_devices=jax.device_count(),
                          process_count=jax.process_count())
    except config_checks.ConfigError as e:
      problems.append(f'run {run_name(fields)}: {e}')
  if problems:
    raise SweepError('\n'.join(problems))


def _record(workdir: str, base) -> dict:
  """sweep.json, checked against this invocation: the same fixed fields
  (the base config), else SweepError naming them."""
  path = os.path.join(workdir, SWEEP)
  fixed = json.loads(base.to_json_best_effort())
  if not os.path.exists(path):
    return {'base': fixed, 'done': {}}
  record = jsonfile.read_object(path)
  if record.get('base') != fixed:
    old = comparison.flat(record.get('base') or {})
    new = comparison.flat(fixed)
    changed = ', '.join(sorted(k for k in set(old) | set(new)
                               if old.get(k) != new.get(k)))
    raise SweepError(
        f'{workdir} holds a sweep with other fixed fields ({changed:.300}): '
        "its runs would not be this sweep's. Use another --workdir, or the "
        'same --config and --config.* flags as before')
  record.setdefault('done', {})
  return record


def sweep(base, workdir: str, grids: list[str], variants: list[str], *,
          targets=(), title: str | None = None) -> str:
  """Trains, evaluates and reports every run of the grid; returns the
  report's path. Each finished run is recorded in DIR/sweep.json before
  the next starts."""
  # TF, clu, matplotlib: imported here, not to parse the grid.
  from npcface_jax import evaluate, report  # noqa: PLC0415
  from npcface_jax.study import figures  # noqa: PLC0415
  from npcface_jax.training import loop  # noqa: PLC0415
  figures.require()  # a missing extra fails before hours of training
  runs = runs_of(base, grids, variants)
  _check_all(base, runs)
  os.makedirs(workdir, exist_ok=True)
  record = _record(workdir, base)
  folders = []
  for k, fields in enumerate(runs):
    name = run_name(fields)
    folder = os.path.join(workdir, 'runs', name)
    folders.append(folder)
    if name in record['done'] and os.path.exists(
        os.path.join(folder, 'eval', 'results.json')):
      logging.info('run %d/%d %s: trained and evaluated, skipped', k + 1,
                   len(runs), name)
      continue
    logging.info('run %d/%d %s: %s', k + 1, len(runs), name, fields)
    outcome = loop.train_and_evaluate(configured(base, fields), folder)
    if outcome.preempted:
      raise SystemExit(f'preempted during run {name}; rerun the same '
                       'command to resume')
    evaluate.evaluate_run(folder, targets=list(targets), run_sets=True)
    record['done'][name] = fields
    jsonfile.write_object(os.path.join(workdir, SWEEP), record)
  return report.write_report(folders, os.path.join(workdir, 'report'), title)


def main(argv) -> None:
  from absl import app, flags  # noqa: PLC0415 (the command line only)
  # TF: imported here, after the flags are parsed.
  from npcface_jax.common import (  # noqa: PLC0415
      checkpoint, run_log, xla_flags)
  from npcface_jax.study import figures  # noqa: PLC0415
  from npcface_jax.training import config_checks, loop  # noqa: PLC0415
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  xla_flags.use_in_order_cpu_schedule()  # before JAX starts its backend
  f = flags.FLAGS
  run_log.quiet_third_party(f.verbose)
  try:
    path = sweep(f.config, f.workdir, f.grid or [], f.variant or [],
                 targets=[t for t in (f.targets or '').split(',') if t],
                 title=f.title)
  except (SweepError, config_checks.ConfigError, FileNotFoundError,
          figures.MissingExtra) as e:
    raise app.UsageError(str(e)) from None
  except (loop.NonFiniteLoss, checkpoint.CheckpointWriteError) as e:
    sys.exit(f'error: {e}')  # the runs before it are kept; a rerun resumes
  print('report:', path)


def _define_flags() -> None:
  from absl import flags  # noqa: PLC0415 (the command line only)
  from npcface_jax.training import run_flags  # noqa: PLC0415
  run_flags.define('The sweep: DIR/runs/<name> per run, DIR/sweep.json, '
                   'DIR/report; rerun with the same DIR to resume.')
  flags.DEFINE_multi_string('grid', None, "FIELD=V1,V2,...: the field's "
                            'values to train with; several --grid flags '
                            'make a product.')
  flags.DEFINE_multi_string('variant', None, 'FIELD=V[,FIELD=V...]: fields '
                            'set together for one run; the variants are '
                            'crossed with the grids.')
  flags.DEFINE_string('targets', '', 'Comma-separated .bin pair sets to '
                      'evaluate every run on, beside its own sets.')
  flags.DEFINE_string('title', None, "The report's title.")


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
