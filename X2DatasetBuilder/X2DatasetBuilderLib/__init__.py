"""Logic of the X2DatasetBuilder module (MRML in, MRML out; no Qt)."""
