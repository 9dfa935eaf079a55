"""tunedeck's headless engine. Packages, lowest first; each imports only those below it
(the import-linter contracts in pyproject.toml, run by tests/test_layout.py, keep it so):

    core/     errors, atomic file writes, hub reachability, directory listings (no torch)
    data/     record formats, chat templates, the identity dataset, tokenizing and packing
    recipe/   the recipe schema (validated YAML, never executed) and the catalogue of shipped recipes
    model/    loading, 4-bit quantization, LoRA, fused layers, memory savers, InternLM2 conversion
    train/    run directories, locking, checkpoints, the trainer, run preparation and launching
    serve/    generation, multi-LoRA batching, the scheduler, the HTTP service, chat sessions
    export/   merging adapters into full models
    llava/    the vision-language model: data, model, training, serving, chat, export, demo
    workflow/ the tutorial's steps for any recipe kind: check data, train, serve; the tiny demo
    cli/      the ``tunedeck`` verbs, one module per group: parse, call, print

The TUI imports the torch-free parts (core, recipe, train.runs, data.identity); every module that
needs torch imports it itself, so those stay light.
"""

__version__ = "0.1.0"
