"""Logic of the X2BoneRecon module (MRML in, MRML out; no Qt)."""
