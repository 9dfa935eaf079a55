"""The tutorial's steps for any recipe, text or LLaVA: check a recipe's data, train it (the right
Trainer for its kind, in this process, detached or under torchrun), serve a model or LLaVA checkpoints,
and the embedded demo. The CLI verbs and the demos call these; the packages below know nothing of
which kinds exist."""
