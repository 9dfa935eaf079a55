"""Names shared by the engine and the TUI, importable without pydantic or torch."""

DEEPSPEED_CHOICES = ("none", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")

# an inference-service request header: ID/N, this request is one of N sent together (the sides of a
# comparison), which the service generates in one batch
GROUP_HEADER = "X-Tunedeck-Group"
