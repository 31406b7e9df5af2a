"""Training: the loop, the frozen-feature path, and a folder build's candidates."""
