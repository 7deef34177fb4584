"""Planning math in pure Python (no torch import): memory, FLOPs, hardware."""
