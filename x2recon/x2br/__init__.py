"""X2BR (X2B refined with templates): ``detection`` (YOLOv9, offline), ``template`` (library, placement,
SKEL), ``refine`` (detect → place → register onto the coarse surface) and ``evaluate`` (its rows in an X2B
evaluation). It takes X2B's coarse mesh as input and imports no other method."""
