"""A trained run put to use: its directory (run.json, the restored
backbone), the model that embeds photos, and the export formats with
their ONNX graph and model card. Never imports training."""
