"""Evaluation that needs no trainer: the embedding step, the protocols
(10-fold pairs, ROC, TAR@FAR), pair sets and the insightface .bin format,
IJB-B/C, 1:N ranking with distractors, ROC plots."""
