"""Storage for work dirs: local paths or any fsspec URL, with atomic and exclusive writes."""

from .classify import STORAGE_FAILURES, describe_error, is_final, storage_error, storage_errors
from .fsspec_dir import s3_options
from .hashing import HashingWriter
from .mounts import is_network_fs, is_shared_path, mount_fs_type
from .workdir import DEFAULT_TIMEOUT, WorkDir

__all__ = ["DEFAULT_TIMEOUT", "STORAGE_FAILURES", "HashingWriter", "WorkDir", "describe_error", "is_final",
           "is_network_fs", "is_shared_path", "mount_fs_type", "s3_options", "storage_error", "storage_errors"]
