"""C2L-ST: gene-conditioned histology synthesis."""
