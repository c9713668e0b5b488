"""Network parts every method shares: timm encoders (``encoders``), projection-guided feature sampling
through ``ProjectionGeometry`` (``sampling``), safetensors + JSON checkpoints (``checkpoint``) and the one
``--device`` resolver (``device``)."""
