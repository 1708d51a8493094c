"""Corpus building: text sources, the chunker, text encoders and the text -> article store CLI."""
