"""Training data: record formats (openai / alpaca / sharegpt, local files or hub datasets), chat
templates, the identity dataset, tokenizing with loss masks, packing rows, previews of masked text."""
