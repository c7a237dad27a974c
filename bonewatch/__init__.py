"""bonewatch: finds bone fractures on upper-limb radiographs (DICOM and PNG).

The installed package maps the repository's top-level folders to subpackages:
``bonewatch.ingest``, ``bonewatch.models``, ``bonewatch.db``, ``bonewatch.worker`` and
``bonewatch.bench``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bonewatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
