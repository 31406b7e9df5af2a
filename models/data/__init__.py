"""Datasets and augmentation: the build's input, decoded as the service decodes."""
