"""Serving: token generation, multi-LoRA batching, the model host and its batching scheduler, the
OpenAI-compatible HTTP service with its web chat page, and chat sessions (local or over HTTP)."""
