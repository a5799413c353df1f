/* stage0: PID 1 of the bootstrap initramfs. It does the least that lets the agent run:
 *
 *   1. mounts proc, sysfs and devtmpfs;
 *   2. loads the drivers of the hardware that is there (coldplug: the modalias of each
 *      PCI and virtio device matched against the aliases of the modules it carries),
 *      and, when the root is on the CD, the CD stack;
 *   3. mounts the root image read-only (squashfs, erofs or ext4, told by its magic)
 *      from a block device (direct kernel boot: its readahead raised to 4 MiB) or from
 *      /root.sqfs on the boot CD,
 *      the project layer over it (/code of this initramfs, or /tether.sqfs on the CD)
 *      and a tmpfs for writes, as one overlay;
 *   4. moves its mounts under /run/bootstrap and execs the agent in the new root with
 *      the boot clock's marks of its own steps in TETHER_BOOT_MARKS.
 *
 * No shell and no fork on the way: under TCG every exec is tens of milliseconds.
 * Busybox stays in the initramfs for the shells below.
 *
 * Kernel arguments (dotted names never reach init's environment; read here):
 *   tether.debug=N     agent debug level (TETHER_DEBUG); N >= 1 prints stage0's steps
 *   tether.image=debug debug image: run tether-debug-init; a failure gives a shell
 *   tether.root=DEV    the root image's block device (/dev/vda, or pci:0000:00:02.0 for
 *                      the disk at that PCI address); an ISO 9660 device is searched for
 *                      /root.sqfs. Default: the boot CD.
 *   tether.shell=1     a busybox shell before switching root (the root at /newroot)
 *
 * Files of the initramfs (init/build writes them):
 *   /stage0/modules    "NAME PATH..." : a module and the .ko files to load for it, in order
 *   /stage0/aliases    "GLOB NAME"    : modalias patterns of the coldplug modules
 *   /stage0/cd         names of the modules of the CD drive, one a line
 *   /stage0/iso        names of the modules that read /root.sqfs on an ISO 9660 disk
 *   /code/             the project layer, on a direct kernel boot
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/loop.h>

#define BUSYBOX "/bin/busybox"
#define AGENT "/usr/local/sbin/tether-agent"   /* python3 -S: init/provision/project */

static int debug;
static int debug_image;
static char marks[1024];
static size_t marks_len;

/* ------------------------------------------------------------------ small helpers */

static double boottime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A mark: the end of stage0's step `name`, on the kernel's boot clock. */
static void mark(const char *name) {
    double now = boottime();
    if (marks_len < sizeof marks - 64)
        marks_len += snprintf(marks + marks_len, sizeof marks - marks_len, "%s%s=%.6f",
                              marks_len ? "," : "", name, now);
    if (debug)
        fprintf(stderr, "stage0: %s, boot clock %.6f\n", name, now);
}

static void say(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("stage0: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
}

static int run_shell(void) {
    pid_t pid = fork();
    if (pid == 0) {
        execl(BUSYBOX, "sh", "-i", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    return status;
}

/* Nothing can run: say why, give the debug image a shell, power off (the host sees the
 * VM end instead of waiting for its timeout). */
static void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("stage0: FATAL: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    if (debug_image) {
        say("debug image: shell on the console; exit to power off");
        run_shell();
    }
    sync();
    reboot(RB_POWER_OFF);
    for (;;) pause();
}

static char *read_text(const char *path, size_t *length) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    size_t size = 0, capacity = 4096;
    char *text = malloc(capacity);
    for (;;) {
        if (size + 1 >= capacity) text = realloc(text, capacity *= 2);
        ssize_t n = read(fd, text + size, capacity - size - 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        size += n;
    }
    close(fd);
    text[size] = 0;
    if (length) *length = size;
    return text;
}

static void mkdirs(const char *path) {
    char buffer[512];
    snprintf(buffer, sizeof buffer, "%s", path);
    for (char *p = buffer + 1; *p; p++)
        if (*p == '/') { *p = 0; mkdir(buffer, 0755); *p = '/'; }
    mkdir(buffer, 0755);
}

static int mount_at(const char *source, const char *target, const char *type,
                    unsigned long flags, const char *data) {
    mkdirs(target);
    return mount(source, target, type, flags, data);
}

/* ------------------------------------------------------------------ kernel modules */

static char *module_table;     /* /stage0/modules, lines "NAME PATH..." */
static char *alias_table;      /* /stage0/aliases, lines "GLOB NAME" */
static char *loaded[128];       /* names and .ko paths done (a repeated finit_module
                                   would check the signature again before refusing) */
static int loaded_count;

static int is_loaded(const char *name) {
    for (int i = 0; i < loaded_count; i++)
        if (strcmp(loaded[i], name) == 0) return 1;
    return 0;
}

static void remember(const char *name) {
    if (loaded_count < 128) loaded[loaded_count++] = strdup(name);
}

static void insmod(const char *path) {
    if (is_loaded(path)) return;
    remember(path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { say("no module file %s", path); return; }
    if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
        say("cannot load %s: %s", path, strerror(errno));
    close(fd);
}

/* Load module `name` and what it needs, as listed in /stage0/modules. */
static void load_module(const char *name) {
    if (is_loaded(name)) return;
    size_t n = strlen(name);
    for (char *line = module_table; line && *line; ) {
        char *end = strchr(line, '\n');
        if (strncmp(line, name, n) == 0 && line[n] == ' ') {
            char *cursor = line + n + 1;
            while (cursor < (end ? end : line + strlen(line))) {
                char path[256];
                size_t len = strcspn(cursor, " \n");
                snprintf(path, sizeof path, "/%.*s", (int)len, cursor);
                insmod(path);
                cursor += len + 1;
            }
            remember(name);
            if (debug >= 2) say("module %s, boot clock %.6f", name, boottime());
            return;
        }
        line = end ? end + 1 : NULL;
    }
    say("module %s is not in this initramfs", name);
}

/* One coldplug pass over a bus: the drivers of its devices that we carry. Returns how
 * many modules it loaded (a loaded bus driver makes new devices appear). */
static int coldplug_bus(const char *bus) {
    char directory[128];
    snprintf(directory, sizeof directory, "/sys/bus/%s/devices", bus);
    DIR *dir = opendir(directory);
    if (!dir) return 0;
    int count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir))) {
        if (entry->d_name[0] == '.') continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s/modalias", directory, entry->d_name);
        char *modalias = read_text(path, NULL);
        if (!modalias) continue;
        modalias[strcspn(modalias, "\n")] = 0;
        for (char *line = alias_table; line && *line; ) {
            char *end = strchr(line, '\n');
            if (end) *end = 0;
            char *space = strchr(line, ' ');
            if (space) {
                *space = 0;
                if (fnmatch(line, modalias, 0) == 0 && !is_loaded(space + 1)) {
                    load_module(space + 1);
                    count++;
                }
                *space = ' ';
            }
            if (end) *end = '\n';
            line = end ? end + 1 : NULL;
        }
        free(modalias);
    }
    closedir(dir);
    return count;
}

static void coldplug(void) {
    /* PCI first (virtio_pci), then the virtio devices it brings up. */
    for (int pass = 0; pass < 4; pass++)
        if (coldplug_bus("pci") + coldplug_bus("virtio") == 0) break;
}

static void load_list(const char *file) {
    char *list = read_text(file, NULL);
    for (char *name = list ? strtok(list, "\n") : NULL; name; name = strtok(NULL, "\n"))
        if (*name) load_module(name);
    free(list);
}

/* ------------------------------------------------------------------ the root */

/* The filesystem type of a device or image file, from its superblock magic. */
static const char *fs_type(const char *path) {
    unsigned char block[0x8006];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    ssize_t n = pread(fd, block, sizeof block, 0);
    close(fd);
    if (n >= 4 && memcmp(block, "hsqs", 4) == 0) return "squashfs";
    if (n >= 1028 && block[1024] == 0xe2 && block[1025] == 0xe1 && block[1026] == 0xf5
        && block[1027] == 0xe0) return "erofs";
    if (n >= 1082 && block[1080] == 0x53 && block[1081] == 0xef) return "ext4";
    if (n >= 0x8006 && memcmp(block + 0x8001, "CD001", 5) == 0) return "iso9660";
    return NULL;
}

static int wait_block(const char *path, int tenths) {
    struct stat st;
    for (int i = 0; i < tenths * 2; i++) {
        if (stat(path, &st) == 0 && S_ISBLK(st.st_mode)) return 1;
        usleep(50000);
    }
    return stat(path, &st) == 0 && S_ISBLK(st.st_mode);
}

/* pci:0000:00:02.0 -> /dev/vdX of the virtio disk at that address. */
static int block_of_pci(const char *address, char *device, size_t size) {
    char path[512];
    for (int i = 0; i < 100; i++) {
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s", address);
        DIR *dir = opendir(path);
        struct dirent *entry;
        while (dir && (entry = readdir(dir))) {
            if (strncmp(entry->d_name, "virtio", 6) != 0) continue;
            char blocks[1024];
            snprintf(blocks, sizeof blocks, "%s/%s/block", path, entry->d_name);
            DIR *bdir = opendir(blocks);
            struct dirent *b;
            while (bdir && (b = readdir(bdir))) {
                if (b->d_name[0] == '.') continue;
                snprintf(device, size, "/dev/%s", b->d_name);
                closedir(bdir);
                closedir(dir);
                return wait_block(device, 50);
            }
            if (bdir) closedir(bdir);
        }
        if (dir) closedir(dir);
        usleep(50000);
    }
    return 0;
}

/* A larger readahead on the root's disk: Python's first start faults in its binary,
 * libraries and byte code; at the default 128 KiB each fault is a virtio request and an
 * interrupt to handle under TCG. 4 MiB: the interpreter's start 367 -> 339 ms (16 KiB:
 * 417). `device` is /dev/NAME of a whole disk. */
#define ROOT_READAHEAD_KB "4096"

static void set_readahead(const char *device) {
    char path[400];
    const char *name = strrchr(device, '/');
    snprintf(path, sizeof path, "/sys/class/block/%s/queue/read_ahead_kb", name ? name + 1 : device);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, ROOT_READAHEAD_KB, strlen(ROOT_READAHEAD_KB)) < 0) {
        if (debug) say("cannot set %s: %s", path, strerror(errno));
    }
    if (fd >= 0) close(fd);
}

/* Attach `file` to a free loop device, whose path goes to `device`; returns the open
 * loop device (-1 on failure). Close it only once the mount holds the device: the loop
 * is set to detach itself when the last user lets go. */
static int loop_attach(const char *file, char *device, size_t size) {
    int control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (control < 0) return -1;
    int number = ioctl(control, LOOP_CTL_GET_FREE);
    close(control);
    if (number < 0) return -1;
    snprintf(device, size, "/dev/loop%d", number);
    int backing = open(file, O_RDONLY | O_CLOEXEC);
    int loop = open(device, O_RDWR | O_CLOEXEC);
    if (backing >= 0 && loop >= 0) {
        struct loop_config config;
        memset(&config, 0, sizeof config);
        config.fd = backing;
        config.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        if (ioctl(loop, LOOP_CONFIGURE, &config) == 0) {
            close(backing);
            return loop;
        }
    }
    if (backing >= 0) close(backing);
    if (loop >= 0) close(loop);
    return -1;
}

static void mount_image(const char *image, const char *target) {
    char device[64];
    const char *type = fs_type(image);
    if (!type) fail("%s holds no squashfs, erofs or ext4 image", image);
    int loop = loop_attach(image, device, sizeof device);
    if (loop < 0) fail("cannot attach %s to a loop device: %s", image, strerror(errno));
    if (mount_at(device, target, type, MS_RDONLY, NULL) != 0)
        fail("cannot mount %s (%s): %s", image, type, strerror(errno));
    close(loop);
}

/* The boot CD: the first of sr0/sr1 that mounts, waiting up to 5 s for it. */
static void mount_cd(void) {
    for (int i = 0; i < 100; i++) {
        const char *devices[] = {"/dev/sr0", "/dev/sr1"};
        for (int d = 0; d < 2; d++)
            if (mount_at(devices[d], "/cdrom", "iso9660", MS_RDONLY, NULL) == 0) return;
        usleep(50000);
    }
    fail("no boot CD (/dev/sr0) with the root image found");
}

/* ------------------------------------------------------------------ main */

static const char *kernel_arg(const char *cmdline, const char *name, char *value, size_t size) {
    size_t n = strlen(name);
    for (const char *p = cmdline; (p = strstr(p, name)); p += n) {
        if ((p == cmdline || p[-1] == ' ') && p[n] == '=') {
            snprintf(value, size, "%.*s", (int)strcspn(p + n + 1, " \n"), p + n + 1);
            return value;
        }
    }
    return NULL;
}

int main(void) {
    mark("kernel");
    mount_at("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_at("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_at("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    setvbuf(stderr, NULL, _IONBF, 0);

    char *cmdline = read_text("/proc/cmdline", NULL);
    if (!cmdline) cmdline = strdup("");
    char value[256], root[256] = "", debug_text[16] = "0";
    if (kernel_arg(cmdline, "tether.debug", value, sizeof value)) {
        debug = atoi(value);
        snprintf(debug_text, sizeof debug_text, "%d", debug);
    }
    debug_image = kernel_arg(cmdline, "tether.image", value, sizeof value)
                  && strcmp(value, "debug") == 0;
    int shell_first = kernel_arg(cmdline, "tether.shell", value, sizeof value)
                      && strcmp(value, "1") == 0;
    kernel_arg(cmdline, "tether.root", root, sizeof root);
    if (debug) say("start");

    module_table = read_text("/stage0/modules", NULL);
    alias_table = read_text("/stage0/aliases", NULL);
    coldplug();
    int from_cd = root[0] == 0;
    if (from_cd) {
        load_list("/stage0/cd");
        load_list("/stage0/iso");
    }
    mark("modules");

    /* The root image and the project layer, read-only. */
    char device[320];
    const char *lower = "/base";
    struct stat st;
    if (!from_cd && strncmp(root, "pci:", 4) == 0) {
        if (!block_of_pci(root + 4, device, sizeof device))
            fail("no virtio disk at PCI address %s", root + 4);
    } else if (!from_cd) {
        snprintf(device, sizeof device, "%s", root);
        if (!wait_block(device, 50)) fail("root device %s did not appear", device);
    }
    const char *type = from_cd ? "iso9660" : fs_type(device);
    if (!type) fail("%s holds no squashfs, erofs, ext4 or ISO 9660 filesystem", device);
    if (strcmp(type, "iso9660") == 0) {
        if (from_cd) {
            mount_cd();
        } else {
            load_list("/stage0/iso");
            if (mount_at(device, "/cdrom", "iso9660", MS_RDONLY, NULL) != 0)
                fail("cannot mount %s: %s", device, strerror(errno));
        }
        if (stat("/cdrom/root.sqfs", &st) != 0)
            fail("/root.sqfs missing on %s", from_cd ? "the boot CD" : device);
        mount_image("/cdrom/root.sqfs", "/base");
    } else {
        if (strcmp(type, "ext4") != 0) load_module(type);
        set_readahead(device);
        if (mount_at(device, "/base", type, MS_RDONLY, NULL) != 0)
            fail("cannot mount the root %s (%s): %s", device, type, strerror(errno));
    }
    if (stat("/code/usr", &st) == 0) {
        lower = "/code:/base";
    } else if (stat("/cdrom/tether.sqfs", &st) == 0) {
        mount_image("/cdrom/tether.sqfs", "/code");
        lower = "/code:/base";
    }
    if (mount_at("tmpfs", "/rw", "tmpfs", 0, "mode=0755") != 0)
        fail("cannot mount a tmpfs: %s", strerror(errno));
    mkdirs("/rw/upper");
    mkdirs("/rw/work");
    load_module("overlay");
    char options[256];
    snprintf(options, sizeof options, "lowerdir=%s,upperdir=/rw/upper,workdir=/rw/work", lower);
    if (mount_at("overlay", "/newroot", "overlay", 0, options) != 0)
        fail("cannot mount the overlay root: %s", strerror(errno));
    mark("root");

    /* The layers stay reachable (and visible in /proc/mounts) under /run/bootstrap. */
    const char *layers[] = {"cdrom", "base", "code", "rw"};
    for (int i = 0; i < 4; i++) {
        char from[64], to[96];
        snprintf(from, sizeof from, "/%s", layers[i]);
        snprintf(to, sizeof to, "/newroot/run/bootstrap/%s", layers[i]);
        if (stat(from, &st) != 0) continue;
        mkdirs(to);
        if (mount(from, to, NULL, MS_MOVE, NULL) != 0)      /* not a mount point: /code */
            mount(from, to, NULL, MS_BIND, NULL);
    }
    const char *system[] = {"/dev", "/sys", "/proc"};
    for (int i = 0; i < 3; i++) {
        char to[64];
        snprintf(to, sizeof to, "/newroot%s", system[i]);
        mkdirs(to);
        mount(system[i], to, NULL, MS_MOVE, NULL);
    }
    if (shell_first) {
        say("tether.shell=1: shell before switch_root (root at /newroot); exit to continue");
        run_shell();
    }

    /* switch_root: the new root becomes /, the initramfs stays in memory underneath. */
    if (chdir("/newroot") != 0 || mount(".", "/", NULL, MS_MOVE, NULL) != 0
        || chroot(".") != 0 || chdir("/") != 0)
        fail("cannot switch to the new root: %s", strerror(errno));

    setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
    setenv("HOME", "/", 1);
    setenv("TERM", "linux", 1);
    setenv("LANG", "C.UTF-8", 1);
    /* A fresh TCG guest has no entropy yet: Python would wait for it for its hash seed. */
    setenv("PYTHONHASHSEED", "0", 1);
    setenv("PYTHONDONTWRITEBYTECODE", "1", 1);
    setenv("PYTHONUNBUFFERED", "1", 1);
    setenv("TETHER_DEBUG", debug_text, 1);
    setenv("TETHER_IMAGE", debug_image ? "debug" : "release", 1);
    mark("exec");
    setenv("TETHER_BOOT_MARKS", marks, 1);
    if (debug_image) {
        execl("/usr/local/sbin/tether-debug-init", "tether-debug-init", (char *)NULL);
        say("cannot run tether-debug-init: %s; starting the agent", strerror(errno));
    }
    execl(AGENT, AGENT, (char *)NULL);
    fail("cannot run %s: %s", AGENT, strerror(errno));
    return 1;
}
