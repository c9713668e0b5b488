"""Whether the Triton hash kernels can be imported here (without importing Triton on every call)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401

        from . import hash_triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken Triton install
        return False, f"triton cannot be imported ({type(e).__name__}: {e})"
    return True, "triton imports"


def available() -> bool:
    return _probe()[0]


def reason() -> str:
    return _probe()[1]
