"""napari dock widgets; thin: they call the core and run slow work in workers."""
