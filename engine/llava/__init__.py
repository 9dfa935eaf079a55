"""LLaVA: a CLIP vision tower, a projector and a language model — data, the model, projector
pretraining and QLoRA fine-tuning, serving images over the API, export to a LLaVA folder, the demo."""
