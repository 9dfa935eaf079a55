"""Names shared by the schema and the TUI, importable without pydantic."""

DEEPSPEED_CHOICES = ("none", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
