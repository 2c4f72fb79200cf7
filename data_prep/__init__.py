"""Dataset preparation: face datasets into TFRecord shards.

The converters are not written yet; the package is here so that the layout
(npcface_jax/, configs/, data_prep/, tests/, benchmarks/) is fixed.
"""
