"""Faces from files: decoding (images.py, the one image layer), the
5-point alignment (alignment.py) and detection (detection.py, the
[detect] extra). Imports no JAX, so data_prep's workers stay light."""
