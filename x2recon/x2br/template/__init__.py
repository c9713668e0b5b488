"""Template meshes for X2BR: a library built from the dataset's segmented CTs (or SKEL meshes the
user has), placed per detected structure from its box and the X-ray's geometry."""

from __future__ import annotations

from .library import LIBRARY_FORMAT, TemplateLibrary, build_library, load_library
from .placement import Assembled, PlacedTemplate, assemble, assign_levels, place_templates, point_on_ray

__all__ = ["LIBRARY_FORMAT", "Assembled", "PlacedTemplate", "TemplateLibrary", "assemble", "assign_levels",
           "build_library", "load_library", "place_templates", "point_on_ray"]
