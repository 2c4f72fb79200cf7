"""Training: the config checked, the run set up (mesh, backbone, head,
optimizer, state), the jitted step, the loop, fine-tuning, the
verification during training and the hard-sample statistics."""
