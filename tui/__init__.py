"""tunedeck's terminal app. Never imports torch, transformers or peft: it reads and writes
configs through the engine's torch-free modules, starts engine processes, reads run
directories, and talks HTTP to the inference service."""
