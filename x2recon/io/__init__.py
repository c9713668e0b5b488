"""Readers and writers with clear errors on bad files (CT, labels, images, meshes)."""


def native_path(path) -> str:
    """``path`` as a str that ITK and VTK (C++ behind SWIG-style wrappers) turn back into the file's bytes.

    Under a non-UTF-8 locale (``LC_ALL=C`` without Python's UTF-8 mode) Python decodes a non-ASCII file
    name into lone surrogates; handed such a str, SimpleITK aborts the process (a C++ exception, exit 134)
    and VTK raises UnicodeEncodeError.  Both encode names as UTF-8, so a name whose bytes are UTF-8 is
    passed decoded as UTF-8 (the same bytes reach the file system); any other name is refused by name."""
    import os

    from ..errors import X2ReconInputError

    s = os.fsdecode(os.fspath(path))
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(s).decode("utf-8")
    except UnicodeDecodeError:
        raise X2ReconInputError(s, "the file name is not UTF-8 text, which ITK and VTK cannot open; rename the "
                                   "file (ASCII or UTF-8 name)") from None
