"""Recipes: the pydantic schema every recipe YAML is validated by (it also gives the editor its field
types, ranges and help), round-trip editing that keeps comments, and the catalogue of shipped recipes
(list-cfg, copy-cfg)."""
