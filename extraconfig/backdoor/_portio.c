/*
 * _portio: the few x86 instructions the VMware backdoor needs, and nothing else.
 *
 * cpuid(leaf)              -> (eax, ebx, ecx, edx)
 * grant(port, count)       ioperm() for [port, port+count), else iopl(3); per thread
 *                          (a 4-byte `inl` needs all four of its ports granted)
 * backdoor(regs)           "inl %dx, %eax" with all of eax..ebp loaded and returned
 * hb_out(regs, data)       "rep outsb" with rsi -> data, rcx = len(data)
 * hb_in(regs, size)        "rep insb"  with rdi -> buffer of size, returns (regs, bytes)
 *
 * regs is a 7-tuple of unsigned 32-bit ints: (eax, ebx, ecx, edx, esi, edi, ebp).
 * No instruction touching a port runs unless this thread was granted access first:
 * without it the CPU raises #GP and the process dies of SIGSEGV.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/io.h>

struct regs { uint64_t ax, bx, cx, dx, si, di, bp; };

/* Access granted to this thread (ioperm/iopl are per thread on Linux). */
static __thread int port_access;

/*
 * Each routine loads every register from *r, runs one instruction, and stores every
 * register back. rbp cannot be named as a clobber, so it is saved on the stack; the
 * red zone below rsp is stepped over first because inline asm may sit in a leaf.
 */
#define BACKDOOR_ASM(insn)                                  \
    __asm__ volatile(                                       \
        "lea -128(%%rsp), %%rsp\n\t"                        \
        "push %%rbp\n\t"                                    \
        "push %%rax\n\t"                                    \
        "mov 48(%%rax), %%rbp\n\t"                          \
        "mov 40(%%rax), %%rdi\n\t"                          \
        "mov 32(%%rax), %%rsi\n\t"                          \
        "mov 24(%%rax), %%rdx\n\t"                          \
        "mov 16(%%rax), %%rcx\n\t"                          \
        "mov 8(%%rax), %%rbx\n\t"                           \
        "mov 0(%%rax), %%rax\n\t"                           \
        "cld\n\t"                                           \
        insn "\n\t"                                         \
        "xchg %%rax, (%%rsp)\n\t"                           \
        "mov %%rbp, 48(%%rax)\n\t"                          \
        "mov %%rdi, 40(%%rax)\n\t"                          \
        "mov %%rsi, 32(%%rax)\n\t"                          \
        "mov %%rdx, 24(%%rax)\n\t"                          \
        "mov %%rcx, 16(%%rax)\n\t"                          \
        "mov %%rbx, 8(%%rax)\n\t"                           \
        "popq 0(%%rax)\n\t"                                 \
        "pop %%rbp\n\t"                                     \
        "lea 128(%%rsp), %%rsp\n\t"                         \
        : "+a"(r)                                           \
        :                                                   \
        : "rbx", "rcx", "rdx", "rsi", "rdi", "memory", "cc")

static void do_in(struct regs *r) { BACKDOOR_ASM("inl %%dx, %%eax"); }
static void do_outsb(struct regs *r) { BACKDOOR_ASM("rep outsb"); }
static void do_insb(struct regs *r) { BACKDOOR_ASM("rep insb"); }

static int parse_regs(PyObject *tuple, struct regs *r)
{
    unsigned int v[7];
    if (!PyArg_ParseTuple(tuple, "IIIIIII;regs must be 7 unsigned 32-bit ints",
                          &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6]))
        return -1;
    r->ax = v[0]; r->bx = v[1]; r->cx = v[2]; r->dx = v[3];
    r->si = v[4]; r->di = v[5]; r->bp = v[6];
    return 0;
}

static PyObject *build_regs(const struct regs *r)
{
    return Py_BuildValue("(IIIIIII)", (unsigned int)r->ax, (unsigned int)r->bx,
                         (unsigned int)r->cx, (unsigned int)r->dx, (unsigned int)r->si,
                         (unsigned int)r->di, (unsigned int)r->bp);
}

static int require_access(void)
{
    if (!port_access) {
        PyErr_SetString(PyExc_PermissionError,
                        "this thread has no I/O port access: call grant() first");
        return -1;
    }
    return 0;
}

static PyObject *py_cpuid(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned int leaf, subleaf = 0, a = 0, b = 0, c = 0, d = 0;
    if (!PyArg_ParseTuple(args, "I|I", &leaf, &subleaf))
        return NULL;
    __cpuid_count(leaf, subleaf, a, b, c, d);
    return Py_BuildValue("(IIII)", a, b, c, d);
}

static PyObject *py_grant(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned int port, count;
    if (!PyArg_ParseTuple(args, "II", &port, &count))
        return NULL;
    if (port_access)
        Py_RETURN_NONE;
    /* Just the backdoor's ports if the kernel allows it, else every port. */
    if (ioperm(port, count, 1) == 0) {
        port_access = 1;
        Py_RETURN_NONE;
    }
    if (iopl(3) == 0) {
        port_access = 1;
        Py_RETURN_NONE;
    }
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *py_backdoor(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *tuple;
    struct regs r;
    if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &tuple) || parse_regs(tuple, &r) < 0)
        return NULL;
    if (require_access() < 0)
        return NULL;
    do_in(&r);
    return build_regs(&r);
}

static PyObject *py_hb_out(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *tuple;
    Py_buffer data;
    struct regs r;
    if (!PyArg_ParseTuple(args, "O!y*", &PyTuple_Type, &tuple, &data))
        return NULL;
    if (parse_regs(tuple, &r) < 0 || require_access() < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    r.si = (uint64_t)(uintptr_t)data.buf;
    r.cx = (uint64_t)data.len;
    do_outsb(&r);
    PyBuffer_Release(&data);
    return build_regs(&r);
}

static PyObject *py_hb_in(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *tuple, *buffer, *result;
    Py_ssize_t size;
    struct regs r;
    if (!PyArg_ParseTuple(args, "O!n", &PyTuple_Type, &tuple, &size) || parse_regs(tuple, &r) < 0)
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must not be negative");
        return NULL;
    }
    if (require_access() < 0)
        return NULL;
    buffer = PyBytes_FromStringAndSize(NULL, size);
    if (buffer == NULL)
        return NULL;
    r.di = (uint64_t)(uintptr_t)PyBytes_AS_STRING(buffer);
    r.cx = (uint64_t)size;
    do_insb(&r);
    result = Py_BuildValue("(NN)", build_regs(&r), buffer);
    return result;
}

static PyMethodDef methods[] = {
    {"cpuid", py_cpuid, METH_VARARGS, "cpuid(leaf, subleaf=0) -> (eax, ebx, ecx, edx)"},
    {"grant", py_grant, METH_VARARGS, "grant(port, count): I/O port access for this thread"},
    {"backdoor", py_backdoor, METH_VARARGS, "backdoor(regs) -> regs: inl on the port in dx"},
    {"hb_out", py_hb_out, METH_VARARGS, "hb_out(regs, data) -> regs: rep outsb"},
    {"hb_in", py_hb_in, METH_VARARGS, "hb_in(regs, size) -> (regs, bytes): rep insb"},
    {NULL, NULL, 0, NULL},
};
#define PORTIO_SUPPORTED 1
#else
static PyMethodDef methods[] = {{NULL, NULL, 0, NULL}};
#define PORTIO_SUPPORTED 0
#endif

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_portio", "x86 port I/O for the VMware backdoor", -1, methods,
};

PyMODINIT_FUNC PyInit__portio(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "SUPPORTED", PORTIO_SUPPORTED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
