#!/usr/bin/env python3
"""faultfs: a FUSE pass-through file system whose fsync/fdatasync can be made to fail.

Usage: faultfs.py BACKING_DIR MOUNTPOINT ARM_FILE LOG_FILE

Mirrors BACKING_DIR at MOUNTPOINT (foreground, until unmounted or killed). While ARM_FILE
exists, an fsync or fdatasync of a file whose name ends in ".seg" fails with EIO (if
ARM_FILE says "once", the first failure removes it) and the file's path is appended to
LOG_FILE. Everything else passes through to BACKING_DIR.

Why FUSE: the kernel turns every fsync of a FUSE file into a request to this process, so
the failure reaches a program however it syncs, libc's fdatasync or an io_uring
IORING_OP_FSYNC (tern's `spool.commit = "uring"`), which an LD_PRELOAD shim cannot reach;
device-mapper's error targets are not available in every kernel (not in this project's
machines). Used by tests/tests/e2e_14_faults.rs; it only ever touches BACKING_DIR.
"""

import errno
import os
import sys

try:
    import fuse  # PyPI's fusepy
except ImportError:  # Debian's python3-fusepy names the module fusepy
    import fusepy as fuse


class FaultFs(fuse.Operations):
    def __init__(self, root, arm, log):
        self.root = root
        self.arm = arm
        self.log = log

    def _p(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _fault(self, path):
        if not path.endswith(".seg") or not os.path.exists(self.arm):
            return False
        try:
            with open(self.arm) as f:
                if f.read(4) == "once":
                    os.unlink(self.arm)
        except OSError:
            pass
        with open(self.log, "a") as f:
            f.write(path + "\n")
        return True

    # Files and directories: plain pass-through.
    def access(self, path, mode):
        if not os.access(self._p(path), mode):
            raise fuse.FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._p(path), uid, gid)

    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink",
                "st_size", "st_uid", "st_blocks")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._p(path))

    def mkdir(self, path, mode):
        os.mkdir(self._p(path), mode)

    def rmdir(self, path):
        os.rmdir(self._p(path))

    def unlink(self, path):
        os.unlink(self._p(path))

    def rename(self, old, new):
        os.rename(self._p(old), self._p(new))

    def statfs(self, path):
        st = os.statvfs(self._p(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def utimens(self, path, times=None):
        os.utime(self._p(path), times)

    def open(self, path, flags):
        return os.open(self._p(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        with open(self._p(path), "r+") as f:
            f.truncate(length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    # The point of it all.
    def fsync(self, path, datasync, fh):
        if self._fault(path):
            raise fuse.FuseOSError(errno.EIO)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0


def main():
    root, mountpoint, arm, log = sys.argv[1:5]
    fuse.FUSE(FaultFs(os.path.abspath(root), arm, log), mountpoint, foreground=True,
              nothreads=False, big_writes=True, max_write=131072, allow_other=False)


if __name__ == "__main__":
    main()
