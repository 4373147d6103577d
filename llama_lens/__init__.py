"""llama_lens: open a Llama checkpoint, hook every step of its forward pass, and look inside."""
