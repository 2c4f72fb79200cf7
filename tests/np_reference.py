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


# --------------------------------------------------------------------------
# The heads after the NPCFace paper (AdaFace, MagFace, ElasticFace,
# SphereFace2, UniFace), each from its own paper (and, where the paper
# leaves a detail open, its official code, as named).
# --------------------------------------------------------------------------


def softplus(x):
  """log(1 + exp(x)) in float64, exact at -inf (0) and for large x."""
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def embedding_cosines(x, w):
  """cos (B, C) between the rows of x and of w, and the norms ||x_i||."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  norms = np.sqrt(np.sum(x * x, axis=1))
  wn = w / np.sqrt(np.sum(w * w, axis=1))[:, None]
  return (x / norms[:, None]) @ wn.T, norms


def adaface_statistics(norms, mean_prev, std_prev, momentum=0.01):
  """AdaFace's running statistics, updated before use: the clipped norms
  n_i = clip(||x_i||, 0.001, 100) and mu' = a mean(n) + (1 - a) mu,
  sigma' = a std(n, unbiased) + (1 - a) sigma."""
  n = np.clip(np.asarray(norms, np.float64), 0.001, 100.0)
  mean = momentum * np.mean(n) + (1.0 - momentum) * mean_prev
  std = momentum * np.std(n, ddof=1) + (1.0 - momentum) * std_prev
  return n, mean, std


def adaface(cos, labels, norms, mean_prev, std_prev, s=64.0, m=0.4, h=0.333,
            momentum=0.01, eps=1e-3, frozen=None):
  """AdaFace (Kim et al., CVPR 2022, eqs. 11-13), one sample at a time:
  z_i = clip(h (n_i - mu') / (sigma' + eps), -1, 1), g_angle = -m z_i,
  g_add = m + m z_i; the target s (cos(clip(arccos(clip(c_y, -1 + eps,
  1 - eps)) + g_angle, eps, pi - eps)) - g_add), the others s cos.
  ``frozen``: z (and the statistics), constant for the gradient."""
  cos = np.asarray(cos, np.float64)
  if frozen is None:
    n, mean, std = adaface_statistics(norms, mean_prev, std_prev, momentum)
    z = np.clip(h * (n - mean) / (std + eps), -1.0, 1.0)
    frozen = {'z': z, 'mean': mean, 'std': std, 'norm': n}
  z = frozen['z']
  out = cos.copy()
  for i, y in enumerate(labels):
    c = min(max(cos[i, y], -1.0 + eps), 1.0 - eps)
    angle = np.arccos(c) + (-m * z[i])
    angle = min(max(angle, eps), np.pi - eps)
    out[i, y] = np.cos(angle) - (m + m * z[i])
  return s * out, frozen


def magface_margin(norms, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8):
  """MagFace's a = clip(||x||, l_a, u_a) and its linear margin m(a)."""
  a = np.clip(np.asarray(norms, np.float64), l_a, u_a)
  return a, l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)


def magface_regulariser(norms, l_a=10.0, u_a=110.0, lambda_g=35.0):
  """lambda_g * mean g(a), g(a) = 1/a + a/u_a^2 (MagFace eq. 5)."""
  a = np.clip(np.asarray(norms, np.float64), l_a, u_a)
  return lambda_g * np.mean(1.0 / a + a / u_a ** 2)


def magface(cos, labels, norms, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45,
            u_m=0.8, easy_margin=False, frozen=None):
  """MagFace (Meng et al., CVPR 2021): the target s cos(theta_y + m(a_i))
  (ArcFace's fallback cos_y - m sin m past pi), the others s cos.
  ``frozen``: which samples take the fallback."""
  cos = np.asarray(cos, np.float64)
  _, margin = magface_margin(norms, l_a, u_a, l_m, u_m)
  idx = np.arange(len(labels))
  out = cos.copy()
  fb = None if frozen is None else frozen['fallback']
  out[idx, labels], fb = arc_positive(cos[idx, labels], margin, easy_margin,
                                      fb)
  return s * out, {'fallback': fb, 'margin': margin}


def magface_total(x, w, labels, s=64.0, lambda_g=35.0, frozen=None):
  """MagFace's loss from the raw embeddings: mean cross-entropy plus the
  regulariser, the norms moving both (what the gradient must see)."""
  cos, norms = embedding_cosines(x, w)
  logits, frozen = magface(cos, labels, norms, s=s, frozen=frozen)
  return (np.mean(cross_entropy(logits, labels))
          + magface_regulariser(norms, lambda_g=lambda_g)), frozen


def elastic_by_difficulty(drawn, cos_target):
  """ElasticFace+'s assignment, from the paper's words: the drawn margins
  sorted ascending, the k-th smallest to the sample with the k-th largest
  target cosine (the easiest sample gets the smallest margin)."""
  drawn = np.sort(np.asarray(drawn, np.float64))
  c = np.asarray(cos_target, np.float64)
  out = np.empty_like(drawn)
  for i in range(len(c)):
    rank = int(np.sum(c > c[i]) + np.sum(c[:i] == c[i]))  # ties in order
    out[i] = drawn[rank]
  return out


def elasticface(cos, labels, margins, s=64.0, angular=True):
  """ElasticFace (Boutros et al., CVPRW 2022) given each sample's margin:
  the target s cos(theta_y + m_i) (angular, no fallback: the angle may
  pass pi) or s (cos_y - m_i); the others s cos."""
  cos = np.asarray(cos, np.float64)
  idx = np.arange(len(labels))
  out = cos.copy()
  c_y = cos[idx, labels]
  m = np.asarray(margins, np.float64)
  if angular:
    out[idx, labels] = np.cos(np.arccos(np.clip(c_y, -1.0, 1.0)) + m)
  else:
    out[idx, labels] = c_y - m
  return s * out, {}


def sphereface2_bias(num_classes, r=40.0, m=0.4, t=3.0, lam=0.7):
  """SphereFace2-C's initial bias as its official code computes it."""
  z = lam / ((1.0 - lam) * (num_classes - 1.0))
  a_y = r * (2.0 * 0.5 ** t - 1.0 - m)
  a_i = r * (2.0 * 0.5 ** t - 1.0 + m)
  return (np.log(2.0 * z) - a_i
          - np.log(1.0 - z + np.sqrt((1.0 - z) ** 2
                                     + 4.0 * z * np.exp(a_y - a_i))))


def sphereface2(cos, labels, bias, r=40.0, m=0.4, t=3.0,
                straight_through=True, frozen=None):
  """SphereFace2-C (Wen et al., ICLR 2022, eqs. 5-10): with
  g(c) = 2 ((c + 1)/2)^t - 1, z_y = r (g(c_y) - m) + b and
  z_j = r (g(c_j) + m) + b. ``straight_through`` (the official code):
  z = r (c + d) + b with d = g -+ m - c computed without gradient, which
  ``frozen`` holds, so the gradient in c is r."""
  cos = np.asarray(cos, np.float64)
  sign = np.where(onehot(labels, cos.shape[1]), -1.0, 1.0)
  adjusted = 2.0 * ((cos + 1.0) / 2.0) ** t - 1.0 + sign * m
  if frozen is None:
    frozen = {'d': adjusted - cos}
  if straight_through:
    return r * (cos + frozen['d']) + bias, frozen
  return r * adjusted + bias, frozen


def sphereface2_loss(logits, labels, r=40.0, lam=0.7, loss_weight=50.0):
  """Per sample (lw / r) [lam log(1 + exp(-z_y)) + (1 - lam) sum_{j != y}
  log(1 + exp(z_j))] (the official code's weighted BCE, its mean over
  B x C times lw C / r); -inf logits (padding) add nothing."""
  z = np.asarray(logits, np.float64)
  pos = onehot(labels, z.shape[1])
  neg = np.where(pos, 0.0, softplus(np.where(pos, 0.0, z))).sum(axis=1)
  return (loss_weight / r) * (lam * softplus(-z[pos]) + (1.0 - lam) * neg)


def uniface_bias(num_classes, r=1.0):
  return np.log(10.0 * r * num_classes)


def uniface(cos, labels, bias, s=64.0, m=0.4, frozen=None):
  """UniFace (Zhou et al., ICCV 2023), UCE with margin: z_y = s (c_y - m)
  - b, z_j = s c_j - b."""
  cos = np.asarray(cos, np.float64)
  margin = np.where(onehot(labels, cos.shape[1]), m, 0.0)
  return s * (cos - margin) - bias, {}


def uniface_loss(logits, labels, lam=1.0):
  """Per sample log(1 + exp(-z_y)) + lam sum_{j != y} log(1 + exp(z_j))."""
  z = np.asarray(logits, np.float64)
  pos = onehot(labels, z.shape[1])
  neg = np.where(pos, 0.0, softplus(np.where(pos, 0.0, z))).sum(axis=1)
  return softplus(-z[pos]) + lam * neg
