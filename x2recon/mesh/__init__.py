"""Meshes: extraction from labelmaps (watertight, LPS mm); MISE and simplification come with X2B."""
