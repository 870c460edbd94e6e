"""Single-cell foundation-model backbones and checkpoint loaders."""
