"""Text: the tokenizer, the ChatML template, and token ids back to text (one stop rule)."""
