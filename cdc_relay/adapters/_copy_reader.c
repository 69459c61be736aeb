/*
 * cdc_relay.adapters._kafka_acks.CopyReader: the replication stream's next CopyData frame, read
 * from libpq in one C call (docs/performance.md, "Reading frames in C").
 *
 * ReplicationStream.read() calls psycopg's PGconn.get_copy_data(1), which wraps each frame in
 * a buffer object, a memoryview and a tuple, from interpreted code: per event, more than the C
 * row path spends producing the record. CopyReader.read() does what read() does with libpq's
 * own PQgetCopyData and PQfreemem, on psycopg's connection (PGconn.pgconn_ptr), and answers a
 * bytes object: the frame, None when none is buffered, or whatever ``on_end(code)`` answers
 * (it raises): code -1 when the server ended the COPY, -2 when the connection failed, 0 when
 * stop() was called. The two functions come from the very libpq psycopg calls (the adapter
 * resolves them through psycopg's own extension module), never from another copy of it.
 *
 * detach() comes before the connection closes: PQfinish frees what ``conn`` points to.
 *
 * stop() is the notice handler's: libpq reports a warning from inside PQgetCopyData, in stream
 * order, so a frame read after stop() is dropped and on_end(0) raises instead, as read() does
 * after a skipped publication's warning.
 */

#include "_kafka_acks.h"

typedef int (*GetCopyData)(void *conn, char **buffer, int async);
typedef void (*FreeMem)(void *ptr);

typedef struct {
    PyObject_HEAD void *conn; /* psycopg's PGconn*, kept alive by ``owner`` */
    GetCopyData get_copy_data;
    FreeMem freemem;
    PyObject *owner;  /* psycopg's PGconn object: the connection outlives no reader */
    PyObject *on_end; /* on_end(code): raises why the stream gave no frame */
    int stopped;
    unsigned long long frames; /* frames read */
} CopyReader;

static PyObject *end(CopyReader *self, int code) {
    PyObject *arg = PyLong_FromLong(code), *out;
    if (arg == NULL)
        return NULL;
    out = PyObject_CallOneArg(self->on_end, arg);
    Py_DECREF(arg);
    return out;
}

/* CopyReader(pgconn, conn_ptr, get_copy_data_ptr, freemem_ptr, on_end). */
static PyObject *CopyReader_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *owner, *on_end;
    unsigned long long conn, get, freemem;
    CopyReader *self;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "CopyReader() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OKKKO:CopyReader", &owner, &conn, &get, &freemem, &on_end))
        return NULL;
    if (conn == 0 || get == 0 || freemem == 0) {
        PyErr_SetString(PyExc_ValueError, "CopyReader(): a null connection or function");
        return NULL;
    }
    if (!PyCallable_Check(on_end)) {
        PyErr_SetString(PyExc_TypeError, "CopyReader(): on_end must be callable");
        return NULL;
    }
    self = (CopyReader *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->conn = (void *)(uintptr_t)conn;
    self->get_copy_data = (GetCopyData)(uintptr_t)get;
    self->freemem = (FreeMem)(uintptr_t)freemem;
    Py_INCREF(owner);
    self->owner = owner;
    Py_INCREF(on_end);
    self->on_end = on_end;
    return (PyObject *)self;
}

static void CopyReader_dealloc(CopyReader *self) {
    Py_XDECREF(self->owner);
    Py_XDECREF(self->on_end);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* read() -> the next frame (bytes), None when none is buffered; on_end(code) otherwise. */
static PyObject *CopyReader_read(CopyReader *self, PyObject *unused) {
    char *buffer = NULL;
    int size;
    PyObject *frame;
    (void)unused;
    if (self->stopped)
        return end(self, 0);
    if (self->conn == NULL) /* detached: the connection is closed */
        return end(self, -2);
    size = self->get_copy_data(self->conn, &buffer, 1);
    if (self->stopped) { /* a warning came with this frame: not one frame after it */
        if (buffer != NULL)
            self->freemem(buffer);
        return end(self, 0);
    }
    if (size > 0) {
        frame = PyBytes_FromStringAndSize(buffer, size);
        self->freemem(buffer);
        if (frame != NULL)
            self->frames++;
        return frame;
    }
    if (buffer != NULL) /* not reached: libpq hands a buffer only with a frame */
        self->freemem(buffer);
    if (size == 0)
        Py_RETURN_NONE;
    return end(self, size < -1 ? -2 : -1);
}

static PyObject *CopyReader_stop(CopyReader *self, PyObject *unused) {
    (void)unused;
    self->stopped = 1;
    Py_RETURN_NONE;
}

static PyObject *CopyReader_detach(CopyReader *self, PyObject *unused) {
    (void)unused;
    self->conn = NULL;
    Py_RETURN_NONE;
}

static PyObject *CopyReader_frames(CopyReader *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromUnsignedLongLong(self->frames);
}

static PyMethodDef CopyReader_methods[] = {
    {"read", (PyCFunction)CopyReader_read, METH_NOARGS,
     "read() -> the next CopyData frame, None when none is buffered, else on_end(code)"},
    {"stop", (PyCFunction)CopyReader_stop, METH_NOARGS,
     "stop(): every later read() answers on_end(0), dropping the frame it read"},
    {"detach", (PyCFunction)CopyReader_detach, METH_NOARGS,
     "detach(): before the connection closes; every later read() answers on_end(-2)"},
    {"frames", (PyCFunction)CopyReader_frames, METH_NOARGS,
     "frames() -> how many frames read() returned"},
    {NULL, NULL, 0, NULL},
};

HIDDEN PyTypeObject CopyReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cdc_relay.adapters._kafka_acks.CopyReader",
    .tp_basicsize = sizeof(CopyReader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CopyReader(pgconn, conn_ptr, get_copy_data, freemem, on_end): CopyData frames "
              "read from libpq in C.",
    .tp_new = CopyReader_new,
    .tp_dealloc = (destructor)CopyReader_dealloc,
    .tp_methods = CopyReader_methods,
};
