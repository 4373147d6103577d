"""What the tests share: tiny models and configs, reference implementations, the tokenizer corpus, and
watchers of what a load reads."""
