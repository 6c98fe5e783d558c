"""Is a path visible from every node? A heuristic from /proc/mounts, for the multi-node warning."""

from __future__ import annotations

import os

import fsspec

_NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
                         "glusterfs", "9p", "panfs", "wekafs", "orangefs", "afs", "davfs", "fuse"})


def is_shared_path(url: str) -> bool:
    """Whether ``url`` is probably visible from every node: any URL, or a network file system mount.

    A heuristic for a warning: a multi-node run whose work dir is on node-local disk cannot resume on
    another node.
    """
    protocol, path = fsspec.core.split_protocol(url)
    if protocol not in (None, "file", "local"):
        return True
    try:
        with open("/proc/mounts") as f:
            mounts = f.read()
    except OSError:
        return False
    fstype = mount_fs_type(os.path.abspath(os.path.expanduser(path)), mounts)
    return fstype is not None and is_network_fs(fstype)


def is_network_fs(fstype: str) -> bool:
    """Network or FUSE file systems (``fuse.sshfs``, ``fuse.juicefs``...); ``fuseblk`` is a local disk."""
    return fstype in _NETWORK_FS or fstype.startswith("fuse.")


def mount_fs_type(path: str, mounts: str) -> str | None:
    """The file system type of the mount holding ``path``, from ``/proc/mounts`` content."""
    path = os.path.realpath(path)
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount(fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def _unescape_mount(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
