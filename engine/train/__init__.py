"""Training: run directories (what the TUI reads), the run lock, checkpoints, the step collector, the
trainer and its loop, and preparing and launching runs (foreground, detached, torchrun)."""
