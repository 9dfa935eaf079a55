"""Export: merging a trained adapter into its base model (InternLM2 format or the native layout) and
exporting adapters under the original model's module names."""
