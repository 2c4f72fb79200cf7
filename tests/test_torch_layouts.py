"""Released PyTorch networks onto our backbones (foreign/torch_layouts):
each layout, made at random in its own names (tests/released_nets.py),
is recognised with its variant, put onto the backbone those options
build, and computes what a float64 NumPy forward of the source
architecture computes (foreign/reference_nets); names and shapes that do
not fit are refused naming the layer and both shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npcface_jax import models
from npcface_jax.foreign import reference_nets, torch_layouts
from tests import released_nets
from tests.helpers import fresh_rng


_SHAPES = {}


def _variables(layout, x):
  model = models.create(layout.model, embedding_dim=layout.embedding_dim,
                        **layout.options)
  key = (repr(model), x.shape)
  if key not in _SHAPES:
    _SHAPES[key] = jax.eval_shape(lambda: model.init(jax.random.key(0), x,
                                                     train=False))
  return model, torch_layouts.to_variables(layout, _SHAPES[key])


def _flax_embeddings(layout, images_nchw):
  x = jnp.asarray(images_nchw.transpose(0, 2, 3, 1), jnp.float32)
  model, variables = _variables(layout, x)
  return np.asarray(model.apply(variables, x, train=False), np.float64)


def _reference(layout, images_nchw):
  forward = (reference_nets.mobilefacenet if layout.model == 'mobilefacenet'
             else reference_nets.iresnet)
  sd = {n: np.asarray(v, np.float64) for n, v in layout.tensors.items()}
  return forward(sd, images_nchw.astype(np.float64))


def _cosines(a, b):
  return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


CASES = {
    'arcface_torch iresnet': (
        lambda r: released_nets.arcface_iresnet(r, (2, 1, 1, 1)),
        'resnet50', {'units': [2, 1, 1, 1], 'width': 0.125}),
    'arcface_torch iresnet18': (
        lambda r: released_nets.arcface_iresnet(r, (2, 2, 2, 2), dim=128),
        'resnet18', {'width': 0.125}),
    'FaceX-Zoo IR-SE': (
        lambda r: {f'backbone.{n}': v for n, v in released_nets.evolve_ir(
            r, (1, 2, 1, 1), se=True, width=0.25).items()},
        'resnet50', {'units': [1, 2, 1, 1], 'width': 0.25, 'se': True,
                     'shortcut': 'subsample', 'middle_bn': False}),
    'AdaFace IR': (
        lambda r: {**{f'model.{n}': v for n, v in released_nets.evolve_ir(
            r, (2, 1, 1, 1), middle_bn=True, output_affine=False).items()},
                   'head.kernel': np.ones((64, 10), 'f4')},
        'resnet50', {'units': [2, 1, 1, 1], 'width': 0.125,
                     'shortcut': 'subsample'}),
    'FaceX-Zoo MobileFaceNet': (
        lambda r: released_nets.mobilefacenet(r, blocks=(1, 2, 1, 1)),
        'mobilefacenet', {'width': 0.25, 'blocks': [1, 2, 1, 1]}),
    'arcface_torch mbf': (
        lambda r: released_nets.mobilefacenet(
            r, scale=2, stem_groups=16, arcface_torch=True,
            blocks=(1, 1, 2, 1)),
        'mobilefacenet', {'width': 0.25, 'stem': 128, 'stem_groups': 16,
                          'stages': [128, 256, 256], 'blocks': [1, 1, 2, 1]}),
    'arcface_torch mbf_large': (
        lambda r: released_nets.mobilefacenet(
            r, scale=4, blocks=(2, 1, 1, 1), arcface_torch=True,
            fc_bias=True),
        'mobilefacenet', {'width': 0.25, 'stem': 256,
                          'stages': [256, 512, 512], 'blocks': [2, 1, 1, 1],
                          'fc_bias': True}),
}


# The quick tier runs one layout of each architecture and source; the
# full suite all of them.
QUICK = ('arcface_torch iresnet', 'AdaFace IR', 'arcface_torch mbf')


@pytest.mark.parametrize('case', [
    c if c in QUICK else pytest.param(c, marks=pytest.mark.slow)
    for c in CASES])
def test_each_layout_computes_the_sources_forward(case):
  """Recognised with its variant, and the Flax backbone's embeddings equal
  the source architecture's in float64 to a cosine of 0.99999 (float32
  rounding) on fresh random faces, in eval mode."""
  make, model, options = CASES[case]
  rng, _ = fresh_rng()
  tensors = make(rng)
  layout = torch_layouts.detect(tensors)
  assert (layout.model, layout.options) == (model, options)
  assert layout.left_out == (['head.kernel'] if case == 'AdaFace IR' else [])
  images = rng.normal(size=(3, 3, 112, 112))
  got, want = _flax_embeddings(layout, images), _reference(layout, images)
  assert want.shape == got.shape == (3, layout.embedding_dim)
  assert _cosines(got, want).min() > 0.99999, _cosines(got, want)
  np.testing.assert_allclose(got, want, rtol=2e-3,
                             atol=2e-3 * np.abs(want).max())


def test_a_wrong_shape_names_the_layer_and_both_shapes():
  rng, _ = fresh_rng()
  tensors = released_nets.arcface_iresnet(rng)
  tensors['layer2.0.conv2.weight'] = tensors['layer2.0.conv2.weight'][:, :8]
  layout = torch_layouts.detect(tensors)
  with pytest.raises(torch_layouts.LayoutError,
                     match=r'layer2\.0\.conv2 gives params _Unit_1/Conv_1/'
                     r'kernel the shape \(3, 3, 8, 16\); resnet50 needs '
                     r'\(3, 3, 16, 16\)'):
    _flax_embeddings(layout, np.zeros((1, 3, 112, 112)))


def test_missing_and_unused_layers_are_named():
  rng, _ = fresh_rng()
  tensors = released_nets.arcface_iresnet(rng)
  del tensors['layer3.0.prelu.weight']
  with pytest.raises(torch_layouts.LayoutError,
                     match=r"the layer 'layer3\.0\.prelu' is missing"):
    _flax_embeddings(torch_layouts.detect(tensors),
                     np.zeros((1, 3, 112, 112)))
  tensors = released_nets.arcface_iresnet(rng)
  tensors['layer1.0.extra.weight'] = np.ones(3, 'f4')
  with pytest.raises(torch_layouts.LayoutError,
                     match=r"unused tensors \['layer1\.0\.extra\.weight'\]"):
    _flax_embeddings(torch_layouts.detect(tensors),
                     np.zeros((1, 3, 112, 112)))


def test_unknown_or_ambiguous_checkpoints_are_refused():
  with pytest.raises(torch_layouts.LayoutError,
                     match='does not hold one backbone this project knows: '
                     'found none of arcface_torch iresnet'):
    torch_layouts.detect({'encoder.weight': np.ones(3)})
  rng, _ = fresh_rng()
  two = {**{f'a.{n}': v for n, v in released_nets.arcface_iresnet(
      rng).items()}, **{f'b.{n}': v for n, v in released_nets.arcface_iresnet(
          rng).items()}}
  with pytest.raises(torch_layouts.LayoutError,
                     match="arcface_torch iresnet under 'a.', arcface_torch "
                     "iresnet under 'b.'"):
    torch_layouts.detect(two)


def test_reference_conv_is_pytorchs_convolution():
  """The NumPy reference's grouped, strided, padded convolution against
  explicit loops over its definition (out[o, y, x] = sum over the group's
  input channels and the window), on fresh inputs."""
  rng, _ = fresh_rng()
  x = rng.normal(size=(1, 4, 7, 7))
  w = rng.normal(size=(6, 2, 3, 3))  # 2 groups
  got = reference_nets.conv2d(x, w, stride=2, pad=1)
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  want = np.zeros((1, 6, 4, 4))
  for o in range(6):
    g = o // 3
    for y in range(4):
      for z in range(4):
        want[0, o, y, z] = (xp[0, 2 * g:2 * g + 2, 2 * y:2 * y + 3,
                               2 * z:2 * z + 3] * w[o]).sum()
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize('case', CASES)
def test_damaged_state_dicts_are_refused_by_name(case):
  """A layer dropped, renamed or reshaped at random, 30 times per layout:
  the import either still fits (a dropped num_batches_tracked) or stops
  with a LayoutError, never another exception."""
  make = CASES[case][0]
  rng, _ = fresh_rng()
  base = make(rng)
  for _ in range(30):
    tensors = dict(base)
    name = list(tensors)[rng.integers(len(tensors))]
    how = rng.integers(3)
    if how == 0:
      del tensors[name]
    elif how == 1:
      tensors[name.replace('.', '.x', 1)] = tensors.pop(name)
    else:
      v = tensors[name]
      tensors[name] = np.ones((v.shape[0] + 1,) + v.shape[1:], 'f4') if (
          v.ndim) else np.ones(2, 'f4')
    try:
      _variables(torch_layouts.detect(tensors),
                 jnp.zeros((1, 112, 112, 3)))
    except torch_layouts.LayoutError:
      pass
