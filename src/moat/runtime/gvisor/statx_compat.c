/* moat: loaded into every dynamically linked program of a gVisor sandbox (/etc/ld.so.preload).
 *
 * runsc 20221219 answers statx(2) with EINVAL when the AT_NO_AUTOMOUNT flag is set, and
 * coreutils 9 (ls, stat, cp ...) always sets it: `ls /` fails with "Invalid argument".
 * gVisor has no automount points, so the flag means nothing there: clear it and make the
 * call. Nothing else changes; code that issues the syscall itself still sees gVisor's answer.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf)
{
    return (int)syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}
