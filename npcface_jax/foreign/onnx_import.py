"""A released ONNX face recogniser as this project's backbone, checked.

``load`` reads the file (onnx_layouts.read: self-contained, every
initializer's storage checked), recognises the backbone from the graph's
structure (onnx_layouts.layout), builds it and puts the weights onto it
(torch_layouts.to_variables, a shape fault naming the ONNX node);
``parity`` runs that backbone (float32, as every command will) and the
ONNX graph itself under onnxruntime on the same faces, both fed by the
input contract (the graph NCHW float32), and returns each face's cosine.

The graph does not say how its input is normalised: insightface's
recognisers exported by arcface_torch (``w600k_r50.onnx``,
``glintr100.onnx``, ``w600k_mbf.onnx``) take RGB, (x - 127.5) / 127.5
outside the graph (its model_zoo feeds them so), the default here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from npcface_jax.faces import images
from npcface_jax.foreign import (backbone, onnx_layouts, torch_import,
                                 torch_layouts)

DEFAULT_CONTRACT = torch_import.ARCFACE_TORCH
IMAGE_SIZE = onnx_layouts.IMAGE_SIZE


class Imported(NamedTuple):
  """A backbone ready to write as a run: what to build and its weights."""
  model: str
  options: dict  # model_options
  embedding_dim: int
  variables: dict  # {'params', 'batch_stats'}, float32 NumPy
  contract: images.InputContract
  source: str  # in words
  layout: torch_layouts.Layout
  onnx: onnx_layouts.OnnxModel
  origin: dict  # canonical module -> ONNX node


def require_onnxruntime():
  try:
    import onnxruntime  # noqa: PLC0415 (an optional extra)
  except ImportError as e:
    raise onnx_layouts.MissingExtra(
        f'checking an ONNX import needs onnxruntime ({e}); install it '
        f'with: {onnx_layouts.INSTALL}') from None
  return onnxruntime


def load(path: str) -> Imported:
  """The ONNX model at ``path`` as a backbone; OnnxFileError for a file
  not read, LayoutError for a graph that is not a backbone this project
  has (both naming the fault: the tensor, the node and both shapes)."""
  model = onnx_layouts.read(path)
  try:
    found = onnx_layouts.layout(model)
  except torch_layouts.LayoutError as e:
    raise torch_layouts.LayoutError(f'{path}: {e}') from None
  layout = found.layout
  imported = Imported(layout.model, layout.options, layout.embedding_dim,
                      {}, DEFAULT_CONTRACT,
                      f'ONNX graph ({model.producer}, opset {model.opset})',
                      layout, model, found.origin)
  try:
    variables = torch_layouts.to_variables(
        layout, backbone.variable_shapes(imported, IMAGE_SIZE), found.label)
  except torch_layouts.LayoutError as e:
    raise torch_layouts.LayoutError(f'{path}: {e}') from None
  return imported._replace(variables=variables)


def reference(imported: Imported, inputs: np.ndarray) -> np.ndarray:
  """The ONNX graph under onnxruntime (CPU) on normalised NHWC inputs,
  fed NCHW float32; one face a run where the graph's batch is fixed."""
  ort = require_onnxruntime()
  options = ort.SessionOptions()
  options.log_severity_level = 3
  session = ort.InferenceSession(imported.onnx.data, options,
                                 providers=['CPUExecutionProvider'])
  x = np.ascontiguousarray(np.asarray(inputs, np.float32).transpose(
      0, 3, 1, 2))
  batch = imported.onnx.input_shape[0]
  fixed = isinstance(batch, int) and batch > 0
  step = batch if fixed else 32
  if fixed and len(x) % step:
    raise ValueError(f'{imported.onnx.path}: the graph takes batches of '
                     f'{step} exactly; give a multiple of {step} faces')
  return np.concatenate([
      np.asarray(session.run(None, {imported.onnx.input_name:
                                    x[i:i + step]})[0], np.float64)
      for i in range(0, len(x), step)])


def parity(imported: Imported, pixels: np.ndarray,
           contract: images.InputContract) -> np.ndarray:
  """Each face's cosine between our backbone (float32) and onnxruntime
  running the source graph, both fed ``pixels`` (uint8 RGB, N x 112 x
  112) through ``contract``."""
  inputs = images.normalize(np.asarray(pixels, np.float32), contract)
  return backbone.cosines(backbone.embed(imported, inputs),
                           reference(imported, inputs))


def against() -> str:
  return (f'onnxruntime {require_onnxruntime().__version__} (CPU) running '
          'the ONNX graph itself')
