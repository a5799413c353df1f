/* The boot floor for benchmarks/vm.py: the least a container VM's init can do.
 *
 * PID 1 of a minimal initramfs booted by the same kernel, command line and QEMU machine
 * as the agent: it loads the modules that make the guestinfo port appear (listed in
 * /modules.load, dependencies first), finds the virtio-serial port org.tether.guestinfo
 * in sysfs, writes the primary session's `started` key as `true` at once (the key is the
 * kernel argument floor.started=KEY), reads the host's reply and powers off. Nothing is
 * decoded, mounted or run: the time to get here is the floor under any agent.
 *
 * Built static by the benchmark (gcc -static -O2); the message framing is
 * extraconfig/virtio.py's: a 4-byte big-endian length, then "info-set KEY VALUE".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void say(const char *text) {
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (fd >= 0) {
        (void)!write(fd, "floor: ", 7);
        (void)!write(fd, text, strlen(text));
        (void)!write(fd, "\n", 1);
        close(fd);
    }
}

static void power_off(void) {
    sync();
    reboot(RB_POWER_OFF);
    for (;;) pause();
}

static int read_file(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return (int)n;
}

static void load_modules(void) {
    char list[4096], *line, *save = NULL;
    if (read_file("/modules.load", list, sizeof list) < 0) return;
    for (line = strtok_r(list, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        int fd = open(line, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || syscall(SYS_finit_module, fd, "", 0) != 0) say(line);
        if (fd >= 0) close(fd);
    }
}

/* /dev/vportNpM of the port named `name`, from /sys/class/virtio-ports/<dev>/name. */
static int find_port(const char *name, char *dev, size_t size) {
    DIR *dir = opendir("/sys/class/virtio-ports");
    struct dirent *entry;
    char path[512], text[256];
    if (!dir) return -1;
    while ((entry = readdir(dir))) {
        if (entry->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", entry->d_name);
        if (read_file(path, text, sizeof text) > 0) {
            text[strcspn(text, "\n")] = 0;
            if (strcmp(text, name) == 0) {
                snprintf(dev, size, "/dev/%s", entry->d_name);
                closedir(dir);
                return 0;
            }
        }
    }
    closedir(dir);
    return -1;
}

int main(void) {
    char cmdline[4096], key[512] = "", dev[300], message[1024], reply[256];
    mkdir("/dev", 0755);
    mkdir("/proc", 0755);
    mkdir("/sys", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    if (read_file("/proc/cmdline", cmdline, sizeof cmdline) > 0) {
        char *arg = strstr(cmdline, "floor.started=");
        if (arg) sscanf(arg + strlen("floor.started="), "%511s", key);
    }
    if (!key[0]) { say("no floor.started=KEY on the kernel command line"); power_off(); }
    load_modules();
    /* The driver adds its ports as the device announces them, after the load returns. */
    for (int i = 0; i < 1000 && find_port("org.tether.guestinfo", dev, sizeof dev) != 0; i++)
        usleep(5000);
    if (find_port("org.tether.guestinfo", dev, sizeof dev) != 0) {
        say("no virtio-serial port org.tether.guestinfo");
        power_off();
    }
    int fd = open(dev, O_RDWR | O_NOCTTY);
    if (fd < 0) { say("cannot open the guestinfo port"); power_off(); }
    int len = snprintf(message + 4, sizeof message - 4, "info-set %s true", key);
    message[0] = (char)(len >> 24); message[1] = (char)(len >> 16);
    message[2] = (char)(len >> 8); message[3] = (char)len;
    if (write(fd, message, len + 4) != len + 4) say("short write on the guestinfo port");
    (void)!read(fd, reply, sizeof reply);    /* the host's "1 ": it has the key */
    close(fd);
    power_off();
    return 0;
}
