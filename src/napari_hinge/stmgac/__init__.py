"""STMGAC: spatial domains with a contrastively augmented masked graph autoencoder."""
