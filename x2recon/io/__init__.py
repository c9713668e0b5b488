"""Readers and writers with clear errors on bad files (CT, labels, images, meshes)."""
