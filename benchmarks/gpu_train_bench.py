"""Train-step images/s on one GPU: npcface_jax's real train step beside a
PyTorch step of the same network, float32 and bfloat16, with MFU.

    python benchmarks/gpu_train_bench.py [--models mobilefacenet resnet50]
        [--classes 85742] [--rounds 5] [--steps 10] [--json OUT.json]
    python benchmarks/gpu_train_bench.py --quick      # CPU smoke run
    python benchmarks/gpu_train_bench.py --summary A.json B.json \
        [--loss-json LOSS.json]                       # the table of saved runs

Each step: 112x112 synthetic images, a backbone to 512-d embeddings, the
NPCFace head (paper options: s 64, m0 0.4, m1 0.2, t 1.1, alpha 0.25) over a
normalised classifier of C = 85,742 classes (MS1M-ArcFace, the usual
ResNet-50 training set; --classes 10575 for CASIA-WebFace), softmax
cross-entropy, SGD momentum 0.9, weight decay 5e-4 on every parameter.
  jax          train_step.make_train_step, the trainer's own jitted step (state
               donated, BatchNorm statistics, metrics), built through
               setup.make_task / init_state from a plain config object;
               bfloat16 is config.dtype='bfloat16' (bf16 images and
               backbone, float32 parameters and loss), as the trainer runs it
  jax shifted  the same with impl='shifted' (layers.py): depthwise convs as
               k*k shifted multiply-adds and 1x1 convs as matrix products,
               the CPU formulations, against XLA's native convolutions
               (impl='native', what 'auto' picks on a GPU); MobileFaceNet
  torch        the same network in PyTorch (parameter count asserted equal),
               channels_last, cudnn.benchmark, bf16 autocast for bfloat16,
               the same head in float32, fused SGD; eager (as insightface's
               arcface_torch trains), torch.compile with --torch-compile
Float32 means TF32 tensor-core math in both: JAX's default precision on the
GPU, and torch with cudnn/matmul TF32 allowed here (its convolutions' default).

Cases of one model and dtype run interleaved, round after round, each round
`--steps` steps queued and synchronised once (fewer for a case whose steps
would take over --round-s); step times are medians over rounds and ratios
medians of per-round ratios. bfloat16 goes first, then
float32, each group freed before the next, and the JSON is rewritten after
every round, so a run cut short by a timeout keeps what it measured.

MFU: model FLOPs per step / step time / the card's dense peak. Model FLOPs
= 3 x the backbone's forward (XLA's cost analysis of the native-convolution
forward at batch 1, times B; the backward costs about twice the forward)
+ 3 x 2BCD for the classifier's three matrix products; the same figure for
every formulation and framework. Peaks (TFLOP/s, dense) from the card's
name: H100 SXM and H200 989 bf16 / 494 TF32; float32 rows use the TF32
peak (against the 67 TFLOP/s of non-tensor fp32, multiply by 494/67).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import types

# Before jax starts: let torch have GPU memory beside JAX in this process.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from torch_models import torch_network
from npcface_jax.common import arrays
from npcface_jax import models
from npcface_jax.common import jsonfile
from npcface_jax.training import data_source, setup, train_step

EMBEDDING = 512
IMAGE = 112
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
# heads.NPCFACE_PRESETS['paper'], which torch_npcface_loss implements.
NPCFACE = dict(scale=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.25)
DTYPES = ('bfloat16', 'float32')
# Per-GPU batches typical of face-recognition training on an 80 GB card.
BATCH = {'mobilefacenet': 512, 'resnet50': 256}
# (part of the device name, card, dense bf16, dense TF32 TFLOP/s) by the
# vendor's datasheets; the first match wins (GH200 and H200 have the H100
# SXM's compute).
PEAKS = (('H200', 'H200 (H100 SXM compute)', 989.0, 494.0),
         ('H100 PCIe', 'H100 PCIe', 756.0, 378.0),
         ('H100 NVL', 'H100 NVL', 835.0, 418.0),
         ('H100', 'H100 SXM', 989.0, 494.0),
         ('A100', 'A100', 312.0, 156.0))


def card_peaks(kind: str, bf16: float | None, fp32: float | None) -> dict:
  """The peaks MFU divides by: given ones, else the card's by name."""
  for key, name, peak_bf16, peak_tf32 in PEAKS:
    if key.lower() in kind.lower():
      return {'source': name, 'bfloat16': bf16 or peak_bf16,
              'float32': fp32 or peak_tf32}
  return {'source': 'given' if bf16 or fp32 else 'unknown card',
          'bfloat16': bf16, 'float32': fp32}


# --- JAX ---------------------------------------------------------------------

def jax_config(model: str, dtype: str, impl: str, options: dict):
  """The trainer's config fields that make_task reads, without
  ml_collections (absent on the GPU machine)."""
  return types.SimpleNamespace(
      model=model, model_options={'impl': impl, **options},
      embedding_dim=EMBEDDING, dtype=dtype, head='npcface',
      head_options={'npcface': NPCFACE}, criterion='softmax',
      criterion_options={}, chunk_size=0, sample_rate=1.0, learning_rate=LR,
      lr_boundaries=(16, 24, 28), lr_decay=0.1, warmup_epochs=0.0,
      momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, grad_clip_norm=0.0,
      grad_clip_scope='all', frozen_params='', classifier_init_std=0.0,
      seed=0, batch_size=0)  # the batch checks Partial FC only: rate 1


def forward_flops(model: str, options: dict) -> float:
  """XLA's FLOPs of one image's eval forward, native convolutions."""
  net = models.create(model, impl='native', embedding_dim=EMBEDDING,
                      **options)
  x = jnp.zeros((1, IMAGE, IMAGE, 3), jnp.float32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x,
                                              train=False))
  lowered = jax.jit(lambda v, x: net.apply(v, x, train=False)).lower(
      variables, x)
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001 (backends without pre-compile analysis)
    cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def param_count(model: str, options: dict) -> int:
  net = models.create(model, embedding_dim=EMBEDDING, **options)
  shapes = jax.eval_shape(lambda: net.init(
      jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


def _memory_mb(compiled) -> float | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


class JaxCase:
  """The trainer's step, compiled ahead so compile time is measured apart."""

  def __init__(self, model, dtype, impl, batch, classes, options, data):
    self.name = 'jax' if impl == 'native' else f'jax {impl}'
    config = jax_config(model, dtype, impl, options)
    mesh = arrays.make_mesh(1, jax.devices()[:1])
    task = setup.make_task(
        config, mesh, data_source.Data(classes, IMAGE, 1000, None))
    self.state = setup.init_state(task)
    step = train_step.make_train_step(
        task, setup.state_shardings(task, self.state))
    images, labels = data
    self.batch = {'image': jnp.asarray(images, jnp.dtype(dtype)),
                  'label': jnp.asarray(labels, jnp.int32)}
    start = time.perf_counter()
    self.step = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.memory_mb = _memory_mb(self.step)

  def run(self, steps: int) -> float:
    """Runs ``steps`` steps, waits for the last; returns its loss."""
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    return float(metrics['loss'])


# --- PyTorch -----------------------------------------------------------------

def torch_npcface_loss(embeddings, weight, labels, scale, m0, m1, t, alpha):
  """Mean NPCFace cross-entropy (heads.npcface_logits, eqs. 10-12) in
  float32; the hard mask and the margin are constants for the gradient."""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415
  cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(weight, dim=1).T
  is_target = (torch.arange(cos.shape[1], device=cos.device)[None, :]
               == labels[:, None])
  c_y = cos.gather(1, labels[:, None])[:, 0]
  with torch.no_grad():
    c = c_y.clamp(-1.0, 1.0)
    sin = torch.sqrt(torch.clamp(1.0 - c * c, min=1e-12))
    threshold = c * math.cos(m0) - sin * math.sin(m0)
    hard = (cos > threshold[:, None]) & ~is_target
    hard_f = hard.float()
    margin = m0 + m1 * (cos * hard_f).sum(1) / hard_f.sum(1).clamp(min=1.0)
    wraps = torch.acos(c) + margin > math.pi
  sin_y = torch.sqrt(torch.clamp(1.0 - c_y * c_y, min=1e-12))
  positive = torch.where(
      wraps, c_y - margin * torch.sin(margin),
      c_y * torch.cos(margin) - sin_y * torch.sin(margin))
  negative = torch.where(hard, t * cos + alpha, cos)
  logits = scale * torch.where(is_target, positive[:, None], negative)
  return F.cross_entropy(logits, labels)


class TorchCase:
  """The same network, head and optimizer as a PyTorch training step."""

  def __init__(self, model, dtype, batch, classes, options, data, expected,
               compile_: bool):
    import torch  # noqa: PLC0415
    self.torch = torch
    self.name = 'torch compiled' if compile_ else 'torch'
    cuda = torch.cuda.is_available()
    self.device = torch.device('cuda' if cuda else 'cpu')
    torch.manual_seed(0)
    net = torch_network(model, options)
    count = sum(p.numel() for p in net.parameters())
    assert count == expected, (
        f'torch {model} has {count} parameters, JAX {expected}: not the '
        'same structure')
    self.net = net.to(self.device, memory_format=torch.channels_last)
    images, labels = data
    self.images = torch.from_numpy(images).permute(0, 3, 1, 2).to(
        self.device).contiguous(memory_format=torch.channels_last)
    self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
    w = torch.randn(classes, EMBEDDING, device=self.device)
    self.weight = torch.nn.Parameter(w / w.norm(dim=1, keepdim=True))
    params = [*self.net.parameters(), self.weight]
    try:  # one fused kernel where this torch has it, else foreach
      self.opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM,
                                 weight_decay=WEIGHT_DECAY, fused=cuda)
    except (RuntimeError, TypeError, ValueError):
      self.opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM,
                                 weight_decay=WEIGHT_DECAY)
    self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                   enabled=dtype == 'bfloat16')
    self.forward = torch.compile(self.net) if compile_ else self.net
    self.loss = (torch.compile(torch_npcface_loss) if compile_
                 else torch_npcface_loss)
    self.net.train()
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    self.compile_s = 0.0  # torch's happens in the warm-up steps
    self.memory_mb = None

  def _step(self):
    self.opt.zero_grad(set_to_none=True)
    with self.autocast:
      embeddings = self.forward(self.images)
    loss = self.loss(embeddings, self.weight, self.labels, **NPCFACE)
    loss.backward()
    self.opt.step()
    return loss

  def run(self, steps: int) -> float:
    for _ in range(steps):
      loss = self._step()
    value = float(loss.detach())  # synchronises
    if self.device.type == 'cuda':
      self.memory_mb = self.torch.cuda.max_memory_allocated() / 2**20
    return value


# --- Measuring ---------------------------------------------------------------

def _write(path: str | None, payload: dict) -> None:
  if path:
    jsonfile.write_object(path, payload)


def run_group(args, payload, model, dtype, options, flops, count):
  """Builds, warms up and times the cases of one model and dtype."""
  batch = args.batch or BATCH[model]
  rng = np.random.default_rng(0)
  data = (rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32),
          rng.integers(0, args.classes, batch).astype(np.int32))
  specs = []
  if 'jax' in args.frameworks:
    specs.append(('native', None))
    if model == 'mobilefacenet' and dtype in args.shifted:
      specs.append(('shifted', None))
  if 'torch' in args.frameworks:
    specs.append((None, 'torch'))
  cases, case = [], None
  for impl, framework in specs:
    label = f'{model} {dtype} {framework or "jax " + impl}'
    print(f'building {label} (batch {batch})', flush=True)
    start = time.perf_counter()
    try:
      if framework == 'torch':
        case = TorchCase(model, dtype, batch, args.classes, options, data,
                         count, args.torch_compile)
      else:
        case = JaxCase(model, dtype, impl, batch, args.classes, options, data)
      loss = case.run(args.warmup)
    except Exception as e:  # noqa: BLE001 (e.g. out of memory: go on)
      print(f'  skipped: {type(e).__name__}: {e}', flush=True)
      continue
    ready = time.perf_counter() - start
    # Steps per round: --steps, fewer where a step is slow (the shifted
    # formulation on a GPU may be), so that no case eats the budget.
    start = time.perf_counter()
    case.run(1)
    steps = max(1, min(args.steps, int(args.round_s
                                       / (time.perf_counter() - start))))
    print(f'  ready in {ready:.1f} s (build, compile {case.compile_s:.1f} s, '
          f'{args.warmup} warm-up steps), loss {loss:.3f}; {steps} steps a '
          'round', flush=True)
    row = {'model': model, 'dtype': dtype, 'case': case.name,
           'batch': batch, 'classes': args.classes,
           'model_flops': 3 * batch * flops
                          + 6 * batch * args.classes * EMBEDDING,
           'params': count, 'compile_s': case.compile_s, 'ready_s': ready,
           'warmup_loss': loss, 'steps': steps, 'times': []}
    payload['rows'].append(row)
    cases.append((case, row))
  _write(args.json, payload)
  for r in range(args.rounds):
    for case, row in cases:
      start = time.perf_counter()
      case.run(row['steps'])
      row['times'].append((time.perf_counter() - start) / row['steps'])
      row['memory_mb'] = case.memory_mb
    _write(args.json, payload)
    print(f'{model} {dtype}: round {r + 1}/{args.rounds} done', flush=True)
  cases = case = None  # free this group's GPU memory before the next
  gc.collect()
  if 'torch' in sys.modules and sys.modules['torch'].cuda.is_available():
    sys.modules['torch'].cuda.empty_cache()


def summarize(payloads: list[dict], loss_rows: list[dict] | None = None) -> str:
  """The short table of one or more runs' rows (and the loss bench's)."""
  first = payloads[0]
  peaks = first['peaks']
  fmt_peak = lambda v: '?' if v is None else f'{v:g}'  # noqa: E731
  lines = [
      f'# {first["device"]}: jax {first["jax"]}'
      + (f', torch {first["torch"]}' if first.get('torch') else '')
      + f'; MFU against {peaks["source"]} dense peaks: bf16 '
      f'{fmt_peak(peaks["bfloat16"])}, fp32 as TF32 '
      f'{fmt_peak(peaks["float32"])} TFLOP/s; C = {first["classes"]:,}, '
      f'{first["rounds"]} rounds of up to {first["steps"]} steps, medians',
      '| model | dtype | case | batch | ms/step | img/s | MFU % | ratio | '
      'ready s |',
      '|---|---|---|---:|---:|---:|---:|---|---:|']

  def find(rows, row, cases):
    """The timed row of the same run, model and dtype whose case is one
    of ``cases`` (ratios need rows timed in the same rounds)."""
    for other in rows:
      if ((other['model'], other['dtype']) == (row['model'], row['dtype'])
          and other['case'] in cases and other['times']):
        return other
    return None

  def ratio(fast, slow):
    """Median over rounds of slow's step time / fast's."""
    return statistics.median(s / f for f, s in zip(fast['times'],
                                                   slow['times']))

  verdicts = []
  for rows, row in [(p['rows'], r) for p in payloads for r in p['rows']]:
    if not row['times']:
      lines.append(f'| {row["model"]} | {row["dtype"]} | {row["case"]} | '
                   f'{row["batch"]} | not timed | | | | '
                   f'{row["ready_s"]:.0f} |')
      continue
    step = statistics.median(row['times'])
    peak = peaks[row['dtype']]
    mfu = ('' if not peak else
           f'{100 * row["model_flops"] / step / (peak * 1e12):.1f}')
    note = ''
    torch_row = find(rows, row, ('torch', 'torch compiled'))
    if row['case'] == 'jax' and torch_row:
      x = ratio(row, torch_row)
      note = f'{x:.2f}x {torch_row["case"]}'
      verdicts.append(f'{row["model"]} {row["dtype"]} {x:.2f}x '
                      f'{torch_row["case"]}')
    elif row['case'].startswith('jax ') and find(rows, row, ('jax',)):
      note = f'{ratio(row, find(rows, row, ("jax",))):.2f}x native'
    lines.append(f'| {row["model"]} | {row["dtype"]} | {row["case"]} | '
                 f'{row["batch"]} | {1e3 * step:.1f} | '
                 f'{row["batch"] / step:,.0f} | {mfu} | {note} | '
                 f'{row["ready_s"]:.0f} |')
  if verdicts:
    lines.append('JAX step x PyTorch (target >= 1.0): ' + ', '.join(verdicts))
  if loss_rows:
    lines += ['| loss_bench.py | C | ms | x floor |',
              '|---|---:|---:|---:|']
    lines += [f'| {r["head"]} | {r["classes"]:,} | {r["ms"]:.2f} | '
              f'{r["x_floor"]:.2f} |' for r in loss_rows
              if r['head'] in ('floor', 'npcface', 'npcface/chunked')]
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=['mobilefacenet',
                                                      'resnet50'],
                      choices=['mobilefacenet', 'resnet50'])
  parser.add_argument('--dtypes', nargs='+', choices=DTYPES,
                      help='default: both (--quick: bf16 MobileFaceNet, '
                      'fp32 ResNet)')
  parser.add_argument('--shifted', nargs='*', default=['bfloat16'],
                      choices=DTYPES,
                      help="dtypes in which MobileFaceNet also runs "
                      "impl='shifted'")
  parser.add_argument('--frameworks', nargs='+', default=['jax', 'torch'],
                      choices=['jax', 'torch'])
  parser.add_argument('--classes', type=int, default=85_742)
  parser.add_argument('--batch', type=int, default=0,
                      help='per step; 0: 512 MobileFaceNet, 256 ResNet-50')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10,
                      help='steps per timed round (at most)')
  parser.add_argument('--round-s', type=float, default=1.0,
                      help='fewer steps where they would take longer')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--torch-compile', action='store_true',
                      help='torch.compile the network and loss (slow start)')
  parser.add_argument('--peak-bf16', type=float,
                      help='TFLOP/s; default: from the card name')
  parser.add_argument('--peak-fp32', type=float,
                      help='TFLOP/s (TF32); default: from the card name')
  parser.add_argument('--quick', action='store_true',
                      help='CPU smoke run: reduced nets, batch 4, 1 step')
  parser.add_argument('--json', help='write the rows here (every round)')
  parser.add_argument('--summary', nargs='+', metavar='JSON',
                      help='print the table of saved runs, run nothing')
  parser.add_argument('--loss-json', help="loss_bench.py's --json rows")
  args = parser.parse_args()

  if args.summary:
    payloads = []
    for path in args.summary:
      try:
        with open(path) as f:
          payloads.append(json.load(f))
      except (OSError, ValueError) as e:  # a part skipped or cut short
        print(f'no results from {path}: {e}')
    loss_rows = None
    if args.loss_json and os.path.exists(args.loss_json):
      with open(args.loss_json) as f:
        loss_rows = json.load(f)
    if payloads:
      print(summarize(payloads, loss_rows))
    else:
      print('no results to summarise')
    return

  options = {m: {} for m in args.models}
  dtypes = {m: args.dtypes or list(DTYPES) for m in args.models}
  if args.quick:
    # Every code path once, on reduced nets at 112x112 (IResNet takes no
    # other size; MobileFaceNet any multiple of 16), compiled without
    # LLVM's expensive passes: a smoke run, its times mean nothing.
    args.batch, args.classes = args.batch or 2, 1000
    args.rounds, args.steps, args.warmup = 2, 1, 1
    options = {'mobilefacenet': {'width': 0.25},
               'resnet50': {'units': (1, 1, 1, 1)}}
    dtypes = {m: args.dtypes or {'mobilefacenet': ['bfloat16'],
                                 'resnet50': ['float32']}[m]
              for m in args.models}
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_backend_optimization_level=0'
                               ' --xla_llvm_disable_expensive_passes=true')
  device = jax.devices()[0]
  kind = device.device_kind if device.platform == 'gpu' else (
      f'{device.platform}: {platform.processor() or platform.machine()}')
  peaks = card_peaks(kind, args.peak_bf16, args.peak_fp32)
  torch_version = None
  if 'torch' in args.frameworks:
    try:  # after jax has taken the GPU
      import torch  # noqa: PLC0415
      torch.backends.cudnn.benchmark = True
      torch.backends.cudnn.allow_tf32 = True
      torch.backends.cuda.matmul.allow_tf32 = True
      torch_version = torch.__version__
      if device.platform == 'gpu' and not torch.cuda.is_available():
        print('torch sees no GPU: PyTorch cases skipped')
        args.frameworks = ['jax']
    except ImportError:
      print('torch not installed: PyTorch cases skipped')
      args.frameworks = ['jax']
  print(f'{kind}; jax {jax.__version__}, torch {torch_version}; peaks '
        f'{peaks}', flush=True)
  payload = {'device': kind, 'peaks': peaks, 'jax': jax.__version__,
             'torch': torch_version, 'classes': args.classes,
             'rounds': args.rounds, 'steps': args.steps, 'rows': []}
  if args.quick and 'torch' in args.frameworks:
    for model in args.models:  # the full-size nets' structure, cheaply
      count = sum(p.numel() for p in torch_network(model, {}).parameters())
      assert count == param_count(model, {}), (model, count)
      print(f'{model} full size: {count:,} parameters in JAX and torch')
  for model in args.models:
    flops = forward_flops(model, options[model])
    count = param_count(model, options[model])
    print(f'{model}: {count:,} parameters, {flops / 1e9:.3f} GFLOP per '
          'image forward (XLA)', flush=True)
    for dtype in dtypes[model]:
      run_group(args, payload, model, dtype, options[model], flops, count)
  print()
  print(summarize([payload]))


if __name__ == '__main__':
  main()
