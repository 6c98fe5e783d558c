"""WorkDir on local disk and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid

import pytest
from s3 import free_port

from elastic_det.errors import StorageError, StorageUnavailableError, exit_code_for
from elastic_det.storage import WorkDir, is_final, is_network_fs, is_shared_path, mount_fs_type, s3_options

SMALL_BLOCK = {"default_block_size": 5 * 2**20}  # s3fs minimum: makes a 12 MB write a multipart upload


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "work")
    return request.getfixturevalue("s3_bucket") + "/run"


def _bucket_contents(s3_server, url: str) -> tuple[list[str], list[str]]:
    """(object keys, keys of unfinished multipart uploads) in the bucket of ``url``, via boto3."""
    bucket = url.split("/")[2]
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return keys, uploads


def test_write_atomic_returns_size_and_sha(url):
    wd = WorkDir(url)
    data = os.urandom(3 * 2**20 + 17)
    size, sha = wd.write_atomic("a/b/data.bin", lambda f: [f.write(data[i:i + 2**20])
                                                          for i in range(0, len(data), 2**20)])
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert wd.read_bytes("a/b/data.bin") == data
    assert wd.size("a/b/data.bin") == len(data)
    assert wd.listdir("a/b") == ["data.bin"]


@pytest.mark.parametrize("nbytes", [1000, 12 * 2**20], ids=["small", "multipart"])
def test_write_atomic_failure_leaves_nothing(url, nbytes, request):
    wd = WorkDir(url, SMALL_BLOCK if not url.startswith("/") else None)
    wd.write_bytes_atomic("keep.bin", b"old")

    def write_then_fail(f):
        f.write(os.urandom(nbytes))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        wd.write_atomic("dir/data.bin", write_then_fail)
    assert not wd.exists("dir/data.bin")
    assert wd.listdir("dir") == []  # no temp file left either
    assert wd.read_bytes("keep.bin") == b"old"
    if not wd.is_local:
        keys, uploads = _bucket_contents(request.getfixturevalue("s3_server"), url)
        assert keys == ["run/keep.bin"]
        assert uploads == []  # the multipart upload was aborted, not left behind


def test_write_atomic_replaces_whole(url):
    wd = WorkDir(url)
    wd.write_bytes_atomic("f.txt", b"first version")
    wd.write_bytes_atomic("f.txt", b"second")
    assert wd.read_bytes("f.txt") == b"second"
    assert wd.listdir("") == ["f.txt"]


def test_create_exclusive(url):
    wd = WorkDir(url)
    assert wd.create_exclusive("m/manifest.json", b"one") is True
    assert wd.create_exclusive("m/manifest.json", b"two") is False
    assert wd.read_bytes("m/manifest.json") == b"one"
    assert wd.listdir("m") == ["manifest.json"]


def test_listing_and_exists_are_never_stale(url):
    wd = WorkDir(url)
    assert wd.listdir("d") == []
    assert not wd.exists("d/x")
    wd.write_bytes_atomic("d/x", b"1")
    assert wd.listdir("d") == ["x"]  # the listing above must not be served from a cache
    assert wd.exists("d/x")
    WorkDir(url).write_bytes_atomic("d/y", b"2")  # another writer
    assert wd.listdir("d") == ["x", "y"]
    assert wd.find("") == ["d/x", "d/y"]
    wd.delete("d/x")
    assert not wd.exists("d/x")
    assert wd.listdir("d") == ["y"]
    wd.delete("d", recursive=True)
    assert wd.listdir("d") == []
    wd.delete("d/never-existed")  # not an error


def test_read_missing_raises_file_not_found(url):
    with pytest.raises(FileNotFoundError):
        WorkDir(url).read_bytes("nope")


def test_upload_file(url, tmp_path):
    local = tmp_path / "log.txt"
    local.write_text("line 1\nline 2\n")
    wd = WorkDir(url)
    wd.upload_file(str(local), "logs/train.log")
    assert wd.read_bytes("logs/train.log") == b"line 1\nline 2\n"


def test_check_writable_ok(url):
    wd = WorkDir(url)
    wd.check_writable()
    assert wd.find("") == []  # the probe is gone


def test_check_writable_missing_bucket(s3_bucket):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    start = time.monotonic()
    with pytest.raises(StorageError, match="no such bucket") as info:
        WorkDir(url).check_writable()
    assert url in str(info.value)
    assert exit_code_for(info.value) == 2  # final: relaunching cannot create the bucket
    assert time.monotonic() - start < 10


def test_check_writable_dead_endpoint(s3_bucket):
    endpoint = f"http://127.0.0.1:{free_port()}"
    url = s3_bucket + "/run"
    start = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="connection refused") as info:
        WorkDir(url, {"endpoint_url": endpoint}).check_writable()
    assert url in str(info.value) and endpoint in str(info.value)
    assert exit_code_for(info.value) == 75  # an endpoint that is down: retryable
    assert time.monotonic() - start < 10


def test_check_writable_no_credentials(s3_bucket, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="no AWS credentials") as info:
        WorkDir(s3_bucket + "/run").check_writable()
    assert exit_code_for(info.value) == 2
    assert "storage_options" not in str(info.value)  # credentials belong in the environment, not the config


def test_check_writable_local_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    url = str(tmp_path / "file" / "work")
    with pytest.raises(StorageError) as info:
        WorkDir(url).check_writable()
    assert url in str(info.value)


def test_check_writable_work_dir_is_a_file(tmp_path):
    """Not "not writable: File exists": the message says what is wrong with the path, and the file is kept."""
    (tmp_path / "run").write_text("notes")
    with pytest.raises(StorageError, match=r"run is a file, not a directory$") as info:
        WorkDir(str(tmp_path / "run")).check_writable()
    assert exit_code_for(info.value) == 2
    assert (tmp_path / "run").read_text() == "notes"


def test_local_write_under_a_file_fails_cleanly(tmp_path):
    (tmp_path / "blocker").write_text("x")
    wd = WorkDir(str(tmp_path))
    with pytest.raises(StorageError, match="blocker") as info:
        wd.write_bytes_atomic("blocker/data.bin", b"data")
    assert exit_code_for(info.value) == 2  # a path under a file never works
    assert wd.listdir("") == ["blocker"]


@pytest.mark.parametrize("error, final", [
    (FileNotFoundError(errno.ENOENT, "NoSuchBucket"), True),
    (PermissionError(errno.EACCES, "AccessDenied"), True),
    (OSError(errno.EROFS, "read-only file system"), True),
    (OSError(errno.EINVAL, "InvalidBucketName"), True),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (OSError(errno.EBUSY, "SlowDown"), False),  # s3fs's translation of 503
    (OSError(errno.EIO, "InternalError"), False),
    (ConnectionResetError(errno.ECONNRESET, "reset"), False),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), False),
    (TimeoutError("read timeout"), False),
])
def test_error_classification(error, final):
    assert is_final(error) is final


def test_error_classification_botocore():
    from botocore.exceptions import ConnectTimeoutError, NoCredentialsError, ReadTimeoutError

    assert is_final(NoCredentialsError())
    assert not is_final(ReadTimeoutError(endpoint_url="http://x"))
    assert not is_final(ConnectTimeoutError(endpoint_url="http://x"))


def test_full_disk_is_retryable(tmp_path, monkeypatch):
    wd = WorkDir(str(tmp_path))

    def no_space(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageUnavailableError, match="No space left") as info:
        wd.write_atomic("data.bin", lambda f: no_space(f))
    assert exit_code_for(info.value) == 75
    assert wd.listdir("") == []


def test_s3_requests_are_bounded_in_time(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    options = s3_options({}, timeout=7)
    assert options["config_kwargs"]["read_timeout"] == 7
    assert options["config_kwargs"]["connect_timeout"] == 7
    assert options["config_kwargs"]["retries"]["total_max_attempts"] == 2
    assert s3_options({}, timeout=60)["config_kwargs"]["connect_timeout"] == 10
    mine = s3_options({"config_kwargs": {"read_timeout": 300}}, timeout=7)
    assert mine["config_kwargs"]["read_timeout"] == 300  # the user's settings win


def test_invalid_url_is_final():
    with pytest.raises(StorageError, match="not a valid location"):
        WorkDir("nosuchprotocol-xyz://bucket/run")


def test_endpoint_from_environment(s3_bucket, s3_server):
    """s3fs instances are cached by their arguments: the endpoint from the environment must be one."""
    assert WorkDir(s3_bucket).storage_options["endpoint_url"] == s3_server.endpoint
    explicit = WorkDir(s3_bucket, {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}})
    assert "endpoint_url" not in explicit.storage_options


def test_paths(tmp_path, s3_bucket):
    assert WorkDir(str(tmp_path)).path("a/b.pt") == str(tmp_path / "a" / "b.pt")
    assert WorkDir(s3_bucket + "/run/").path("a/b.pt") == s3_bucket + "/run/a/b.pt"
    assert WorkDir(s3_bucket).is_local is False


def test_one_protocol_two_implementations(tmp_path, s3_bucket):
    """WorkDir(url) picks the implementation by URL; every public method of the protocol is implemented by
    both, so nothing above storage/ needs to know which one it holds."""
    from elastic_det.storage.fsspec_dir import FsspecWorkDir
    from elastic_det.storage.local import LocalWorkDir

    assert type(WorkDir(str(tmp_path))) is LocalWorkDir
    assert type(WorkDir(f"file://{tmp_path}")) is LocalWorkDir
    assert type(WorkDir(s3_bucket)) is FsspecWorkDir
    assert type(WorkDir("memory://run")) is FsspecWorkDir
    protocol = [name for name, value in vars(WorkDir).items()
                if callable(value) and getattr(value, "__code__", None) is not None
                and "NotImplementedError" in value.__code__.co_names]
    assert len(protocol) >= 9
    for impl in (LocalWorkDir, FsspecWorkDir):
        assert not [name for name in protocol if name not in vars(impl)], impl


def test_is_shared_path():
    mounts = ("overlay / overlay rw 0 0\n"
              "server:/export /mnt/shared nfs4 rw 0 0\n"
              "/dev/sda1 /mnt/shared/local\\040disk ext4 rw 0 0\n"
              "juicefs /jfs fuse.juicefs rw 0 0\n")
    assert mount_fs_type("/mnt/shared/runs/a", mounts) == "nfs4"
    assert mount_fs_type("/mnt/shared/local disk/x", mounts) == "ext4"
    assert mount_fs_type("/mnt/sharedother", mounts) == "overlay"
    assert mount_fs_type("/jfs/run", mounts) == "fuse.juicefs"
    assert is_network_fs("nfs4") and is_network_fs("fuse.juicefs") and is_network_fs("lustre")
    assert not is_network_fs("ext4") and not is_network_fs("fuseblk") and not is_network_fs("overlay")
    assert is_shared_path("s3://bucket/run") and is_shared_path("gs://bucket/run")
    assert is_shared_path("/proc/self") is False  # proc is not a network file system
