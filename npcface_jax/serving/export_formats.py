"""What an exported model computes, and the formats that carry it.

The serving function takes uint8 RGB faces (batch, S, S, 3), aligned to the
5-point template at the run's image size, and returns L2-normalised
float32 embeddings (batch, D): pixels are normalised inside the graph
(images.normalize), the backbone runs in inference mode with the run's
BatchNorm statistics, and with ``flip`` each face's mirror image is added
before normalising, as the evaluation embedder does. With ``with_norm`` it
also returns ``norm``, float32 (batch,): each face's raw embedding norm
(the backbone's output before normalising; with flip the mean of the
face's and its mirror's, as embedding_step.Embedder), a quality score
for heads that train it (MagFace, AdaFace); every format carries it. The
batch is dynamic in every format. The backbone is traced with its native
convolutions (layers.py's CPU formulations are a speed trick of XLA's CPU
backend).

Formats, each written by ``write`` and run back in its own runtime by
``load`` (the parity check and ``export --check`` use these):
  savedmodel  jax2tf's native serialisation (an XlaCallModule op, lowered
              for CPU, CUDA and TPU): TF and TF Serving run it; tf2onnx and
              the TFLite converter cannot read it.
  onnx        onnx_graph's translation of the jaxpr, opset 17, run with
              onnxruntime.
  tflite      jax2tf's graph serialisation (plain TensorFlow ops) through
              the TFLite converter, float32. JAX deprecates that
              serialisation; where a JAX no longer has it, this format fails
              saying so (export --formats=savedmodel,onnx leaves it out).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from npcface_jax.common.arrays import l2_normalize, row_norms
from npcface_jax.faces.images import InputContract, normalize

FORMATS = ('savedmodel', 'onnx', 'tflite')
FILES = {'savedmodel': 'saved_model', 'onnx': 'model.onnx',
         'tflite': 'model.tflite'}
INPUT, OUTPUT, NORM = 'images', 'embeddings', 'norm'
INSTALL = 'pip install "npcface_jax[export]"'
SAVEDMODEL_PLATFORMS = ('cpu', 'cuda', 'tpu')


class MissingExtra(ImportError):
  """An optional package an export format needs is not installed."""


def require_onnx():
  """onnxruntime, or MissingExtra naming the install line."""
  try:
    import onnx  # noqa: PLC0415, F401 (an optional extra)
    import onnxruntime  # noqa: PLC0415 (an optional extra)
  except ImportError as e:
    raise MissingExtra(f'the onnx format needs onnx and onnxruntime ({e}); '
                       f'install them with: {INSTALL}') from None
  return onnxruntime


def serving_function(module, variables, flip: bool,
                     contract: InputContract | None = None,
                     with_norm: bool = False) -> Callable:
  """uint8 RGB faces (B, S, S, 3) -> L2-normalised float32 embeddings (B,
  D), and with ``with_norm`` (embeddings, raw norms (B,)); the run's
  input contract (a BGR network's channel swap included) is inside the
  graph."""
  if hasattr(module, 'impl'):
    module = module.clone(impl='native')
  variables = jax.device_get(variables)
  contract = contract or InputContract()
  bgr = contract.channels == 'BGR'
  # The channels reversed by lax.rev (a reversing slice lowers to a gather,
  # which the ONNX translation does not take), then normalised as RGB.
  rgb = contract._replace(channels='RGB')

  def embed(images):
    x = images.astype(jnp.float32)
    x = normalize(lax.rev(x, (3,)) if bgr else x, rgb)
    e = module.apply(variables, x, train=False)
    norm = row_norms(e) if with_norm else None
    if flip:
      mirror = module.apply(variables, lax.rev(x, (2,)), train=False)
      if with_norm:
        norm = 0.5 * (norm + row_norms(mirror))
      e = e + mirror
    unit = l2_normalize(e.astype(jnp.float32))
    return (unit, norm) if with_norm else unit

  return embed


def _outputs(fn: Callable, with_norm: bool) -> Callable:
  """fn's result as the named outputs of the TensorFlow formats."""
  if with_norm:
    return lambda x: dict(zip((OUTPUT, NORM), fn(x)))
  return lambda x: {OUTPUT: fn(x)}


def _tf_function(fn: Callable, image_size: int, native: bool,
                 with_norm: bool = False):
  import tensorflow as tf  # noqa: PLC0415 (TensorFlow only when exporting)
  from jax.experimental import jax2tf  # noqa: PLC0415 (needs TensorFlow)
  options = {'native_serialization_platforms': SAVEDMODEL_PLATFORMS}
  if not native:
    options = {'native_serialization': False}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    converted = jax2tf.convert(
        _outputs(fn, with_norm), with_gradient=False,
        polymorphic_shapes=[f'(batch, {image_size}, {image_size}, 3)'],
        **options)
  spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, INPUT)
  return tf.function(converted, autograph=False, input_signature=[spec])


def write(fmt: str, fn: Callable, image_size: int, path: str,
          doc: str = '', with_norm: bool = False) -> None:
  """The serving function ``fn`` as ``fmt`` at ``path``; ``with_norm``: fn
  returns (embeddings, norm), written as the outputs OUTPUT and NORM."""
  if fmt == 'onnx':
    require_onnx()
    from npcface_jax.serving import onnx_graph  # noqa: PLC0415 (needs the extra)
    model = onnx_graph.to_onnx(fn, (image_size, image_size, 3), jnp.uint8,
                               input_name=INPUT,
                               output_name=(OUTPUT, NORM) if with_norm
                               else OUTPUT, doc=doc)
    with open(path, 'wb') as f:
      f.write(model.SerializeToString())
    return
  import tensorflow as tf  # noqa: PLC0415 (TensorFlow only when exporting)
  if fmt == 'savedmodel':
    module = tf.Module()
    module.serve = _tf_function(fn, image_size, native=True,
                                with_norm=with_norm)
    tf.saved_model.save(module, path, signatures={
        'serving_default': module.serve.get_concrete_function()})
    return
  if fmt != 'tflite':
    raise ValueError(f'unknown format {fmt!r}; choose from {FORMATS}')
  try:
    function = _tf_function(fn, image_size, native=False,
                            with_norm=with_norm)
  except (TypeError, ValueError) as e:
    raise RuntimeError(f'tflite needs jax2tf\'s graph serialisation '
                       f'(native_serialization=False), which this JAX '
                       f'{jax.__version__} refuses: {e}') from None
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [function.get_concrete_function()], function)
  with open(path, 'wb') as f:
    f.write(converter.convert())


def load(fmt: str, path: str, with_norm: bool = False) -> Callable:
  """A function running the exported model at ``path`` in its own runtime:
  uint8 faces (B, S, S, 3) -> float32 embeddings (B, D), any B >= 1; with
  ``with_norm``, (embeddings, norms (B,)) from a model exported with it."""
  names = [OUTPUT, NORM] if with_norm else [OUTPUT]
  pick = (lambda outs: tuple(outs)) if with_norm else (
      lambda outs: outs[0])
  if fmt == 'onnx':
    ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options,
                                   providers=['CPUExecutionProvider'])
    return lambda x: pick(session.run(names, {INPUT: x}))
  import tensorflow as tf  # noqa: PLC0415 (TensorFlow only when exporting)
  if fmt == 'savedmodel':
    serve = tf.saved_model.load(path).signatures['serving_default']

    def run_saved(x):
      outs = serve(**{INPUT: tf.constant(x)})
      missing = [n for n in names if n not in outs]
      if missing:
        raise ValueError(f'{path} has no output {missing[0]!r} (it has '
                         f'{", ".join(sorted(outs))}): export it with '
                         '--with_norm')
      return pick([outs[n].numpy() for n in names])

    return run_saved
  if fmt != 'tflite':
    raise ValueError(f'unknown format {fmt!r}; choose from {FORMATS}')
  with warnings.catch_warnings():  # its move to ai_edge_litert: TF 2.22+
    warnings.simplefilter('ignore', UserWarning)
    interpreter = tf.lite.Interpreter(model_path=path,
                                      num_threads=os.cpu_count())
  (inp,), outs = (interpreter.get_input_details(),
                  interpreter.get_output_details())
  # The converter renames outputs (StatefulPartitionedCall:0, ...): the
  # embeddings are the (B, D) one, the norm the (B,) one.
  by_rank = {len(o['shape']): o for o in outs}
  ranks = (2, 1) if with_norm else (2,)
  if not set(ranks) <= set(by_rank):
    raise ValueError(f'{path} has outputs of ranks {sorted(by_rank)}, not '
                     f'{", ".join(names)} (ranks {ranks})' + (
                         ': export it with --with_norm' * with_norm))

  def run(x):
    interpreter.resize_tensor_input(inp['index'], x.shape, strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp['index'], x)
    interpreter.invoke()
    return pick([interpreter.get_tensor(by_rank[r]['index']).copy()
                 for r in ranks])

  return run


def versions() -> dict[str, str]:
  """The versions of the libraries that write and run the formats."""
  import importlib.metadata as metadata  # noqa: PLC0415 (export only)
  found = {}
  for name in ('npcface_jax', 'jax', 'jaxlib', 'flax', 'numpy',
               'tensorflow-cpu', 'tensorflow', 'onnx', 'onnxruntime'):
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return found
