"""Kept images as in-memory files, so that responses go out with sendfile(2).

Writing a 100 KB image to a socket copies it into the kernel at every
response: with two gateway workers that copy was a fifth of their CPU. An
image held in an anonymous in-memory file (Linux ``memfd_create``) is sent
with ``sendfile``, which hands the kernel the file's pages instead, as nginx
does with files on disk. The bytes are read back through a read-only memory
map of that same file, so they are held once.

Each file holds a file descriptor until the last reference to it goes, so
their number is bounded (``MemoryFiles``); past the bound, or where the
platform has no memfd, images stay plain bytes and are written as before.
"""

from __future__ import annotations

import mmap
import os
import resource

# Smaller images cost little to copy; sending one from a file takes an extra system call.
MIN_FILE_BYTES = 16 * 1024
# Of the file descriptors a process may hold, kept images get at most this share.
SHARE_OF_DESCRIPTORS = 4


class MemoryFile:
    """Bytes in an in-memory file: ``fd`` for sendfile, ``view`` to read them."""

    __slots__ = ("_files", "fd", "view")

    def __init__(self, fd: int, view: memoryview, files: MemoryFiles) -> None:
        self.fd = fd
        self.view = view
        self._files = files

    def __len__(self) -> int:
        return len(self.view)

    def __del__(self) -> None:
        # Only once nothing refers to the file any more, so that no response
        # can be sent from a descriptor number that was closed and reused.
        os.close(self.fd)
        self._files.open -= 1


class MemoryFiles:
    """Makes MemoryFiles, at most ``limit`` of them open at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit if hasattr(os, "memfd_create") else 0
        self.open = 0

    @classmethod
    def for_this_process(cls) -> MemoryFiles:
        """Raises this process's soft limit of open files to its hard limit, as
        servers do (nginx's ``worker_rlimit_nofile``), and takes a share of it."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (OSError, ValueError):
                pass
        return cls(soft // SHARE_OF_DESCRIPTORS)

    def make(self, data: bytes) -> MemoryFile | None:
        """``data`` as a MemoryFile; None when it is too small to gain from one,
        when too many are open, or when the system refuses one."""
        if len(data) < MIN_FILE_BYTES or self.open >= self.limit:
            return None
        try:
            fd = os.memfd_create("imagecache-kept-image", os.MFD_CLOEXEC)
        except OSError:
            return None
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, memoryview(data)[written:])
            view = memoryview(mmap.mmap(fd, len(data), prot=mmap.PROT_READ))
        except OSError:
            os.close(fd)
            return None
        self.open += 1
        return MemoryFile(fd, view, self)
