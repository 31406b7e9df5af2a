"""Writing a bundle: the build's stages, the gate, the manifest and `latest`."""
