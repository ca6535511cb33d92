"""Model families, one folder each (lm, codec, cascade), found through registry.py."""
