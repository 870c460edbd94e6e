"""Patch encoders behind one registry."""
