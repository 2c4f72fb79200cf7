"""Models trained elsewhere: PyTorch checkpoints, MXNet params and ONNX
graphs read as arrays without running anything the file holds, their
layers named onto this project's backbones, and reference forwards that
check an import against the source's own computation. No training here."""
