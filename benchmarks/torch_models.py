"""PyTorch twins of our MobileFaceNet and ResNet-IR (the structure of
npcface_jax/models/), for the side-by-side benchmarks (backbone_bench.py on
the CPU, gpu_train_bench.py on a GPU). torch is imported only when one is
built."""

from __future__ import annotations

EMBEDDING = 512
IMAGE = 112


def _channels(n: int, width: float) -> int:
  """mobilefacenet.py's channel rounding (exact at width 1)."""
  return max(8, int(n * width / 8 + 0.5) * 8)


def torch_network(model: str, options: dict):
  """MobileFaceNet or ResNet-IR in PyTorch, the structure of models/."""
  from torch import nn  # noqa: PLC0415

  def conv_bn(cin, cout, k=1, s=1, groups=1, linear=False, padding=None):
    pad = k // 2 if padding is None else padding
    layers = [nn.Conv2d(cin, cout, k, s, pad, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([] if linear else [nn.PReLU(cout)]))

  class Bottleneck(nn.Module):
    def __init__(self, cin, cout, expansion, stride, residual):
      super().__init__()
      self.residual = residual
      self.body = nn.Sequential(
          conv_bn(cin, expansion),
          conv_bn(expansion, expansion, 3, stride, groups=expansion),
          conv_bn(expansion, cout, linear=True))

    def forward(self, x):
      return x + self.body(x) if self.residual else self.body(x)

  def mobilefacenet(width=1.0):
    def c(n):
      return _channels(n, width)

    layers = [conv_bn(3, c(64), 3, 2), conv_bn(c(64), c(64), 3, groups=c(64))]
    cin = c(64)
    for features, down, expansion, repeats in ((64, 128, 128, 4),
                                               (128, 256, 256, 6),
                                               (128, 512, 256, 2)):
      layers.append(Bottleneck(cin, c(features), c(down), 2, False))
      layers += [Bottleneck(c(features), c(features), c(expansion), 1, True)
                 for _ in range(repeats)]
      cin = c(features)
    layers += [conv_bn(cin, c(512)),
               conv_bn(c(512), c(512), IMAGE // 16, groups=c(512),
                       linear=True, padding=0),
               nn.Flatten(), nn.Linear(c(512), EMBEDDING, bias=False),
               nn.BatchNorm1d(EMBEDDING)]
    return nn.Sequential(*layers)

  class Unit(nn.Module):
    """insightface's IBasicBlock: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.body = nn.Sequential(
          nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
          nn.BatchNorm2d(cout), nn.PReLU(cout),
          nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
      self.shortcut = (
          nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                        nn.BatchNorm2d(cout))
          if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      return self.shortcut(x) + self.body(x)

  def iresnet(units=(3, 4, 14, 3)):
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
              nn.PReLU(64)]
    cin = 64
    for features, count in zip((64, 128, 256, 512), units):
      for i in range(count):
        layers.append(Unit(cin, features, 2 if i == 0 else 1))
        cin = features
    layers += [nn.BatchNorm2d(512), nn.Dropout(0.0), nn.Flatten(),
               nn.Linear(512 * (IMAGE // 16) ** 2, EMBEDDING),
               nn.BatchNorm1d(EMBEDDING)]
    return nn.Sequential(*layers)

  if model == 'mobilefacenet':
    return mobilefacenet(**options)
  if model == 'resnet50':
    return iresnet(**options)
  raise ValueError(f'no PyTorch {model}')
