"""What the Slicer modules share: ``mrml`` (MRML ↔ x2recon, RAS ↔ LPS for nodes), ``process`` (the
background job without Qt: output lines, progress, process-tree Cancel; first-use installs), ``widget``
(the panels' Qt half, imported only inside Slicer) and ``phantom`` (the self-tests' synthetic CT)."""
