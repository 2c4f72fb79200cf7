"""The loss: margin heads over cosines (heads.py), the criteria over their
logits (criteria.py), heads by name (registry.py), the classifier that
puts them together (classifier.py: full, chunked.py, class-sharded with
class_shards.py, Partial FC). Public API, pure functions of arrays."""
