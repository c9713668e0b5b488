"""Small helpers shared by tests (not collected: no test_ prefix)."""

import numpy as np


def rotation(ax, ay, az):
    """Rotation matrix Rz·Ry·Rx for angles in radians."""
    c, s = np.cos, np.sin
    rx = np.array([[1, 0, 0], [0, c(ax), -s(ax)], [0, s(ax), c(ax)]])
    ry = np.array([[c(ay), 0, s(ay)], [0, 1, 0], [-s(ay), 0, c(ay)]])
    rz = np.array([[c(az), -s(az), 0], [s(az), c(az), 0], [0, 0, 1]])
    return rz @ ry @ rx
