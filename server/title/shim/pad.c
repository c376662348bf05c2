/*
 * libpylon-pad: a virtual Xbox 360 pad for a title on a machine without /dev/uinput.
 *
 * Loaded into the title with LD_PRELOAD by the Pylon render node. It makes the paths
 * /dev/input/pylon-pad0..3 look like evdev character devices: stat() describes one,
 * open() connects to the node's socket PYLON_PAD_DIR/padN.sock (the session's runtime
 * directory) and returns that socket, so read() gets the struct input_event records the
 * node writes, and the evdev ioctl()s a game asks (name, id, capabilities, axis ranges)
 * are answered here. SDL2 finds the pad through SDL_JOYSTICK_DEVICE, which the node sets
 * to these paths; evtest can open a path directly. Everything else passes through.
 * The approach is Selkies' joystick interposer's; the code is Pylon's own.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

#define PADS 4
#define MAX_FD 4096
#define PREFIX "/dev/input/pylon-pad"

/* fd -> pad number + 1 (0: not ours). */
static unsigned char pad_of_fd[MAX_FD];

static int pad_of_path(const char *path) {
    if (path == NULL || strncmp(path, PREFIX, sizeof(PREFIX) - 1) != 0) return -1;
    const char *n = path + sizeof(PREFIX) - 1;
    if (n[0] < '0' || n[0] >= '0' + PADS || n[1] != '\0') return -1;
    return n[0] - '0';
}

static void *real(const char *name) {
    return dlsym(RTLD_NEXT, name);
}

static int connect_pad(int pad, int flags) {
    const char *dir = getenv("PYLON_PAD_DIR");
    if (dir == NULL) {
        errno = ENOENT;
        return -1;
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (snprintf(addr.sun_path, sizeof addr.sun_path, "%s/pad%d.sock", dir, pad) >= (int)sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int type = SOCK_STREAM | SOCK_CLOEXEC | ((flags & O_NONBLOCK) ? SOCK_NONBLOCK : 0);
    int fd = socket(AF_UNIX, type, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int e = errno;
        ((int (*)(int))real("close"))(fd);
        errno = (e == ECONNREFUSED) ? ENODEV : ENOENT;
        return -1;
    }
    /* The pad only sends; nothing the title writes is meaningful. */
    shutdown(fd, SHUT_WR);
    if (fd < MAX_FD) pad_of_fd[fd] = (unsigned char)(pad + 1);
    return fd;
}

/* open(2)'s third argument is there only when `flags` create a file; read it then. A
 * macro, because va_start must run in the variadic wrapper itself. */
#define OPTIONAL_MODE(mode, flags)                \
    do {                                          \
        if ((flags) & (O_CREAT | O_TMPFILE)) {    \
            va_list ap;                           \
            va_start(ap, flags);                  \
            (mode) = va_arg(ap, mode_t);          \
            va_end(ap);                           \
        }                                         \
    } while (0)

static void fill_stat(int pad, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_mode = S_IFCHR | 0666;
    st->st_rdev = makedev(13, 1000 + pad);
    st->st_nlink = 1;
    st->st_blksize = 4096;
}

int open(const char *path, int flags, ...) {
    int pad = pad_of_path(path);
    if (pad >= 0) return connect_pad(pad, flags);
    mode_t mode = 0;
    OPTIONAL_MODE(mode, flags);
    return ((int (*)(const char *, int, mode_t))real("open"))(path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    int pad = pad_of_path(path);
    if (pad >= 0) return connect_pad(pad, flags);
    mode_t mode = 0;
    OPTIONAL_MODE(mode, flags);
    return ((int (*)(const char *, int, mode_t))real("open64"))(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...) {
    int pad = pad_of_path(path);
    if (pad >= 0) return connect_pad(pad, flags);
    mode_t mode = 0;
    OPTIONAL_MODE(mode, flags);
    return ((int (*)(int, const char *, int, mode_t))real("openat"))(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    int pad = pad_of_path(path);
    if (pad >= 0) return connect_pad(pad, flags);
    mode_t mode = 0;
    OPTIONAL_MODE(mode, flags);
    return ((int (*)(int, const char *, int, mode_t))real("openat64"))(dirfd, path, flags, mode);
}

int close(int fd) {
    if (fd >= 0 && fd < MAX_FD) pad_of_fd[fd] = 0;
    return ((int (*)(int))real("close"))(fd);
}

int stat(const char *path, struct stat *st) {
    int pad = pad_of_path(path);
    if (pad >= 0) {
        fill_stat(pad, st);
        return 0;
    }
    return ((int (*)(const char *, struct stat *))real("stat"))(path, st);
}

int stat64(const char *path, struct stat64 *st) {
    int pad = pad_of_path(path);
    if (pad >= 0) {
        fill_stat(pad, (struct stat *)st);
        return 0;
    }
    return ((int (*)(const char *, struct stat64 *))real("stat64"))(path, st);
}

int __xstat(int ver, const char *path, struct stat *st) {
    int pad = pad_of_path(path);
    if (pad >= 0) {
        fill_stat(pad, st);
        return 0;
    }
    return ((int (*)(int, const char *, struct stat *))real("__xstat"))(ver, path, st);
}

int __xstat64(int ver, const char *path, struct stat64 *st) {
    int pad = pad_of_path(path);
    if (pad >= 0) {
        fill_stat(pad, (struct stat *)st);
        return 0;
    }
    return ((int (*)(int, const char *, struct stat64 *))real("__xstat64"))(ver, path, st);
}

int access(const char *path, int mode) {
    if (pad_of_path(path) >= 0) return 0;
    return ((int (*)(const char *, int))real("access"))(path, mode);
}

/* Copies `len` bytes of a bit set with bits `bits` set into the caller's buffer. */
static int bits_reply(void *arg, unsigned size, const int *bits, int n) {
    unsigned char buf[128];
    memset(buf, 0, sizeof buf);
    for (int i = 0; i < n; i++) {
        if (bits[i] / 8 < (int)sizeof buf) buf[bits[i] / 8] |= (unsigned char)(1u << (bits[i] % 8));
    }
    unsigned len = size < sizeof buf ? size : sizeof buf;
    memcpy(arg, buf, len);
    return (int)len;
}

static const int EV_TYPES[] = {EV_SYN, EV_KEY, EV_ABS};
static const int KEYS[] = {BTN_A, BTN_B, BTN_X, BTN_Y, BTN_TL, BTN_TR, BTN_SELECT, BTN_START, BTN_MODE, BTN_THUMBL, BTN_THUMBR};
static const int AXES[] = {ABS_X, ABS_Y, ABS_Z, ABS_RX, ABS_RY, ABS_RZ, ABS_HAT0X, ABS_HAT0Y};

static int pad_ioctl(int pad, unsigned long request, void *arg) {
    unsigned size = _IOC_SIZE(request);
    if (_IOC_TYPE(request) != 'E') {
        errno = ENOTTY;
        return -1;
    }
    unsigned nr = _IOC_NR(request);
    if (request == EVIOCGVERSION) {
        *(int *)arg = EV_VERSION;
        return 0;
    }
    if (request == EVIOCGID) {
        struct input_id id = {.bustype = BUS_USB, .vendor = 0x045e, .product = 0x028e, .version = 0x0114};
        memcpy(arg, &id, sizeof id);
        return 0;
    }
    if (nr == _IOC_NR(EVIOCGNAME(0))) {
        char name[64];
        snprintf(name, sizeof name, "Microsoft X-Box 360 pad %d", pad);
        unsigned len = (unsigned)strlen(name) + 1;
        if (len > size) len = size;
        memcpy(arg, name, len);
        if (len > 0) ((char *)arg)[len - 1] = '\0';
        return (int)len;
    }
    if (nr == _IOC_NR(EVIOCGPHYS(0)) || nr == _IOC_NR(EVIOCGUNIQ(0))) {
        const char *v = nr == _IOC_NR(EVIOCGPHYS(0)) ? "pylon/pad" : "";
        unsigned len = (unsigned)strlen(v) + 1;
        if (len > size) len = size;
        memcpy(arg, v, len);
        return (int)len;
    }
    if (nr >= 0x20 && nr < 0x20 + EV_CNT) {
        /* EVIOCGBIT(type, len) */
        switch (nr - 0x20) {
        case 0: return bits_reply(arg, size, EV_TYPES, sizeof EV_TYPES / sizeof *EV_TYPES);
        case EV_KEY: return bits_reply(arg, size, KEYS, sizeof KEYS / sizeof *KEYS);
        case EV_ABS: return bits_reply(arg, size, AXES, sizeof AXES / sizeof *AXES);
        default: return bits_reply(arg, size, NULL, 0);
        }
    }
    if (nr >= 0x40 && nr < 0x40 + ABS_CNT) {
        /* EVIOCGABS(axis) */
        struct input_absinfo a = {0};
        switch (nr - 0x40) {
        case ABS_X: case ABS_Y: case ABS_RX: case ABS_RY:
            a.minimum = -32768; a.maximum = 32767; a.fuzz = 16; a.flat = 128; break;
        case ABS_Z: case ABS_RZ:
            a.minimum = 0; a.maximum = 255; break;
        case ABS_HAT0X: case ABS_HAT0Y:
            a.minimum = -1; a.maximum = 1; break;
        default:
            errno = EINVAL;
            return -1;
        }
        memcpy(arg, &a, size < sizeof a ? size : sizeof a);
        return 0;
    }
    if (nr == _IOC_NR(EVIOCGKEY(0)) || nr == _IOC_NR(EVIOCGLED(0)) || nr == _IOC_NR(EVIOCGSND(0)) ||
        nr == _IOC_NR(EVIOCGSW(0)) || nr == _IOC_NR(EVIOCGPROP(0))) {
        return bits_reply(arg, size, NULL, 0);
    }
    if (request == EVIOCGRAB || request == EVIOCSCLOCKID) return 0;
    errno = EINVAL;
    return -1;
}

int ioctl(int fd, unsigned long request, ...) {
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (fd >= 0 && fd < MAX_FD && pad_of_fd[fd]) return pad_ioctl(pad_of_fd[fd] - 1, request, arg);
    return ((int (*)(int, unsigned long, void *))real("ioctl"))(fd, request, arg);
}
