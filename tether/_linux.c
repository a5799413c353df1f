/*
 * _linux: the Linux system calls the agent needs that the os module lacks, each a thin
 * call with plain arguments. tether/system.py is their only caller and gives each its
 * Python form and its error (OSError with the path): here every call returns the
 * kernel's answer as an int, a negative errno on failure, and never raises for it.
 *
 * Why not ctypes: importing it (libffi, its classes) was ~38 ms of a VM's cold boot
 * under TCG, paid by PID 1 before its first mount; and a call made through it with a
 * wrong argument type is a crash of PID 1 that no compiler sees.
 *
 * Paths are bytes without a NUL (ValueError otherwise), or None where the call takes
 * NULL. Every call that can block (mount of a network filesystem, say) releases the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef SYS_openat2   /* headers older than Linux 5.6 */
#if defined(__alpha__) || defined(__ia64__) || defined(__mips__)
#error "openat2's number is offset on this architecture: build with newer kernel headers"
#endif
#define SYS_openat2 437   /* the same on every other architecture */
#endif

/* openat2(2)'s argument (linux/openat2.h), spelled out: glibc 2.36 has no header for it */
struct tether_open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};

/* "O&" converter: bytes without NUL -> char *; None -> NULL (where allowed). */
static int
path_arg(PyObject *obj, void *out)
{
    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "a path must be bytes, not %.80s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    if ((size_t)PyBytes_GET_SIZE(obj) != strlen(PyBytes_AS_STRING(obj))) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return 0;
    }
    *(const char **)out = PyBytes_AS_STRING(obj);
    return 1;
}

static int
optional_path_arg(PyObject *obj, void *out)
{
    if (obj == Py_None) {
        *(const char **)out = NULL;
        return 1;
    }
    return path_arg(obj, out);
}

/* The result of a call that returns -1 and sets errno: the value, or -errno. The call is
 * made before this (its own statement): C leaves the order of arguments open. */
static PyObject *
answer(long result, int err)
{
    return PyLong_FromLong(result < 0 ? -err : result);
}

static PyObject *
linux_mount(PyObject *self, PyObject *args)
{
    const char *source, *target, *fstype, *data;
    unsigned long flags;
    long result;
    int err;
    if (!PyArg_ParseTuple(args, "O&O&O&kO&:mount", optional_path_arg, &source, path_arg,
                          &target, optional_path_arg, &fstype, &flags, optional_path_arg,
                          &data))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    result = mount(source, target, fstype, flags, data);
    err = errno;
    Py_END_ALLOW_THREADS
    return answer(result, err);
}

static PyObject *
linux_umount2(PyObject *self, PyObject *args)
{
    const char *target;
    int flags;
    long result;
    int err;
    if (!PyArg_ParseTuple(args, "O&i:umount2", path_arg, &target, &flags))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    result = umount2(target, flags);
    err = errno;
    Py_END_ALLOW_THREADS
    return answer(result, err);
}

static PyObject *
linux_openat2(PyObject *self, PyObject *args)
{
    int dirfd;
    const char *path;
    struct tether_open_how how = {0, 0, 0};
    unsigned long long flags, mode, resolve;
    long result;
    int err;
    if (!PyArg_ParseTuple(args, "iO&KKK:openat2", &dirfd, path_arg, &path, &flags, &mode,
                          &resolve))
        return NULL;
    how.flags = flags;
    how.mode = mode;
    how.resolve = resolve;
    Py_BEGIN_ALLOW_THREADS
    result = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    err = errno;
    Py_END_ALLOW_THREADS
    return answer(result, err);
}

static PyObject *
linux_renameat2(PyObject *self, PyObject *args)
{
    int old_dirfd, new_dirfd;
    const char *old_path, *new_path;
    unsigned int flags;
    long result;
    int err;
    if (!PyArg_ParseTuple(args, "iO&iO&I:renameat2", &old_dirfd, path_arg, &old_path,
                          &new_dirfd, path_arg, &new_path, &flags))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    result = renameat2(old_dirfd, old_path, new_dirfd, new_path, flags);
    err = errno;
    Py_END_ALLOW_THREADS
    return answer(result, err);
}

static PyObject *
linux_tee(PyObject *self, PyObject *args)
{
    int fd_in, fd_out;
    Py_ssize_t count;
    unsigned int flags;
    ssize_t result;
    int err;
    if (!PyArg_ParseTuple(args, "iinI:tee", &fd_in, &fd_out, &count, &flags))
        return NULL;
    if (count < 0) {
        PyErr_SetString(PyExc_ValueError, "negative count");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    result = tee(fd_in, fd_out, (size_t)count, flags);
    err = errno;
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(result < 0 ? -err : result);
}

/* fstatfs(2)'s f_type, as the 32-bit magic number linux/magic.h spells (>= 0) */
static PyObject *
linux_filesystem_type(PyObject *self, PyObject *args)
{
    int fd, result, err;
    struct statfs buf;
    if (!PyArg_ParseTuple(args, "i:filesystem_type", &fd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    result = fstatfs(fd, &buf);
    err = errno;
    Py_END_ALLOW_THREADS
    if (result < 0)
        return PyLong_FromLong(-err);
    return PyLong_FromUnsignedLong((unsigned long)buf.f_type & 0xFFFFFFFFUL);
}

static PyObject *
linux_unshare(PyObject *self, PyObject *args)
{
    int flags;
    if (!PyArg_ParseTuple(args, "i:unshare", &flags))
        return NULL;
    long result = unshare(flags);
    return answer(result, errno);
}

static PyObject *
linux_setns(PyObject *self, PyObject *args)
{
    int fd, nstype;
    if (!PyArg_ParseTuple(args, "ii:setns", &fd, &nstype))
        return NULL;
    long result = setns(fd, nstype);
    return answer(result, errno);
}

static PyObject *
linux_reboot(PyObject *self, PyObject *args)
{
    int command;
    long result;
    int err;
    if (!PyArg_ParseTuple(args, "i:reboot", &command))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    result = reboot(command);
    err = errno;
    Py_END_ALLOW_THREADS
    return answer(result, err);
}

/* prctl(2) with integer arguments (the options python-prctl does not offer) */
static PyObject *
linux_prctl(PyObject *self, PyObject *args)
{
    int option;
    unsigned long a2 = 0, a3 = 0, a4 = 0, a5 = 0;
    if (!PyArg_ParseTuple(args, "i|kkkk:prctl", &option, &a2, &a3, &a4, &a5))
        return NULL;
    long result = prctl(option, a2, a3, a4, a5);
    return answer(result, errno);
}

static PyObject *
linux_inotify_init1(PyObject *self, PyObject *args)
{
    int flags;
    if (!PyArg_ParseTuple(args, "i:inotify_init1", &flags))
        return NULL;
    long result = inotify_init1(flags);
    return answer(result, errno);
}

static PyObject *
linux_inotify_add_watch(PyObject *self, PyObject *args)
{
    int fd;
    const char *path;
    unsigned int mask;
    long result;
    int err;
    if (!PyArg_ParseTuple(args, "iO&I:inotify_add_watch", &fd, path_arg, &path, &mask))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    result = inotify_add_watch(fd, path, mask);
    err = errno;
    Py_END_ALLOW_THREADS
    return answer(result, err);
}

static PyObject *
linux_inotify_rm_watch(PyObject *self, PyObject *args)
{
    int fd, wd;
    if (!PyArg_ParseTuple(args, "ii:inotify_rm_watch", &fd, &wd))
        return NULL;
    long result = inotify_rm_watch(fd, wd);
    return answer(result, errno);
}

static PyMethodDef linux_methods[] = {
    {"mount", linux_mount, METH_VARARGS,
     "mount(source|None, target, fstype|None, flags, data|None) -> 0 or -errno"},
    {"umount2", linux_umount2, METH_VARARGS, "umount2(target, flags) -> 0 or -errno"},
    {"openat2", linux_openat2, METH_VARARGS,
     "openat2(dirfd, path, flags, mode, resolve) -> fd or -errno"},
    {"renameat2", linux_renameat2, METH_VARARGS,
     "renameat2(old_dirfd, old, new_dirfd, new, flags) -> 0 or -errno"},
    {"tee", linux_tee, METH_VARARGS, "tee(fd_in, fd_out, count, flags) -> bytes or -errno"},
    {"filesystem_type", linux_filesystem_type, METH_VARARGS,
     "filesystem_type(fd) -> fstatfs's f_type (32 bits) or -errno"},
    {"unshare", linux_unshare, METH_VARARGS, "unshare(flags) -> 0 or -errno"},
    {"setns", linux_setns, METH_VARARGS, "setns(fd, nstype) -> 0 or -errno"},
    {"reboot", linux_reboot, METH_VARARGS, "reboot(command) -> 0 or -errno"},
    {"prctl", linux_prctl, METH_VARARGS, "prctl(option, a2=0, a3=0, a4=0, a5=0) -> result or -errno"},
    {"inotify_init1", linux_inotify_init1, METH_VARARGS, "inotify_init1(flags) -> fd or -errno"},
    {"inotify_add_watch", linux_inotify_add_watch, METH_VARARGS,
     "inotify_add_watch(fd, path, mask) -> wd or -errno"},
    {"inotify_rm_watch", linux_inotify_rm_watch, METH_VARARGS,
     "inotify_rm_watch(fd, wd) -> 0 or -errno"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef linux_module = {
    PyModuleDef_HEAD_INIT, "tether._linux",
    "Linux system calls the os module lacks; results as ints, -errno on failure.",
    -1, linux_methods,
};

PyMODINIT_FUNC
PyInit__linux(void)
{
    return PyModule_Create(&linux_module);
}
