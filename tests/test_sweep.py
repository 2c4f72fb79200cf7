"""Sweeps and reports: the grid and variants become runs with names and
typed values (errors name the flag to fix); runs are labelled by what
differs; two short runs become a report whose table is their
results.json; a 2x2 sweep killed in its second run resumes and reports."""

import csv
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from npcface_jax import sweep
from npcface_jax.study import comparison
from tests import tiny_backbone
from tests.helpers import fresh_rng

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG = b'\x89PNG\r\n\x1a\n'


def test_grid_and_variants_make_typed_named_runs():
  base = demo.get_config()
  runs = sweep.runs_of(base, ['head_options.npcface.alpha=0, 0.1',
                              'embedding_dim=64,128'],
                       ['head_options.npcface.m1=0',
                        'head_options.npcface.t=1,head_options.npcface.m0'
                        '=0.5'])
  assert len(runs) == 8
  assert runs[0] == {'head_options.npcface.m1': 0.0,
                     'head_options.npcface.alpha': 0.0, 'embedding_dim': 64}
  assert all(type(r['embedding_dim']) is int for r in runs)
  names = [sweep.run_name(r) for r in runs]
  assert names[0] == 'm1=0,alpha=0,embedding_dim=64'
  assert names[-1] == 't=1,m0=0.5,alpha=0.1,embedding_dim=128'
  assert sweep.run_name({}) == 'base'
  config = sweep.configured(base, runs[-1])
  assert (config.head_options.npcface.t, config.embedding_dim) == (1.0, 128)
  assert base.head_options.npcface.t is None  # the base is left alone
  bools = sweep.runs_of(base, ['flip=false,True'], [])
  assert [r['flip'] for r in bools] == [False, True]
  assert sweep.runs_of(base, ['head=arcface,npcface'], [''])[1] == {
      'head': 'npcface'}


@pytest.mark.parametrize('grid, variant, message', [
    (['head_options.npcface.alph=0,1'], [], "no field 'head_options"),
    (['embedding_dim=64,1.5'], [], "embedding_dim='1.5': not an integer"),
    (['lr_boundaries=1,2'], [], 'lr_boundaries is a tuple'),
    (['batch_size'], [], 'write FIELD=VALUE'),
    (['batch_size='], [], 'has no values'),
    (['batch_size=8', 'batch_size=16'], [], 'two --grid flags'),
    (['batch_size=8,8'], [], 'the same values'),
    ([], ['flip=maybe'], "flip='maybe': not true or false"),
    (['flip=true,false'], ['flip=true'], 'flip set by a --variant and a'),
])
def test_bad_grids_name_the_fix(grid, variant, message):
  with pytest.raises(sweep.SweepError, match=message.replace('(', r'\(')):
    sweep.runs_of(demo.get_config(), grid, variant)


def _run(name, **setup):
  return comparison.Run(f'/runs/{name}', name, setup, [], [], None, [])


def test_labels_name_what_differs():
  runs = [_run('a', head='arcface', model='vgg19', **{'arcface.margin': 0.5}),
          _run('b', head='npcface', model='vgg19',
               **{'npcface.alpha': 0.1, 'npcface.t': 1.1}),
          _run('c', head='npcface', model='vgg19',
               **{'npcface.alpha': 0.2, 'npcface.t': 1.1}),
          _run('d', head='npcface', model='vgg19',
               **{'npcface.alpha': 0.2, 'npcface.t': 1.1})]
  assert comparison.labels(runs) == [
      'arcface', 'npcface, alpha=0.1', 'npcface, alpha=0.2 (c)',
      'npcface, alpha=0.2 (d)']
  same = [_run('x', batch_size=8), _run('y', batch_size=8)]
  assert comparison.labels(same) == ['x', 'y']
  nested = [_run('p', **{'a.t': 1, 'b.t': 1}), _run('q', **{'a.t': 2,
                                                            'b.t': 3})]
  assert comparison.labels(nested) == ['a.t=1, b.t=1', 'a.t=2, b.t=3']


# --- Reports from run folders -------------------------------------------------

def fake_run(workdir: pathlib.Path, rng, head='npcface', **fields):
  """A run folder as training and evaluate leave it (run.json, analysis/,
  eval/results.json), its numbers drawn at random: no training."""
  from npcface_jax.common import jsonfile  # noqa: PLC0415
  from npcface_jax.evaluation import protocols  # noqa: PLC0415
  from npcface_jax.training import hard_samples  # noqa: PLC0415
  config = sweep.configured(demo.get_config(), {'head': head, **fields})
  (workdir / 'eval').mkdir(parents=True)
  jsonfile.write_object(workdir / 'run.json', {
      'config': json.loads(config.to_json_best_effort()),
      'head_options': {}, 'image_size': 48, 'num_classes': 100})
  for step in (32, 64):
    window = hard_samples.Window(step - 31)
    c_y = np.tanh(rng.normal(0.5, 0.3, 500))
    near = np.clip(rng.normal(0.3, 0.2, 500), -1, 1)
    window.add(c_y, near, near > np.cos(np.arccos(c_y) + 0.4))
    jsonfile.append_line(hard_samples.path(str(workdir)),
                         window.record(step, step / 32, 0.4))
    metrics = hard_samples.path(str(workdir), hard_samples.METRICS)
    jsonfile.append_line(metrics, {
        'step': step, 'epoch': step / 32, 'loss': float(rng.uniform(1, 9)),
        'accuracy': float(rng.uniform())})
  same = rng.random(400) < 0.5
  scores = rng.normal(0, 0.3, 400) + same
  result = protocols.verification_report(scores, same)
  result['roc_curve'] = protocols.roc_points(scores, same)
  jsonfile.write_object(workdir / 'eval' / 'results.json',
                        {'step': 64, 'targets': {'lfw': result}})
  return workdir


def test_report_leaves_out_damaged_records_and_says_so(tmp_path):
  """A torn line, a record of the wrong shape and a bad ROC cost only
  themselves: the report is written, and its "Left out" says what."""
  from npcface_jax import report  # noqa: PLC0415 (matplotlib)
  rng, seed = fresh_rng()
  a = fake_run(tmp_path / 'a', rng, 'npcface')
  b = fake_run(tmp_path / 'b', rng, 'arcface')
  with open(a / 'analysis' / 'stats.jsonl', 'a') as f:
    f.write('{"step": 96, "epoch": 3, "margin": 0.4, "hist": "no"}\n'
            '{"step": 1')
  with open(b / 'analysis' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 96, "loss": "nan?"}\n')
  results = json.loads((b / 'eval' / 'results.json').read_text())
  results['targets']['lfw']['roc_curve']['tar'][0] = 'x'
  # a row without its FAR (found by fuzzing: it was a KeyError)
  results['targets']['lfw']['tar_at_far'].append({'tar': 0.5})
  (b / 'eval' / 'results.json').write_text(json.dumps(results))
  stale = tmp_path / 'out' / 'fig5_cosines_7_gone.png'
  stale.parent.mkdir()
  stale.write_bytes(PNG)
  path = report.write_report([str(a), str(b)], str(tmp_path / 'out'))
  text = pathlib.Path(path).read_text()
  assert not stale.exists()  # an earlier report's figure
  left = text.split('## Left out')[1]
  assert 'the record of step 96 left out: "hist"' in left, f'seed {seed}'
  assert 'line 4: not a JSON object' in left
  assert 'the record of step 96 left out: "epoch", "loss"' in left
  assert "the ROC of 'lfw' is not lists" in left
  assert 'No evaluation set with a stored ROC' in text
  _check_pngs(tmp_path / 'out', text)
  rows = list(csv.DictReader((tmp_path / 'out' / 'table.csv').open()))
  assert [r['label'] for r in rows] == ['npcface', 'arcface']
  assert float(rows[1]['lfw accuracy']) == results['targets']['lfw'][
      'accuracy']


# --- Two runs reported; a sweep killed and resumed ---------------------------

# The demo config, shortened: 8 steps of the small backbone, a record of the
# hard-sample statistics every 4, 200 held-out pairs.
SHORT = {'num_train_steps': 8, 'log_every_steps': 2, 'analysis_every_steps': 4,
         'checkpoint_every_steps': 4, 'eval_at_start': False,
         'synthetic.heldout_pairs': 200}


def _short_config(**overrides):
  config = demo.get_config()
  for field, value in {**SHORT, **overrides}.items():
    config = sweep.configured(config, {field: value})
  return config


def _command(module, *args, env=None):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, **(env or {})))


def _check_pngs(report_dir: pathlib.Path, text: str) -> list[str]:
  """Every picture report.md shows: a PNG of plausible size."""
  shown = [line.split('](')[1].rstrip(')') for line in text.splitlines()
           if line.startswith('![')]
  for name in shown:
    data = (report_dir / name).read_bytes()
    assert data.startswith(PNG) and 5_000 < len(data) < 300_000, name
  return shown


@pytest.mark.slow
def test_two_runs_reported(tmp_path, monkeypatch):
  """Two heads (and embedding sizes) trained briefly, evaluated, reported
  by the command line: every figure, a table equal to their results.json,
  labels naming what differs."""
  from npcface_jax import evaluate  # noqa: PLC0415
  from npcface_jax import models  # noqa: PLC0415
  from npcface_jax.training import loop  # noqa: PLC0415 (TF)
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  runs = {'npc': {'head': 'npcface', 'embedding_dim': 64},
          'arc': {'head': 'arcface', 'embedding_dim': 32}}
  for name, fields in runs.items():
    loop.train_and_evaluate(_short_config(**fields), str(tmp_path / name))
    evaluate.evaluate_run(str(tmp_path / name), run_sets=True)
  out = tmp_path / 'report'
  done = _command('npcface_jax.report', str(tmp_path / 'npc'),
                  str(tmp_path / 'arc'), f'--out={out}')
  assert done.returncode == 0, done.stderr[-3000:]
  text = (out / 'report.md').read_text()
  shown = _check_pngs(out, text)
  assert {'fig8_training.png', 'fig3_correlation.png', 'fig6_overlap.png',
          'fig7_nearest.png', 'fig10_roc_synthetic_heldout.png'} <= set(shown)
  assert sum(name.startswith('fig5_') for name in shown) == 2
  rows = list(csv.DictReader((out / 'table.csv').open()))
  assert [r['label'] for r in rows] == ['npcface, embedding_dim=64',
                                        'arcface, embedding_dim=32']
  for row, name in zip(rows, runs):
    record = json.loads((tmp_path / name / 'eval' / 'results.json')
                        .read_text())
    result = record['targets']['synthetic_heldout']
    assert float(row['synthetic_heldout accuracy']) == result['accuracy']
    for tar in result['tar_at_far']:
      assert float(row[f"synthetic_heldout TAR@FAR={tar['far']:g}"]) == (
          tar['tar'])
    assert int(row['step']) == record['step'] == 8
  assert '**' in text and '| npc | npcface, embedding_dim=64 |' in text
  from npcface_jax import report  # noqa: PLC0415 (matplotlib)
  with pytest.raises(FileNotFoundError, match='run.json'):
    report.write_report([str(tmp_path)], str(out))  # not a run's folder


@pytest.mark.slow(minutes=2)
def test_sweep_killed_midway_resumes_and_reports(tmp_path):
  """A 2x2 grid through the command line (small backbone), killed with
  SIGKILL in its second run: the rerun skips the first, resumes the second
  from its checkpoint, trains the rest and reports all four."""
  args = ['sweep', '--config=configs/demo.py', f'--workdir={tmp_path}',
          '--grid=head_options.npcface.alpha=0,0.25',
          '--grid=head_options.npcface.t=1.0,1.1',
          *(f'--config.{k}={v}' for k, v in {
              **SHORT, 'num_train_steps': 24, 'log_every_steps': 1}.items())]
  proc = subprocess.Popen([sys.executable, '-m', 'tests.tiny_backbone', *args],
                          cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, second = [], False
  for line in proc.stdout:
    lines.append(line)
    second = second or 'run 2/4' in line
    if second and 'step 14/24' in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.communicate(timeout=600)
  log = ''.join(lines)
  assert proc.returncode == -signal.SIGKILL, log[-3000:]
  done = json.loads((tmp_path / 'sweep.json').read_text())['done']
  assert list(done) == ['alpha=0,t=1'], log[-3000:]

  again = _command('tests.tiny_backbone', *args)
  log = again.stdout + again.stderr
  assert again.returncode == 0, log[-3000:]
  assert 'run 1/4 alpha=0,t=1: trained and evaluated, skipped' in log
  resumed = re.search(r'resumed from the checkpoint of step (\d+)', log)
  assert resumed and int(resumed.group(1)) in (8, 12), log[-3000:]
  assert log.count('resumed from the checkpoint') == 1
  done = json.loads((tmp_path / 'sweep.json').read_text())['done']
  assert list(done) == ['alpha=0,t=1', 'alpha=0,t=1.1', 'alpha=0.25,t=1',
                        'alpha=0.25,t=1.1']
  assert done['alpha=0.25,t=1.1'] == {'head_options.npcface.alpha': 0.25,
                                      'head_options.npcface.t': 1.1}
  rows = list(csv.DictReader((tmp_path / 'report' / 'table.csv').open()))
  assert [r['label'] for r in rows] == ['alpha=0, t=1', 'alpha=0, t=1.1',
                                        'alpha=0.25, t=1', 'alpha=0.25, t=1.1']
  _check_pngs(tmp_path / 'report', (tmp_path / 'report' / 'report.md')
              .read_text())
  changed = _command('tests.tiny_backbone', *args, '--config.batch_size=32')
  assert changed.returncode != 0
  assert 'other fixed fields (batch_size)' in changed.stderr


def test_a_run_the_checks_refuse_fails_before_any_trains(tmp_path):
  config = _short_config()
  with pytest.raises(sweep.SweepError) as e:
    sweep.sweep(config, str(tmp_path), ['head_options.npcface.t=1.1,0.9'],
                ['', 'batch_size=7'])
  message = str(e.value)
  assert 'run t=0.9: ' in message and 'must be >= 1' in message
  assert 'run batch_size=7,t=1.1: ' in message and 'batch_size' in message
  assert 'run t=1.1:' not in message
  assert not any(tmp_path.iterdir())  # nothing written, nothing trained
