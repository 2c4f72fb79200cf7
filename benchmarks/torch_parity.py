"""Training parity with insightface's arcface_torch, step for step.

    PYTHONPATH=$PWD python benchmarks/torch_parity.py [--steps 30]

needs torch, the benchmark's own dependency (never the package's):
``pip install torch --index-url https://download.pytorch.org/whl/cpu``.

The PyTorch side is arcface_torch's recipe written here from its
documented behaviour (recognition/arcface_torch: backbones/iresnet.py's
IResNet of IBasicBlocks, partial_fc_v2.py's PartialFC_V2 at sample rate 1
with losses.py's CombinedMarginLoss as ArcFace, s=64, m=0.5, and
DistCrossEntropy, train_v2.py's SGD and clipping), at a reduced width so
that it runs on a CPU. The JAX side is this trainer's own step
(training/setup.py, train_step.py) built from a config that selects
arcface_torch's behaviour with the options listed in ``ARCFACE_TORCH``.
Both start from the same weights (the torch state dict onto our variables
by foreign/torch_layouts, the classifier's rows as they are) and take the
same float32 batches; the loss of each step and, at the end, every
parameter and BatchNorm statistic are compared.

Two comparisons: 'free-running' (each side trains on its own for all the
steps) and 'lock-step' (before each step our state is set to torch's,
parameters, BatchNorm statistics and SGD momentum, so that each step's
difference is that step's alone, not rounding amplified over the
previous ones). ``--defaults`` runs our trainer's default options
instead, to show what each difference does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

try:
  import torch
  from torch import nn
except ImportError:  # pragma: no cover - the benchmark's own dependency
  sys.exit('benchmarks/torch_parity.py needs torch: pip install torch '
           '--index-url https://download.pytorch.org/whl/cpu')

import jax
import jax.numpy as jnp
import optax

from configs import default
from npcface_jax.common import arrays
from npcface_jax.foreign import torch_layouts
from npcface_jax.training import data_source, setup, train_step

CLASSES, BATCH, EMBEDDING, WIDTH, UNITS = 50, 16, 64, 0.125, (1, 1, 1, 1)
LR, MOMENTUM, WEIGHT_DECAY, CLIP = 0.1, 0.9, 5e-4, 5.0
SCALE, MARGIN = 64.0, 0.5

# arcface_torch's behaviour, as this trainer's options (each one's default
# is this trainer's own behaviour; RESULTS.md says what each does).
ARCFACE_TORCH = {
    'head_options.arcface.straight_through': True,  # margin under no_grad
    'head_options.arcface.monotone': False,  # no fallback past pi
    'grad_clip_scope': 'backbone',  # clip_grad_norm_(backbone.parameters())
    'frozen_params': 'EmbeddingHead_0/BatchNorm_1/scale',  # features.weight
    'classifier_init_std': 0.01,  # PartialFC_V2's normal(0, 0.01)
    'model_options.unbiased_running_var': True,  # torch BN's running var
    'criterion_options.softmax.min_prob': 1e-30,  # DistCrossEntropy's clamp
}
# Tensors that are zero in exact arithmetic (the bias of a BatchNorm whose
# output reaches another training-mode BatchNorm through linear maps only,
# and that BatchNorm's running mean): both sides hold rounding noise there,
# compared apart by their size (torch's largest |value| below this).
NOISE = 1e-6


def _channels(n: int, width: float) -> int:
  return max(8, int(n * width / 8 + 0.5) * 8)  # models/layers.channels


# --- arcface_torch, from its documented behaviour ---------------------------

class IBasicBlock(nn.Module):
  """BN, conv3x3, BN, PReLU, conv3x3 (stride), BN; 1x1 conv + BN shortcut
  where the shape changes (backbones/iresnet.py, eps 1e-5)."""

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
    self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
    self.prelu = nn.PReLU(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes, 1, stride, bias=False),
          nn.BatchNorm2d(planes, eps=1e-5))

  def forward(self, x):
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    identity = x if self.downsample is None else self.downsample(x)
    return out + identity


class IResNet(nn.Module):
  """arcface_torch's IResNet (dropout 0, float32), channels times
  ``width``: conv3x3, BN, PReLU, four stages each starting at stride 2,
  BN, flatten (C, H, W), dropout, linear, BatchNorm1d whose weight is
  frozen at 1 (``features.weight.requires_grad = False``)."""

  def __init__(self, units, width, num_features):
    super().__init__()
    c = [_channels(n, width) for n in (64, 128, 256, 512)]
    self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c[0], eps=1e-5)
    self.prelu = nn.PReLU(c[0])
    inplanes = c[0]
    for i, (planes, count) in enumerate(zip(c, units), 1):
      blocks = []
      for j in range(count):
        blocks.append(IBasicBlock(inplanes, planes, 2 if j == 0 else 1))
        inplanes = planes
      setattr(self, f'layer{i}', nn.Sequential(*blocks))
    self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
    self.dropout = nn.Dropout(p=0.0)
    self.fc = nn.Linear(inplanes * 7 * 7, num_features)
    self.features = nn.BatchNorm1d(num_features, eps=1e-5)
    nn.init.constant_(self.features.weight, 1.0)
    self.features.weight.requires_grad = False
    for m in self.modules():  # iresnet.py's initialisation
      if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0, 0.1)
      elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = self.dropout(torch.flatten(self.bn2(x), 1))
    return self.features(self.fc(x))


def combined_margin_arcface(cos, labels, s, m):
  """losses.py's CombinedMarginLoss with m1=1, m2=m, m3=0: the target's
  angle moved by m and every logit put back through cos, all under
  no_grad (so the gradient is s for every cosine, the target's included,
  and nothing is done where theta + m > pi), then times s."""
  rows = torch.arange(cos.shape[0])
  with torch.no_grad():
    cos.arccos_()
    cos[rows, labels] += m
    cos.cos_()
  return cos * s


class DistCrossEntropy(torch.autograd.Function):
  """partial_fc_v2.py's DistCrossEntropyFunc on one process: softmax,
  -mean(log(max(p_y, 1e-30))); backward (softmax - one_hot) / B."""

  @staticmethod
  def forward(ctx, logits, labels):
    p = torch.softmax(logits, dim=1)
    ctx.save_for_backward(p, labels)
    p_y = p[torch.arange(p.shape[0]), labels]
    return -p_y.clamp_min(1e-30).log().mean()

  @staticmethod
  def backward(ctx, grad):
    p, labels = ctx.saved_tensors
    g = p.clone()
    g[torch.arange(p.shape[0]), labels] -= 1
    return g / p.shape[0] * grad.item(), None


class PartialFC(nn.Module):
  """PartialFC_V2 at sample rate 1 on one process: weight normal(0,
  0.01), cosines of the normalised embeddings and rows clamped to
  [-1, 1], the margin, the cross-entropy."""

  def __init__(self, embedding_size, num_classes):
    super().__init__()
    self.weight = nn.Parameter(torch.normal(0, 0.01,
                                            (num_classes, embedding_size)))

  def forward(self, embeddings, labels):
    cos = torch.nn.functional.linear(
        torch.nn.functional.normalize(embeddings),
        torch.nn.functional.normalize(self.weight)).clamp(-1, 1)
    return DistCrossEntropy.apply(
        combined_margin_arcface(cos, labels, SCALE, MARGIN), labels)


class TorchRun:
  """train_v2.py's step: forward, backward, clip_grad_norm_ of the
  backbone's gradients at 5, SGD (momentum 0.9, weight decay 5e-4 added to
  every gradient, both param groups), constant learning rate."""

  def __init__(self, seed, dtype=torch.float32, lr=LR):
    torch.manual_seed(seed)
    self.dtype = dtype
    self.backbone = IResNet(UNITS, WIDTH, EMBEDDING).train().to(dtype)
    self.fc = PartialFC(EMBEDDING, CLASSES).train().to(dtype)
    self.opt = torch.optim.SGD(
        [{'params': self.backbone.parameters()},
         {'params': self.fc.parameters()}],
        lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

  def step(self, images, labels):
    loss = self.fc(self.backbone(torch.from_numpy(images).to(self.dtype)),
                   torch.from_numpy(labels))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), CLIP)
    self.opt.step()
    self.opt.zero_grad()
    return loss.item(), norm.item()

  def state(self) -> tuple[dict, np.ndarray]:
    sd = {k: v.detach().numpy().astype(np.float32)
          for k, v in self.backbone.state_dict().items()}
    return sd, self.fc.weight.detach().numpy().astype(np.float32)

  def momentum(self) -> tuple[dict, np.ndarray | None]:
    """SGD's momentum buffers in state-dict names (None before step 1)."""
    names = {id(p): n for n, p in self.backbone.named_parameters()}
    out, fc = {}, None
    for group in self.opt.param_groups:
      for p in group['params']:
        buf = self.opt.state.get(p, {}).get('momentum_buffer')
        if buf is None:
          continue
        if p is self.fc.weight:
          fc = buf.numpy().copy()
        else:
          out[names[id(p)]] = buf.numpy().copy()
    return out, fc


# --- this trainer ---------------------------------------------------------

def our_config(options: dict, lr: float = LR):
  c = default.get_config()
  c.model, c.embedding_dim = 'resnet50', EMBEDDING
  c.model_options.units, c.model_options.width = list(UNITS), WIDTH
  c.head, c.criterion = 'arcface', 'softmax'
  c.head_options.arcface.scale = SCALE
  c.head_options.arcface.margin = MARGIN
  c.batch_size, c.learning_rate, c.lr_boundaries = BATCH, lr, ()
  c.warmup_epochs, c.momentum, c.weight_decay = 0.0, MOMENTUM, WEIGHT_DECAY
  c.grad_clip_norm = CLIP
  for key, value in options.items():
    *path, leaf = key.split('.')
    node = c
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


class JaxRun:
  def __init__(self, config):
    mesh = arrays.make_mesh(1)
    data = data_source.Data(CLASSES, 112, 1000, None)
    self.task = setup.make_task(config, mesh, data)
    target = setup.abstract_state(self.task)
    self.state = setup.init_state(self.task, target)
    self.step_fn = train_step.make_train_step(
        self.task, jax.tree.map(lambda s: s.sharding, target))

  def load(self, sd: dict, fc: np.ndarray, momentum=None) -> None:
    """Our state set to torch's: backbone, classifier rows, and (lock-step)
    SGD's momentum, mapped by the same layout as the weights."""
    variables = _variables(sd, self.backbone_variables())
    s = self.state
    params = dict(s.params, backbone=variables['params'],
                  classifier=jnp.asarray(fc))
    new = s.replace(params=params, batch_stats=variables['batch_stats'])
    if momentum is not None:
      new = new.replace(opt_state=_with_trace(new, sd, *momentum,
                                              self.backbone_variables()))
    self.state = jax.device_put(new, jax.tree.map(lambda x: x.sharding, s))

  def backbone_variables(self) -> dict:
    return {'params': self.state.params['backbone'],
            'batch_stats': self.state.batch_stats}

  def step(self, images, labels) -> tuple[float, float]:
    batch = {'image': jnp.asarray(images.transpose(0, 2, 3, 1)),
             'label': jnp.asarray(labels.astype(np.int32))}
    self.state, metrics = self.step_fn(self.state, batch)
    return float(metrics['loss']), float(metrics['grad_norm'])


def _variables(sd: dict, shapes: dict) -> dict:
  return torch_layouts.to_variables(torch_layouts.detect(sd), shapes)


def _with_trace(state, sd, buffers, fc_buffer, shapes):
  """opt_state with SGD's trace set to torch's momentum buffers (zero for
  a parameter torch has none for: the frozen one)."""
  moment_sd = dict(sd)
  for name in sd:
    if name in buffers:
      moment_sd[name] = buffers[name]
    elif name.endswith(('.weight', '.bias')):
      moment_sd[name] = np.zeros_like(sd[name])
  moments = _variables(moment_sd, shapes)['params']
  flat = {setup.param_name(p): v for p, v in
          jax.tree_util.tree_leaves_with_path(
              {'backbone': moments, 'classifier': fc_buffer})}
  trace = optax.tree_utils.tree_get(state.opt_state, 'trace')
  trace = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(flat[setup.param_name(p)], x.dtype), trace)
  return optax.tree_utils.tree_set(state.opt_state, trace=trace)


# --- the comparison -------------------------------------------------------

def batches(steps: int, seed: int):
  """Fixed random batches: each class a random 112x112 pattern, each
  sample its class's plus noise, in [-1, 1]-ish like normalised pixels."""
  rng = np.random.default_rng(seed)
  protos = rng.uniform(-1, 1, (CLASSES, 3, 112, 112)).astype(np.float32)
  out = []
  for _ in range(steps):
    labels = rng.integers(0, CLASSES, BATCH)
    noise = rng.normal(0, 0.5, (BATCH, 3, 112, 112)).astype(np.float32)
    out.append(((protos[labels] + noise).astype(np.float32),
                labels.astype(np.int64)))
  return out


def rel(a, b) -> float:
  """max |a - b| / max |b|: the largest difference on the tensor's scale."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _flat(run_state: tuple[dict, np.ndarray], shapes: dict) -> dict:
  """A torch state (state dict, classifier) as {name: float64 array} in
  our names."""
  sd, fc = run_state
  variables = torch_layouts.to_variables(
      torch_layouts.detect({k: v.astype(np.float64) if v.dtype.kind == 'f'
                            else v for k, v in sd.items()}), shapes)
  out = {f'{c}/{setup.param_name(p)}': np.asarray(v, np.float64)
         for c in ('params', 'batch_stats')
         for p, v in jax.tree_util.tree_leaves_with_path(variables[c])}
  out['params/classifier'] = np.asarray(fc, np.float64)
  return out


def _ours_flat(ours: JaxRun) -> dict:
  got = jax.device_get(ours.backbone_variables())
  out = {f'{c}/{setup.param_name(p)}': np.asarray(v, np.float64)
         for c in ('params', 'batch_stats')
         for p, v in jax.tree_util.tree_leaves_with_path(got[c])}
  out['params/classifier'] = np.asarray(
      jax.device_get(ours.state.params['classifier']), np.float64)[:CLASSES]
  return out


def _diffs(ours: JaxRun, torch_run: TorchRun) -> tuple[dict, dict]:
  want = _flat(torch_run.state(), ours.backbone_variables())
  got = _ours_flat(ours)
  scale = {k: float(np.max(np.abs(v))) for k, v in want.items()}
  return ({k: float(np.max(np.abs(got[k] - v)) / max(scale[k], 1e-30))
           for k, v in want.items()}, scale)


def run(steps: int, options: dict, lock_step: bool, seed: int = 0,
        float64: bool = False, lr: float = LR) -> dict:
  """Both sides for ``steps`` steps; per step the losses, at the end each
  tensor's largest difference on its own scale (max |ours - torch| /
  max |torch|) and, with ``float64``, torch float32's from torch float64
  (the size of float32 rounding on the same computation)."""
  torch.set_num_threads(2)
  torch_run = TorchRun(seed, lr=lr)
  ref = TorchRun(seed, torch.float64, lr) if float64 else None
  ours = JaxRun(our_config(options, lr))
  ours.load(*torch_run.state())
  rows = []
  for i, (images, labels) in enumerate(batches(steps, seed + 1)):
    if lock_step and i:
      ours.load(*torch_run.state(), momentum=torch_run.momentum())
    t_loss, t_norm = torch_run.step(images, labels)
    j_loss, _ = ours.step(images, labels)
    row = {'step': i + 1, 'torch_loss': t_loss, 'jax_loss': j_loss,
           'rel': abs(j_loss - t_loss) / abs(t_loss),
           'torch_backbone_grad_norm': t_norm}
    if ref is not None:
      r_loss, _ = ref.step(images, labels)
      row['torch64_loss'] = r_loss
      row['rel_torch32_torch64'] = abs(t_loss - r_loss) / abs(r_loss)
    if lock_step:  # this step's parameters, from the same start
      diffs, scale = _diffs(ours, torch_run)
      real = {k: v for k, v in diffs.items() if scale[k] >= NOISE}
      row['params_worst'] = max(real, key=real.get)
      row['params_rel_max'] = real[row['params_worst']]
    rows.append(row)
  shapes = ours.backbone_variables()
  diffs, scale = _diffs(ours, torch_run)
  out = {'rows': rows, 'diffs': diffs, 'abs_max': scale}
  if ref is not None:
    want, exact = _flat(torch_run.state(), shapes), _flat(ref.state(), shapes)
    out['diffs_torch32_torch64'] = {
        k: float(np.max(np.abs(v - exact[k])) / max(scale[k], 1e-30))
        for k, v in want.items()}
  return out


def _summary(name: str, result: dict, limit: float = 1e-4) -> dict:
  """The run's numbers. Tensors are compared apart where they are zero in
  exact arithmetic (NOISE); 'above_limit' lists each other tensor whose
  difference from torch float32 is above ``limit``, beside torch float32's
  own from float64 on the same tensor when that was run."""
  rows, diffs, scale = result['rows'], result['diffs'], result['abs_max']
  exact = result.get('diffs_torch32_torch64', {})
  real = {k: v for k, v in diffs.items() if scale[k] >= NOISE}
  noise = sorted(k for k in diffs if scale[k] < NOISE)
  out = {
      'run': name, 'steps': len(rows),
      'loss_first_last': [rows[0]['torch_loss'], rows[-1]['torch_loss']],
      'loss_rel_max': max(r['rel'] for r in rows),
      'loss_rel_first_10_steps': max(r['rel'] for r in rows[:10]),
      'params_rel_max': max(v for k, v in real.items()
                            if k.startswith('params/')),
      'batch_stats_rel_max': max(v for k, v in real.items()
                                 if k.startswith('batch_stats/')),
      'zero_in_exact_arithmetic': {
          'tensors': len(noise),
          'largest_abs_value': max((scale[k] for k in noise), default=0.0)},
      'clipped_steps': sum(r['torch_backbone_grad_norm'] > CLIP
                           for r in rows),
      'above_limit': {k: {'ours_vs_torch32': v,
                          'torch32_vs_torch64': exact.get(k)}
                      for k, v in sorted(real.items()) if v > limit},
  }
  if 'params_rel_max' in rows[0]:
    out['params_rel_max_any_step'] = max(r['params_rel_max'] for r in rows)
  if exact:
    out['loss_rel_torch32_torch64_max'] = max(r['rel_torch32_torch64']
                                              for r in rows)
    for kind in ('params', 'batch_stats'):
      out[f'{kind}_rel_torch32_torch64_max'] = max(
          v for k, v in exact.items()
          if k.startswith(kind + '/') and scale[k] >= NOISE)
  print(json.dumps(out, indent=1), flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--per-step', action='store_true',
                      help='print each step\'s losses')
  parser.add_argument('--defaults', action='store_true',
                      help='also run with each arcface_torch option off')
  parser.add_argument('--gentle-lr', type=float, default=1e-3,
                      help='the second free-running comparison\'s rate')
  parser.add_argument('--out', default='', help='write the results as JSON')
  args = parser.parse_args()
  print(f'torch {torch.__version__}, jax {jax.__version__} '
        f'({jax.default_backend()}), float32, {args.steps} steps of '
        f'{BATCH} at 112x112, {CLASSES} classes, iresnet units {UNITS} '
        f'width {WIDTH}, embedding {EMBEDDING}', flush=True)
  results = {}
  t0 = time.time()
  runs = [('lock-step', True, LR), ('free-running', False, LR),
          (f'free-running lr {args.gentle_lr:g}', False, args.gentle_lr)]
  for name, lock, lr in runs:
    result = run(args.steps, ARCFACE_TORCH, lock, float64=not lock, lr=lr)
    if args.per_step:
      for r in result['rows']:
        f64 = (f" (torch32 vs 64: {r['rel_torch32_torch64']:.2e})"
               if 'torch64_loss' in r else '')
        print(f"  {name} step {r['step']:3d}: torch {r['torch_loss']:.7f} "
              f"ours {r['jax_loss']:.7f} rel {r['rel']:.2e}{f64} "
              f"|g_backbone| {r['torch_backbone_grad_norm']:.3f}")
    results[name] = {**_summary(name, result), 'rows': result['rows'],
                     'diffs': result['diffs'],
                     'diffs_torch32_torch64': result.get(
                         'diffs_torch32_torch64')}
  if args.defaults:
    for key in ARCFACE_TORCH:
      options = dict(ARCFACE_TORCH)
      options.pop(key)
      results[f'lock-step without {key}'] = _summary(
          f'lock-step without {key}', run(args.steps, options, True))
  print(f'{time.time() - t0:.0f} s', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
