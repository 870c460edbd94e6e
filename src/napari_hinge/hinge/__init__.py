"""HINGE: histology-conditioned masked diffusion on a frozen sc-FM backbone."""
