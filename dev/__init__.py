"""Development tools: the demo (not installed with the product)."""
