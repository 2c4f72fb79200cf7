"""Studying losses: runs compared side by side (comparison.py) and the
report's figures (figures.py, the [report] extra)."""
