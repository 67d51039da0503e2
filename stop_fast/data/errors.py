"""The one error every decoder raises, naming the file and the reason."""
from __future__ import annotations

import os
from typing import Union


class VideoDecodeError(RuntimeError):
    """A video could not be read. ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: Union[str, os.PathLike], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (VideoDecodeError, (self.path, self.reason))
