"""Dataset builder: CT → segmentation → meshes → occupancy → DRRs → box labels."""
