"""Logic of the SpiderCT module (MRML in, MRML out; no Qt)."""
