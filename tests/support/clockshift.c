/* A wall clock of its own for one process tree: every CLOCK_REALTIME reading (clock_gettime,
 * gettimeofday, time) is shifted by the number of seconds written in the file named by
 * OBR_CLOCK_SHIFT_FILE, read again at most every 50 ms of the monotonic clock. The monotonic
 * clocks, the files' stamps and containerd's own clock are left alone: what a Windows VM sees
 * when its clock steps after a resume or a time sync, played for the daemon alone.
 *
 * Test support only, loaded with LD_PRELOAD by tests/support/clock.py; never part of the product.
 * Go programs (ctr, containerd) read the clock through the vDSO, not libc: unaffected. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static long long shift_ns;
static struct timespec read_at;

static void reload(void) {
    if (!real_clock_gettime) real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    const char *path = getenv("OBR_CLOCK_SHIFT_FILE");
    if (!path) return;
    struct timespec now;
    real_clock_gettime(CLOCK_MONOTONIC, &now);
    long long since = (now.tv_sec - read_at.tv_sec) * 1000000000LL + (now.tv_nsec - read_at.tv_nsec);
    if (read_at.tv_sec != 0 && since < 50000000LL) return;
    read_at = now;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return;
    buf[n] = 0;
    shift_ns = (long long)(strtod(buf, NULL) * 1e9);
}

static void shifted(struct timespec *ts) {
    long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + shift_ns;
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
    if (ts->tv_nsec < 0) {
        ts->tv_nsec += 1000000000LL;
        ts->tv_sec -= 1;
    }
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    reload();
    int r = real_clock_gettime(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) shifted(ts);
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0 && tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
