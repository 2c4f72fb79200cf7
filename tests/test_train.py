"""The trainer: config checks, the sharded step against one device, restore
onto other device counts, exact resume after SIGTERM, and ORL end to end."""

import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import casia_mobileface, default, demo, ms1m_attention56
from npcface_jax import models
from npcface_jax.common import arrays
from npcface_jax.common import checkpoint
from npcface_jax.loss import heads, registry
from npcface_jax.serving import run_dir
from npcface_jax.training import (config_checks, data_source, loop, setup,
                                  train_step)
from tests.conftest import NUM_DEVICES
from tests.helpers import fresh_rng
from tests import tiny_backbone
from tests.tiny_backbone import TinyNet

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A tiny run on synthetic identities: 61 classes (so the classifier pads
# over 2 or 4 'model' devices), 32x32 faces, an eighth-width MobileFaceNet.
TINY = {
    'dataset': 'synthetic', 'synthetic.num_classes': 61,
    'synthetic.image_size': 32, 'synthetic.epoch_examples': 64,
    'synthetic.heldout_identities': 0, 'model_options.width': 0.125,
    'embedding_dim': 32, 'batch_size': 16, 'num_train_steps': 6,
    'lr_boundaries': (3,), 'log_every_steps': 2, 'checkpoint_every_steps': 3,
    'eval_every_steps': 0, 'eval_at_start': False, 'eval_batch_size': 16,
    'head_options.npcface.scale': 32.0,
}


# A stateful head (its state must resume too) over a sharded classifier.
RESUMED = {'head': 'sphereface', 'model_parallel': 2}


def _config(base=None, **overrides):
  c = (base or default.get_config)()
  for key, value in {**TINY, **overrides}.items():
    *path, leaf = key.split('.')
    node = c
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def _flags(overrides) -> list[str]:
  """The same settings as command-line overrides of configs/demo.py."""
  out = []
  for key, value in overrides.items():
    if isinstance(value, tuple):
      value = '(' + ','.join(map(str, value)) + ',)'
    out.append(f'--config.{key}={value}')
  return out


def _classifier_rows(state, num_classes):
  return np.asarray(jax.device_get(state.params['classifier']))[:num_classes]


def _assert_same_params(a, b, num_classes, rtol=0.0, atol=0.0):
  np.testing.assert_allclose(_classifier_rows(a, num_classes),
                             _classifier_rows(b, num_classes), rtol=rtol,
                             atol=atol)
  for x, y in zip(jax.tree.leaves(jax.device_get(a.params['backbone'])),
                  jax.tree.leaves(jax.device_get(b.params['backbone']))):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
  for x, y in zip(jax.tree.leaves(jax.device_get(a.batch_stats)),
                  jax.tree.leaves(jax.device_get(b.batch_stats))):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# --- Configs -----------------------------------------------------------------

def test_shipped_configs_pass_the_checks(tmp_path):
  config_checks.check(demo.get_config(), num_devices=NUM_DEVICES)
  for module in (casia_mobileface, ms1m_attention56):
    for head in ('npcface', 'arcface', 'curricularface', 'adacos'):
      c = module.get_config(head)
      c.dataset = str(tmp_path)
      config_checks.check(c, num_devices=NUM_DEVICES)
      assert c.head == head
  c = casia_mobileface.get_config()
  assert (c.batch_size, c.num_epochs, tuple(c.lr_boundaries)) == (
      128, 30, (16, 24, 28))
  assert c.head_options.npcface.preset == 'paper'
  assert registry.get_head(c.head, **config_checks.head_options(c)).options == {
      'scale': 64.0, 'm0': 0.4, 'm1': 0.2, 't': 1.1, 'alpha': 0.25,
      'hard_margin': None, 'easy_margin': False}
  assert (c.momentum, c.weight_decay, c.learning_rate, c.flip) == (
      0.9, 5e-4, 0.1, True)
  c = ms1m_attention56.get_config()
  assert (c.model, c.batch_size, c.num_epochs, tuple(c.lr_boundaries)) == (
      'attention56', 512, 20, (8, 14, 18))


def _command_line_config(*overrides):
  """configs/casia_mobileface.py with ``overrides`` parsed as main's flags."""
  argv = ['main', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', str(ROOT / 'configs' / 'casia_mobileface.py'),
      flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def _trained_head_options(config):
  """The options of the head the trainer builds (make_task)."""
  config.dataset = 'synthetic'
  task = setup.make_task(config, arrays.make_mesh(1, jax.devices()[:1]),
                         data_source.Data(100, 32, 10, None))
  return task.head.options


@pytest.mark.parametrize('preset', sorted(heads.NPCFACE_PRESETS))
def test_npcface_preset_on_the_command_line(preset, tmp_path):
  """--config.head_options.npcface.preset=P gives the head exactly preset
  P; a field given beside it wins over the preset's; run.json records
  both the preset and the options trained with."""
  flag = f'--config.head_options.npcface.preset={preset}'
  c = _command_line_config(flag)
  assert _trained_head_options(c) == heads.NPCFACE_PRESETS[preset]
  config_checks.check(c, num_devices=NUM_DEVICES)
  run_dir.write_run_info(str(tmp_path), c,
                         data_source.Data(100, 32, 10, None),
                         setup.create_head(c).options)
  run = json.loads((tmp_path / run_dir.RUN_INFO).read_text())
  assert run['config']['head_options']['npcface']['preset'] == preset
  assert run['head_options'] == heads.NPCFACE_PRESETS[preset]

  c = _command_line_config(flag, '--config.head_options.npcface.alpha=0.3',
                           '--config.head_options.npcface.easy_margin=true')
  assert _trained_head_options(c) == {
      **heads.NPCFACE_PRESETS[preset], 'alpha': 0.3, 'easy_margin': True}


def test_npcface_options_default_to_the_paper_and_name_a_bad_preset():
  assert _trained_head_options(_command_line_config()) == (
      heads.NPCFACE_PRESETS['paper'])
  assert _trained_head_options(_command_line_config(
      '--config.head_options.npcface.m1=0')) == (
          heads.NPCFACE_PRESETS['negative_only'])
  c = _command_line_config('--config.head_options.npcface.preset=facexzoo')
  c.dataset = 'synthetic'
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.head_options.npcface.preset = 'facexzoo': "
                           r"choose one of \['facex_zoo', 'negative_only', "
                           r"'paper', 'positive_only'\]"):
    config_checks.check(c, num_devices=NUM_DEVICES)


def test_impossible_values_are_named_before_compiling():
  c = _config(**{'head_options.npcface.scale': -1.0, 'batch_size': 12,
                 'model_parallel': 3, 'lr_boundaries': (5, 2),
                 'momentum': 1.5, 'dataset': ''})
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(c, num_devices=NUM_DEVICES)
  message = str(e.value)
  for field in ('config.head_options.npcface.scale = -1.0',
                'config.batch_size = 12', 'config.model_parallel = 3',
                'config.lr_boundaries', 'config.momentum = 1.5',
                'config.dataset'):
    assert field in message, message
  c = _config(head='adacos', chunk_size=64)
  with pytest.raises(config_checks.ConfigError, match='no chunked form'):
    config_checks.check(c, num_devices=NUM_DEVICES)
  c = _config(head='cosface')
  c.head_options.cosface = {'margn': 0.3}
  with pytest.raises(
      config_checks.ConfigError,
      match=r"head_options.cosface: .*no option\(s\) \['margn'\]"):
    config_checks.check(c, num_devices=NUM_DEVICES)
  with pytest.raises(config_checks.ConfigError,
                     match='config.num_classes = 60 but the dataset'):
    data_source.open_data(_config(num_classes=60), arrays.make_mesh(2))


def test_learning_rate_schedule_in_epochs():
  c = _config(learning_rate=0.1, lr_boundaries=(2, 3), warmup_epochs=1.0)
  schedule = setup.learning_rate_schedule(c, steps_per_epoch=10)
  lrs = [float(schedule(s)) for s in (0, 4, 9, 10, 19, 20, 29, 30)]
  np.testing.assert_allclose(lrs, [0.01, 0.05, 0.1, 0.1, 0.1, 0.01, 0.01,
                                   0.001], rtol=1e-6)


def test_logged_learning_rate_is_the_schedules_at_the_step(
    tmp_path, monkeypatch, caplog):
  """The rate drops from 0.1 to 0.01 after 2 steps (an epoch), inside the
  first logging window of 3: the log line, metrics.jsonl and TensorBoard
  give the rate of the window's last step, 0.01, not the window's mean
  (0.07); the loss stays the window's mean."""
  from npcface_jax import analysis  # noqa: PLC0415 (only this test)
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  c = _config(num_train_steps=6, log_every_steps=3, lr_boundaries=(1,),
              checkpoint_every_steps=100, learning_rate=0.1,
              **{'synthetic.epoch_examples': 32})  # 2 steps an epoch
  schedule = setup.learning_rate_schedule(c, steps_per_epoch=2)
  assert [float(schedule(s)) for s in range(3)] == pytest.approx(
      [0.1, 0.1, 0.01])
  with caplog.at_level(logging.INFO):
    loop.train_and_evaluate(c, str(tmp_path))
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith('step 3/6 ')]
  assert len(lines) == 1 and '  lr 0.01  ' in lines[0] + '  ', lines
  curve, _ = analysis.read_records(analysis.path(str(tmp_path),
                                                 analysis.METRICS))
  assert [(m['step'], m['learning_rate']) for m in curve] == [
      (3, pytest.approx(0.01)), (6, pytest.approx(0.01))]
  assert _tensorboard_scalar(tmp_path, 'learning_rate') == {
      3: pytest.approx(0.01), 6: pytest.approx(0.01)}


def _tensorboard_scalar(workdir, tag) -> dict[int, float]:
  import tensorflow as tf  # noqa: PLC0415 (only this test reads events)
  values = {}
  for path in workdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = float(
              tf.make_ndarray(v.tensor) if v.HasField('tensor')
              else v.simple_value)
  return values


# --- The step on a mesh ------------------------------------------------------

def _task(config, mesh, tiny):
  data = data_source.open_data(config, mesh)
  task = setup.make_task(config, mesh, data)
  if tiny:  # the same compute dtype as the configured backbone
    task = dataclasses.replace(task, model=TinyNet(config.embedding_dim,
                                                   task.model.dtype))
  return data, task


def _run_steps(config, mesh, steps, tiny=False):
  data, task = _task(config, mesh, tiny)
  state = setup.init_state(task)
  step = train_step.make_train_step(
      task, setup.state_shardings(task, state))
  stream = data.open(None)
  history = []
  for _ in range(steps):
    state, metrics = step(state, next(stream))
    history.append(jax.device_get(metrics))
  return state, history


@pytest.mark.parametrize('overrides', [
    {'model_parallel': 2},
    {'model_parallel': 4, 'head': 'curricularface', 'chunk_size': 8},
    {'model_parallel': 1, 'head': 'sphereface', 'grad_clip_norm': 1.0},
], ids=['npcface-model2', 'curricular-model4-chunked', 'sphere-data8-clip'])
@pytest.mark.slow
def test_sharded_step_equals_one_device(overrides):
  """8 devices (data x model, classes split over 'model') take the same
  steps as one device: parameters, BatchNorm statistics, head state."""
  # A small learning rate: at 0.1 this tiny network's first steps are
  # chaotic enough to amplify float32 summation-order differences 100-fold
  # per step.
  c = _config(learning_rate=0.01, **overrides)
  one, h1 = _run_steps(c, arrays.make_mesh(1, jax.devices()[:1]), 3,
                       tiny=True)
  many, h8 = _run_steps(c, arrays.make_mesh(c.model_parallel), 3, tiny=True)
  _assert_same_params(many, one, 61, rtol=1e-4, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4),
               jax.device_get(many.head_state), jax.device_get(one.head_state))
  for m1, m8 in zip(h1, h8):
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6,
                                 err_msg=k)
  assert int(many.step) == 3
  if c.head == 'npcface':
    assert 0 < h8[0]['npcface/hard_share'] <= 1 and h8[0]['npcface/margin'] > 0


@pytest.mark.slow
def test_bfloat16_backbone_follows_float32():
  """config.dtype='bfloat16': the backbone computes in bf16 on bf16 images,
  the classifier, loss and parameters stay float32, and a step's loss and
  gradient are float32's to bf16 precision (the backbones' own bf16 tests
  are in test_models.py)."""
  c = _config(**RESUMED, dtype='bfloat16')
  mesh = arrays.make_mesh(2)
  assert models.from_config(c).dtype == jnp.bfloat16
  assert models.from_config(c, train_dtype=False).dtype is None  # eval
  assert next(data_source.open_data(c, mesh).open(None))['image'].dtype == (
      jnp.bfloat16)
  f32 = _run_steps(_config(**RESUMED), mesh, 1, tiny=True)
  bf16 = _run_steps(c, mesh, 1, tiny=True)
  assert all(x.dtype == np.float32
             for x in jax.tree.leaves(bf16[0].params))
  np.testing.assert_allclose(bf16[1][0]['loss'], f32[1][0]['loss'], rtol=1e-2)
  np.testing.assert_allclose(bf16[1][0]['grad_norm'], f32[1][0]['grad_norm'],
                             rtol=0.1)


@pytest.mark.slow
def test_checkpoint_restores_onto_other_device_counts(tmp_path):
  """Saved on 8 devices (classes over 2: 62 rows), restored onto 3 devices
  (63 rows) and onto 1 (61 rows): the same parameters, padding added or
  dropped."""
  c = _config()
  mesh8 = arrays.make_mesh(2)
  state8, _ = _run_steps(c, mesh8, 1, tiny=True)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, every_steps=1)
  ckpt.save(1, state8, {'step': 1})
  ckpt.wait()
  for devices, model in ((jax.devices()[:3], 3), (jax.devices()[:1], 1)):
    mesh = arrays.make_mesh(model, devices)
    _, task = _task(c, mesh, tiny=True)
    target = setup.abstract_state(task)
    state, position, step = ckpt.restore(target)
    assert (step, position) == (1, {'step': 1})
    assert state.params['classifier'].shape[0] == task.padded_classes
    assert state.params['classifier'].sharding == (
        target.params['classifier'].sharding)
    _assert_same_params(state, state8, 61)
    np.testing.assert_array_equal(
        np.asarray(state.params['classifier'])[61:], 0.0)
  ckpt.close()


# --- Resume and preemption ---------------------------------------------------

def _main(workdir, overrides, env_devices=NUM_DEVICES, *, extra=(),
          module='npcface_jax.main'):
  """The trainer's command line as a process (``module`` tests.tiny_backbone:
  the same with the small backbone)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_NUM_CPU_DEVICES=str(env_devices), TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.Popen(
      [sys.executable, '-m', module, f'--workdir={workdir}',
       '--config=configs/demo.py', *_flags(overrides), *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _run_until(workdir, overrides, step, sig):
  """Starts the command line (small backbone), sends ``sig`` once it logs
  ``step``, and returns (exit status, log)."""
  proc = _main(workdir, overrides, module='tests.tiny_backbone')
  lines = []
  for line in proc.stdout:  # wait until training runs, then interrupt
    lines.append(line)
    if f'step {step}/' in line:
      proc.send_signal(sig)
      break
  rest, _ = proc.communicate(timeout=300)
  return proc.returncode, ''.join(lines) + rest


def _latest_step(workdir):
  ckpt = checkpoint.Checkpointer(str(workdir / 'checkpoints'), keep=3,
                                 every_steps=100)
  step = ckpt.latest_step()
  ckpt.close()
  return step


@pytest.mark.slow(minutes=1)
def test_sigterm_and_kill9_resume_equal_uninterrupted(tmp_path, monkeypatch):
  """A run stopped by SIGTERM writes a checkpoint, exits 0, and the restart
  from the same workdir ends on exactly the uninterrupted run's parameters
  (input position and head state included). A run killed with SIGKILL at
  a random step (a save maybe half written) restarts from its newest
  checkpoint and ends on the same parameters too. The small backbone
  throughout (its steps take milliseconds, hence 64 of them, so that the
  signals land mid-run)."""
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  overrides = {**TINY, **RESUMED, 'num_train_steps': 64,
               'log_every_steps': 1, 'checkpoint_every_steps': 8}
  c = _config(**overrides)
  full = loop.train_and_evaluate(c, str(tmp_path / 'full')).state

  workdir = tmp_path / 'stopped'
  status, log = _run_until(workdir, overrides, 3, signal.SIGTERM)
  assert status == 0, log[-3000:]
  assert 'preempted: checkpoint of step' in log, log[-3000:]
  assert 3 <= _latest_step(workdir) < 64, log[-3000:]
  resumed = loop.train_and_evaluate(c, str(workdir))
  assert int(resumed.state.step) == 64 and not resumed.preempted
  _assert_same_params(resumed.state, full, 61)
  np.testing.assert_array_equal(resumed.state.head_state['step'],
                                full.head_state['step'])

  rng, seed = fresh_rng()
  kill_at = int(rng.integers(10, 41))
  workdir = tmp_path / 'killed'
  status, log = _run_until(workdir, overrides, kill_at, signal.SIGKILL)
  assert status == -signal.SIGKILL, (seed, log[-3000:])
  assert 'preempted' not in log
  assert _latest_step(workdir) < 64, (seed, kill_at)
  resumed = loop.train_and_evaluate(c, str(workdir))
  assert int(resumed.state.step) == 64, (seed, kill_at)
  _assert_same_params(resumed.state, full, 61)


@pytest.mark.slow
def test_command_line_reports_config_errors(tmp_path):
  proc = _main(tmp_path, {'head_options.npcface.scale': -2.0}, env_devices=1)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert 'config.head_options.npcface.scale = -2.0: must be positive' in out


def test_gpu_bench_config_carries_what_make_task_reads(monkeypatch):
  """benchmarks/gpu_train_bench.py builds the trainer's step from a plain
  namespace (a GPU machine has no ml_collections): it must keep every field
  that make_task reads."""
  import importlib.util  # noqa: PLC0415
  monkeypatch.setattr(sys, 'path', [str(ROOT / 'benchmarks'), *sys.path])
  for name in ('XLA_PYTHON_CLIENT_PREALLOCATE',
               'XLA_PYTHON_CLIENT_MEM_FRACTION'):
    monkeypatch.setenv(name, '')  # what it sets for a GPU, undone after
  spec = importlib.util.spec_from_file_location(
      'gpu_train_bench', ROOT / 'benchmarks' / 'gpu_train_bench.py')
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  config = bench.jax_config('mobilefacenet', 'float32', 'native',
                            {'width': 0.125})
  task = setup.make_task(config, arrays.make_mesh(1, jax.devices()[:1]),
                         data_source.Data(100, 32, 10, None))
  assert (task.num_classes, task.num_sample, task.chunk_size) == (100, None,
                                                                  None)
