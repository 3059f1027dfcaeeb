/* Optional accelerator for sipcore.transport: send many UDP datagrams with few system calls.
 *
 * sendmany(fd, family, queue, start) sends queue[start], queue[start + 1], ... from the
 * non-blocking UDP socket fd (of address family family: AF_INET or AF_INET6) with
 * sendmmsg(2), up to 64 datagrams per call, and returns the index of the first datagram it
 * did not send (len(queue) when it sent them all).  Each queue item is a tuple whose first
 * three items are (data: bytes, host: str, port: int); the rest is the caller's.
 *
 * It stops, without raising, at the first datagram it cannot or may not send: a host that
 * is not an IP address literal of the socket's family (for instance an IPv6 scope id, which
 * it does not parse), a port out of range, or one the kernel refused (EAGAIN with a full send
 * buffer, or any error).  The caller then sends that one through the event loop's transport,
 * which queues it or reports the error exactly as for a single send, and carries on.  So the
 * accelerator never decides what happens to a datagram; it only saves system calls, and a
 * server without it (no C compiler) behaves the same.
 *
 * Why: on a busy server one wake-up of the event loop reads a burst of requests and sends a
 * burst of responses.  One sendmmsg for the burst instead of one sendto each saves the
 * per-call entry cost and lets the receiver be woken once for several datagrams
 * (bench/sip_load.py: about a quarter of the CPU per REGISTER pair at the top of the ladder).
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#ifndef SOURCE_HASH
#define SOURCE_HASH ""
#endif

#define CHUNK 64

/* Fill *addr for (host, port); 0 on success, -1 when it is not a literal of family. */
static int
fill_address(PyObject *host, PyObject *port, int family, struct sockaddr_storage *addr,
             socklen_t *len)
{
    if (!PyUnicode_Check(host) || !PyLong_Check(port)) {
        return -1;
    }
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(host, &size);
    if (text == NULL) {
        PyErr_Clear();
        return -1;
    }
    if ((Py_ssize_t)strlen(text) != size) {
        return -1; /* an embedded NUL: not an address */
    }
    long number = PyLong_AsLong(port);
    if (number == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (number < 0 || number > 65535) {
        return -1;
    }
    memset(addr, 0, sizeof *addr);
    if (family == AF_INET) {
        struct sockaddr_in *in4 = (struct sockaddr_in *)addr;
        if (inet_pton(AF_INET, text, &in4->sin_addr) != 1) {
            return -1;
        }
        in4->sin_family = AF_INET;
        in4->sin_port = htons((unsigned short)number);
        *len = sizeof *in4;
        return 0;
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)addr;
        if (inet_pton(AF_INET6, text, &in6->sin6_addr) != 1) {
            return -1;
        }
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)number);
        *len = sizeof *in6;
        return 0;
    }
    return -1;
}

static PyObject *
sendmany(PyObject *self, PyObject *args)
{
    int fd, family;
    PyObject *queue;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "iiO!n", &fd, &family, &PyList_Type, &queue, &start)) {
        return NULL;
    }
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "start must not be negative");
        return NULL;
    }
    struct mmsghdr msgs[CHUNK];
    struct iovec iov[CHUNK];
    struct sockaddr_storage addrs[CHUNK];
    Py_ssize_t index = start;
    /* The list is not changed meanwhile: nothing here runs Python code or releases the GIL. */
    while (index < PyList_GET_SIZE(queue)) {
        Py_ssize_t total = PyList_GET_SIZE(queue);
        int count = 0;
        int stop = 0; /* an item this call cannot send comes next */
        while (count < CHUNK && index + count < total) {
            PyObject *item = PyList_GET_ITEM(queue, index + count);
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 3) {
                stop = 1;
                break;
            }
            PyObject *data = PyTuple_GET_ITEM(item, 0);
            socklen_t len = 0;
            if (!PyBytes_Check(data) || PyBytes_GET_SIZE(data) == 0
                || fill_address(PyTuple_GET_ITEM(item, 1), PyTuple_GET_ITEM(item, 2), family,
                                &addrs[count], &len) < 0) {
                stop = 1;
                break;
            }
            iov[count].iov_base = PyBytes_AS_STRING(data);
            iov[count].iov_len = (size_t)PyBytes_GET_SIZE(data);
            memset(&msgs[count], 0, sizeof msgs[count]);
            msgs[count].msg_hdr.msg_iov = &iov[count];
            msgs[count].msg_hdr.msg_iovlen = 1;
            msgs[count].msg_hdr.msg_name = &addrs[count];
            msgs[count].msg_hdr.msg_namelen = len;
            count++;
        }
        if (count == 0) {
            break;
        }
        int sent;
        do {
            sent = sendmmsg(fd, msgs, (unsigned int)count, MSG_DONTWAIT);
        } while (sent < 0 && errno == EINTR);
        if (sent <= 0) {
            break; /* the first of them was refused: the caller sends it the slow way */
        }
        index += sent;
        if (sent < count || stop) {
            break;
        }
    }
    return PyLong_FromSsize_t(index);
}

static PyMethodDef methods[] = {
    {"sendmany", sendmany, METH_VARARGS,
     "sendmany(fd, family, queue, start) -> index of the first datagram not sent"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_udpsend", "Batched UDP sends (sendmmsg) for sipcore.transport.",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__udpsend(void)
{
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "SOURCE_HASH", SOURCE_HASH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
