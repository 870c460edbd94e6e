"""Readers and writers: slides (lazy multiscale) and spatial data (AnnData)."""
