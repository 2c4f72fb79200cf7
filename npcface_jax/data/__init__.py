"""Training data: the tf.data pipeline over prepared TFRecord shards
(input_pipeline.py) and synthetic identities in memory (synthetic.py)."""
