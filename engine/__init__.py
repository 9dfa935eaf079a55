"""tunedeck's headless engine: configs, data, training, chat, merge.

The torch-free modules (config, catalogue, runs, errors, tree) are imported by
the TUI; everything that needs torch imports it inside its own module.
"""

__version__ = "0.1.0"
