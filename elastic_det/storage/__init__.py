"""Storage for work dirs: local paths or any fsspec URL, with atomic and exclusive writes."""

from .hashing import HashingWriter
from .mounts import is_network_fs, is_shared_path, mount_fs_type
from .workdir import WorkDir, describe_error, s3_options

__all__ = ["HashingWriter", "WorkDir", "describe_error", "is_network_fs", "is_shared_path", "mount_fs_type",
           "s3_options"]
