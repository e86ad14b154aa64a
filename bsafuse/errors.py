"""The exceptions bsafuse raises for expected failures.

Every message says what is wrong (naming the file or value), what was expected, and what to do.
The command line turns any `BsafuseError` into one red line on stderr and exit code 1.
"""

from __future__ import annotations


class BsafuseError(Exception):
    """Base class of every expected failure (bad input, missing weights, absent device)."""


class InputError(BsafuseError, ValueError):
    """An input file or array cannot be used: unreadable, truncated, wrong shape, NaN, ..."""


class WeightsError(BsafuseError):
    """A checkpoint is missing, corrupt, has the wrong sha256 or does not fit the model."""


class DeviceError(BsafuseError):
    """The requested device does not exist or cannot be used."""


class OutputError(BsafuseError):
    """An output cannot be written (unwritable folder, would overwrite an input, disk full)."""
