"""Independent float64 NumPy references, written from the papers' equations
(NPCFace and each comparison head's own paper), never by calling npcface_jax.

Angles are taken literally with arccos and cos(theta + m) rather than the
angle-sum identity the JAX code uses. Every head returns the logits and the
pieces that the JAX code holds constant for the gradient (``frozen``): finite
differences pass them back in so that only the differentiable part moves.
"""

import numpy as np


def onehot(labels, num_classes):
  return np.eye(num_classes, dtype=bool)[labels]


def arc_positive(c_y, m, easy_margin=False, fallback=None):
  """cos(theta_y + m), or cos_y - m sin m where theta_y + m > pi."""
  theta = np.arccos(np.clip(c_y, -1, 1))
  if fallback is None:
    fallback = theta + m > np.pi
  if easy_margin:
    return np.where(c_y > 0, np.cos(theta + m), c_y), fallback
  return np.where(fallback, c_y - m * np.sin(m), np.cos(theta + m)), fallback


def npcface(cos, labels, s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.25,
            hard_margin=None, easy_margin=False, frozen=None):
  """Eqs. 10-12 of the NPCFace paper, one sample at a time."""
  cos = np.asarray(cos, np.float64)
  mh = m0 if hard_margin is None else hard_margin
  B, C = cos.shape
  out = np.empty_like(cos)
  hard_all, margins, counts, fallbacks = [], [], [], []
  for i in range(B):
    y = labels[i]
    c_y = cos[i, y]
    if frozen is None:
      threshold = np.cos(np.arccos(c_y) + mh)
      hard = np.array([j != y and cos[i, j] > threshold for j in range(C)])
      n = hard.sum()
      m = m0 + m1 * cos[i, hard].mean() if n > 0 else m0
      fb = None
    else:
      hard, m = frozen['hard'][i], frozen['margin'][i]
      fb = frozen['fallback'][i]
      n = hard.sum()
    pos, fb = arc_positive(c_y, m, easy_margin, fb)
    row = np.where(hard, t * cos[i] + alpha, cos[i])
    row[y] = pos
    out[i] = s * row
    hard_all.append(hard)
    margins.append(m)
    counts.append(n)
    fallbacks.append(fb)
  frozen = {'hard': np.array(hard_all), 'margin': np.array(margins),
            'fallback': np.array(fallbacks)}
  return out, frozen, np.array(counts)


def arcface(cos, labels, s=64.0, m=0.5, easy_margin=False, frozen=None):
  cos = np.asarray(cos, np.float64)
  out = cos.copy()
  idx = np.arange(len(labels))
  fb = None if frozen is None else frozen['fallback']
  pos, fb = arc_positive(cos[idx, labels], m, easy_margin, fb)
  out[idx, labels] = pos
  return s * out, {'fallback': fb}


def cosface(cos, labels, s=64.0, m=0.35, frozen=None):
  out = np.asarray(cos, np.float64).copy()
  out[np.arange(len(labels)), labels] -= m
  return s * out, {}


def softmax(cos, labels, s=64.0, frozen=None):
  return s * np.asarray(cos, np.float64), {}


def sphereface_lambda(step, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0):
  return max(lambda_min, base * (1 + gamma * step) ** (-power))


def sphereface(cos, labels, step, s=64.0, m=4, frozen=None):
  cos = np.asarray(cos, np.float64)
  lam = sphereface_lambda(step)
  out = cos.copy()
  for i, y in enumerate(labels):
    theta = np.arccos(cos[i, y])
    k = frozen['k'][i] if frozen else min(np.floor(m * theta / np.pi), m - 1)
    psi = (-1) ** k * np.cos(m * theta) - 2 * k
    out[i, y] = (lam * cos[i, y] + psi) / (1 + lam)
  ks = [min(np.floor(m * np.arccos(cos[i, y]) / np.pi), m - 1)
        for i, y in enumerate(labels)]
  return s * out, {'k': np.array(ks) if frozen is None else frozen['k']}


def adacos(cos, labels, s_prev):
  cos = np.asarray(cos, np.float64)
  B, C = cos.shape
  oh = onehot(labels, C)
  b_avg = np.sum(np.exp(s_prev * cos[~oh])) / B
  theta_med = np.median(np.arccos(cos[oh]))
  s_new = np.log(b_avg) / np.cos(min(np.pi / 4, theta_med))
  return s_new * cos, s_new


def adam_softmax(cos, labels, margins, s=64.0, lam=70.0):
  out = np.asarray(cos, np.float64).copy()
  idx = np.arange(len(labels))
  out[idx, labels] -= margins[labels]
  return s * out, -lam * np.mean(margins)


def mv_softmax(cos, labels, s=64.0, m=0.35, t=1.2, arc=False, frozen=None):
  cos = np.asarray(cos, np.float64)
  B, C = cos.shape
  out = cos.copy()
  hards, fbs = [], []
  for i, y in enumerate(labels):
    c_y = cos[i, y]
    if frozen is None:
      thr = np.cos(np.arccos(c_y) + m) if arc else c_y - m
      hard = (cos[i] > thr) & (np.arange(C) != y)
      fb = None
    else:
      hard, fb = frozen['hard'][i], frozen['fallback'][i]
    out[i] = np.where(hard, t * cos[i] + t - 1, cos[i])
    if arc:
      out[i, y], fb = arc_positive(c_y, m, fallback=fb)
    else:
      out[i, y] = c_y - m
    hards.append(hard)
    fbs.append(fb)
  return s * out, {'hard': np.array(hards), 'fallback': np.array(fbs)}


def arcnegface(cos, labels, s=64.0, m=0.5, a=1.2, sigma=2.0, frozen=None):
  cos = np.asarray(cos, np.float64)
  out = cos.copy()
  gs, fbs = [], []
  for i, y in enumerate(labels):
    c_y = cos[i, y]
    if frozen is None:
      g = a * np.exp(-(cos[i] - np.cos(np.arccos(c_y) + m)) ** 2 / sigma)
      fb = None
    else:
      g, fb = frozen['g'][i], frozen['fallback'][i]
    out[i] = g * cos[i] + g - 1
    out[i, y], fb = arc_positive(c_y, m, fallback=fb)
    gs.append(g)
    fbs.append(fb)
  return s * out, {'g': np.array(gs), 'fallback': np.array(fbs)}


def curricularface(cos, labels, t_prev, s=64.0, m=0.5, momentum=0.01,
                   frozen=None):
  cos = np.asarray(cos, np.float64)
  B, C = cos.shape
  idx = np.arange(B)
  c_y = cos[idx, labels]
  if frozen is None:
    t = momentum * c_y.mean() + (1 - momentum) * t_prev
    thr = np.cos(np.arccos(c_y) + m)
    hard = (cos > thr[:, None]) & ~onehot(labels, C)
    fb = None
  else:
    t, hard, fb = frozen['t'], frozen['hard'], frozen['fallback']
  out = np.where(hard, cos * (t + cos), cos)
  out[idx, labels], fb = arc_positive(c_y, m, fallback=fb)
  return s * out, {'t': t, 'hard': hard, 'fallback': fb}


def cross_entropy(logits, labels):
  """Per-sample -log softmax(logits)[y], float64, -inf logits allowed."""
  z = np.asarray(logits, np.float64)
  zmax = z.max(axis=1, keepdims=True)
  lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
  return lse - z[np.arange(len(labels)), labels]


def focal(logits, labels, gamma=2.0):
  ce = cross_entropy(logits, labels)
  p = np.exp(-ce)
  return np.mean(-(1 - p) ** gamma * np.log(p))


def ohem(logits, labels, keep_fraction=0.7):
  ce = cross_entropy(logits, labels)
  k = max(1, int(np.ceil(keep_fraction * len(ce))))
  return np.sort(ce)[::-1][:k].mean()


def central_difference(f, x, h=1e-6):
  """df/dx of a scalar float64 function, elementwise."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    grad[idx] = (f(xp) - f(xm)) / (2 * h)
  return grad
