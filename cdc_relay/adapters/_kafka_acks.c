/*
 * cdc_relay.adapters._kafka_acks: the per-event Kafka path without a Python object per
 * delivery report (docs/performance.md, "The compiled core").
 *
 * confluent-kafka builds, for every delivery report, a Message with copies of the key and the
 * value, and calls a Python callback with it. This extension is also a librdkafka interceptor
 * plugin (plugin.library.paths names this very file), so it sees every acknowledgement
 * (on_acknowledgement, in librdkafka's broker threads). A record produced through
 * Acks.produce() carries its token (the transaction it belongs to) as its opaque, tagged in
 * its lowest bit; on_acknowledgement takes the token, notes the report under a mutex, and
 * clears the opaque, so that confluent-kafka's delivery callback, which runs later for the
 * same message in the relay's poll, finds none and returns at once. collect() hands the
 * reports to the Python thread in one list: (token, events, bytes) per transaction, and one
 * tuple per failed record with what the pipeline needs to judge it.
 *
 * The opaque is cleared although rdkafka.h calls the message immutable in that interceptor:
 * librdkafka passes it on to the delivery callback and reads it nowhere else. The tag keeps
 * it safe beside records of confluent-kafka's own produce(), whose opaque (its per-message
 * state, a malloc()ed pointer, never odd) is left alone. tests/unit/test_kafka_publisher.py
 * runs both kinds on one producer.
 *
 * librdkafka is the copy confluent-kafka loaded: found among the process's loaded objects
 * and reached through dlsym, so the build needs no librdkafka headers or library. The few
 * declarations below are librdkafka's public ABI (rdkafka.h), stable since 1.x.
 */

#include "_kafka_acks.h"

#include <dlfcn.h>
#include <link.h>

HIDDEN Rdk rdk;

static const char *IC_NAME = "cdc_relay.acks";

/* ---------------------------------------------------------------- what is tracked */

/* A failed record, copied out of librdkafka's message in on_acknowledgement (the message is
 * freed after): what the pipeline needs to judge it, and to dead-letter it. One allocation. */
typedef struct {
    char *topic;
    char *key; /* NULL: no key */
    size_t key_size;
    char *value; /* NULL: no value */
    size_t value_size;
    size_t header_count;
    struct {
        char *name;
        char *value; /* NULL: a header without a value */
        size_t size;
    } headers[];
} Failed;

/* One report of a record of ours: its token (the transaction, the delivery callback the relay
 * would otherwise give confluent-kafka). Only the token is referenced (taken in produce(),
 * GIL held; released in collect()): holding each record's headers list until its report
 * would keep four tracked containers alive per record in flight, and Python's cyclic GC
 * would then run (and cost more than the report saves). librdkafka's threads only move the
 * pointers. */
struct Entry {
    PyObject *token;
    Py_ssize_t size; /* the value's length: what the in-flight byte bound counts */
    rd_kafka_resp_err_t err;
    Failed *failed; /* err != 0: the record, or NULL when even that copy found no memory */
};

HIDDEN __thread State *producing = NULL;

/* The state of the producer being created, set by on_new (which runs inside rd_kafka_new(),
 * on the thread creating the Producer, GIL held) until attach() takes it. */
static State *unattached = NULL;

/* Caller holds the lock. */
static int done_push(State *s, const Entry *entry) {
    if (s->done_count == s->done_capacity) {
        size_t capacity = s->done_capacity ? s->done_capacity * 2 : 1024;
        Entry *done = realloc(s->done, capacity * sizeof(Entry));
        if (done == NULL)
            return -1;
        s->done = done;
        s->done_capacity = capacity;
    }
    s->done[s->done_count++] = *entry;
    return 0;
}

/* ---------------------------------------------------------------- the interceptors */

static Failed *copy_failed(const rd_kafka_message_t *message) {
    rd_kafka_headers_t *hdrs = NULL;
    const char *topic = rdk.topic_name(message->rkt), *name;
    const void *value;
    size_t count = 0, size, bytes, i;
    char *at;
    Failed *f;
    if (rdk.message_headers(message, &hdrs) != ERR_NO_ERROR)
        hdrs = NULL;
    bytes = strlen(topic) + 1 + message->key_len + message->len;
    while (hdrs != NULL && rdk.header_get_all(hdrs, count, &name, &value, &size) == 0) {
        bytes += strlen(name) + 1 + size;
        count++;
    }
    f = malloc(sizeof(Failed) + count * sizeof(f->headers[0]) + bytes);
    if (f == NULL)
        return NULL;
    at = (char *)&f->headers[count];
    f->topic = strcpy(at, topic);
    at += strlen(topic) + 1;
    f->key = message->key ? memcpy(at, message->key, message->key_len) : NULL;
    f->key_size = message->key_len;
    at += message->key_len;
    f->value = message->payload ? memcpy(at, message->payload, message->len) : NULL;
    f->value_size = message->len;
    at += message->len;
    f->header_count = count;
    for (i = 0; i < count; i++) {
        rdk.header_get_all(hdrs, i, &name, &value, &size);
        f->headers[i].name = strcpy(at, name);
        at += strlen(name) + 1;
        f->headers[i].value = value ? memcpy(at, value, size) : NULL;
        f->headers[i].size = size;
        at += size;
    }
    return f;
}

static rd_kafka_resp_err_t on_ack(rd_kafka_t *rk, rd_kafka_message_t *message, void *opaque) {
    State *s = opaque;
    uintptr_t tagged = (uintptr_t)message->_private;
    Entry entry;
    (void)rk;
    if ((tagged & TAG) == 0)
        return ERR_NO_ERROR; /* confluent-kafka's own produce(): its callback will come */
    message->_private = NULL; /* so that confluent-kafka's delivery callback skips it */
    if (producing == s)
        return ERR_NO_ERROR;
    entry.token = (PyObject *)(tagged & ~TAG);
    entry.size = (Py_ssize_t)message->len;
    entry.err = message->err;
    entry.failed = entry.err != ERR_NO_ERROR ? copy_failed(message) : NULL;
    pthread_mutex_lock(&s->lock);
    if (done_push(s, &entry) != 0) {
        /* Cannot happen short of memory exhaustion; the record then stays counted in
         * flight, so its transaction is never confirmed: stuck, not lost. */
    }
    pthread_mutex_unlock(&s->lock);
    __atomic_sub_fetch(&s->in_flight, 1, __ATOMIC_RELAXED);
    return ERR_NO_ERROR;
}

static rd_kafka_resp_err_t on_new(rd_kafka_t *rk, const rd_kafka_conf_t *conf, void *opaque,
                                  char *errstr, size_t errstr_size) {
    State *s = calloc(1, sizeof(State));
    (void)conf;
    (void)opaque;
    if (s == NULL) {
        snprintf(errstr, errstr_size, "%s: out of memory", IC_NAME);
        return -1;
    }
    pthread_mutex_init(&s->lock, NULL);
    s->rk = rk;
    rdk.add_on_ack(rk, IC_NAME, on_ack, s);
    /* A producer created but never attached (its construction failed later) leaks this
     * small state: producers are created once per run and after fatal errors only. */
    unattached = s;
    return ERR_NO_ERROR;
}

/* The plugin entry point librdkafka looks up after dlopen()ing plugin.library.paths. */
__attribute__((visibility("default"))) rd_kafka_resp_err_t
conf_init(rd_kafka_conf_t *conf, void **plug_opaque, char *errstr, size_t errstr_size) {
    (void)plug_opaque;
    if (rdk.conf_add_on_new == NULL) {
        snprintf(errstr, errstr_size, "%s: import cdc_relay.adapters._kafka_acks first", IC_NAME);
        return -1;
    }
    return rdk.conf_add_on_new(conf, IC_NAME, on_new, NULL);
}

/* ---------------------------------------------------------------- the Python type */

/* A transaction's acknowledgements within one collect(). */
struct Run {
    PyObject *token;
    Py_ssize_t events;
    Py_ssize_t bytes;
};

HIDDEN PyObject *ProduceFailed;

static void entry_release(Entry *e) {
    Py_XDECREF(e->token);
    free(e->failed);
}

static PyObject *Acks_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    Acks *self;
    if (!PyArg_ParseTuple(args, ":Acks"))
        return NULL;
    if (unattached == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "no producer was created with this plugin since the last Acks()");
        return NULL;
    }
    self = (Acks *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->state = unattached;
    unattached = NULL;
    (void)kwargs;
    return (PyObject *)self;
}

/* The buffers and references stay with the state (librdkafka's threads may still report
 * into it until the producer is destroyed); dropping the Acks object drops what was
 * reported but not collected. */
static void Acks_dealloc(Acks *self) {
    State *s = self->state;
    if (s != NULL) {
        size_t i;
        pthread_mutex_lock(&s->lock);
        for (i = 0; i < s->done_count; i++)
            entry_release(&s->done[i]);
        s->done_count = 0;
        pthread_mutex_unlock(&s->lock);
    }
    free(self->runs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int utf8_of(PyObject *text, const char **out, Py_ssize_t *size) {
    *out = PyUnicode_AsUTF8AndSize(text, size);
    return *out == NULL ? -1 : 0;
}

/* bytes or None into (pointer, size). */
static int buffer_of(PyObject *obj, const char *what, void **ptr, size_t *size) {
    if (obj == Py_None) {
        *ptr = NULL;
        *size = 0;
        return 0;
    }
    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes or None, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *ptr = PyBytes_AS_STRING(obj);
    *size = (size_t)PyBytes_GET_SIZE(obj);
    return 0;
}

static rd_kafka_headers_t *headers_of(PyObject *headers) {
    Py_ssize_t n, i;
    rd_kafka_headers_t *out;
    if (!PyList_Check(headers)) {
        PyErr_SetString(PyExc_TypeError, "headers must be a list of (str, bytes) pairs");
        return NULL;
    }
    n = PyList_GET_SIZE(headers);
    out = rdk.headers_new((size_t)n);
    for (i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        const char *name;
        Py_ssize_t name_size;
        void *value;
        size_t value_size;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(pair, 0))) {
            PyErr_SetString(PyExc_TypeError, "headers must be a list of (str, bytes) pairs");
            goto fail;
        }
        if (utf8_of(PyTuple_GET_ITEM(pair, 0), &name, &name_size) != 0 ||
            buffer_of(PyTuple_GET_ITEM(pair, 1), "a header value", &value, &value_size) != 0)
            goto fail;
        rdk.header_add(out, name, name_size, value, (ssize_t)value_size);
    }
    return out;
fail:
    rdk.headers_destroy(out);
    return NULL;
}

/* produce(topic, value, key, partition, callback, on_delivery, timestamp, headers): the
 * signature and argument order of confluent-kafka's Producer.produce, so that the pipeline's
 * pump calls either. ``callback`` is the record's token, given back by collect(); it is not
 * called. ``on_delivery`` must be None. Raises BufferError when librdkafka's queue is full
 * and ProduceFailed(code, text) for any other refusal. */
static PyObject *Acks_produce(Acks *self, PyObject *const *args, Py_ssize_t nargs) {
    State *s = self->state;
    PyObject *topic, *value, *key, *token, *headers;
    const char *topic_name;
    Py_ssize_t topic_size;
    int32_t partition;
    int64_t timestamp;
    rd_kafka_vu_t vus[8];
    rd_kafka_headers_t *hdrs = NULL;
    size_t count = 6; /* and the opaque, which produce_tagged() adds */

    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "produce() takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    topic = args[0], value = args[1], key = args[2], token = args[4], headers = args[7];
    if (args[5] != Py_None) {
        PyErr_SetString(PyExc_TypeError, "produce(): on_delivery must be None");
        return NULL;
    }
    if (!PyUnicode_Check(topic)) {
        PyErr_SetString(PyExc_TypeError, "produce(): topic must be a str");
        return NULL;
    }
    if (utf8_of(topic, &topic_name, &topic_size) != 0)
        return NULL;
    partition = (int32_t)PyLong_AsLong(args[3]);
    timestamp = (int64_t)PyLong_AsLongLong(args[6]);
    if (PyErr_Occurred())
        return NULL;

    memset(vus, 0, sizeof(vus));
    vus[0].vtype = VTYPE_TOPIC;
    vus[0].u.cstr = topic_name;
    vus[1].vtype = VTYPE_PARTITION;
    vus[1].u.i32 = partition;
    vus[2].vtype = VTYPE_MSGFLAGS;
    vus[2].u.i = MSG_F_COPY;
    vus[3].vtype = VTYPE_VALUE;
    vus[4].vtype = VTYPE_KEY;
    if (buffer_of(value, "value", &vus[3].u.mem.ptr, &vus[3].u.mem.size) != 0 ||
        buffer_of(key, "key", &vus[4].u.mem.ptr, &vus[4].u.mem.size) != 0)
        return NULL;
    vus[5].vtype = VTYPE_TIMESTAMP;
    vus[5].u.i64 = timestamp;
    if (headers != Py_None) {
        hdrs = headers_of(headers);
        if (hdrs == NULL)
            return NULL;
        vus[6].vtype = VTYPE_HEADERS;
        vus[6].u.headers = hdrs;
        count = 7;
    }
    if (produce_tagged(s, vus, count, hdrs, token) != 0)
        return NULL;
    Py_RETURN_NONE;
}

int produce_tagged(State *s, rd_kafka_vu_t *vus, size_t count, rd_kafka_headers_t *hdrs,
                   PyObject *token) {
    rd_kafka_error_t *error;
    rd_kafka_resp_err_t err;
    vus[count].vtype = VTYPE_OPAQUE;
    vus[count].u.cstr = (const char *)((uintptr_t)token | TAG);
    __atomic_add_fetch(&s->in_flight, 1, __ATOMIC_RELAXED);
    producing = s;
    error = rdk.produceva(s->rk, vus, count + 1);
    producing = NULL;
    if (error == NULL) {
        /* The reference the record's opaque holds, until collect() (perhaps already
         * reported: collect() needs the GIL, held here). */
        Py_INCREF(token);
        return 0;
    }
    err = rdk.error_code(error);
    rdk.error_destroy(error);
    __atomic_sub_fetch(&s->in_flight, 1, __ATOMIC_RELAXED);
    if (hdrs != NULL)
        rdk.headers_destroy(hdrs); /* not taken over on failure */
    if (err == ERR__QUEUE_FULL) {
        PyErr_SetString(PyExc_BufferError, "Local: Queue full");
    } else {
        PyObject *why = Py_BuildValue("(is)", err, rdk.err2str(err));
        if (why != NULL) {
            PyErr_SetObject(ProduceFailed, why);
            Py_DECREF(why);
        }
    }
    return -1;
}

static PyObject *bytes_or_none(const char *data, size_t size) {
    if (data == NULL)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(data, (Py_ssize_t)size);
}

/* (token, code, text, topic, key, value, headers) of a failed record. */
static PyObject *failure_tuple(const Entry *e) {
    const Failed *f = e->failed;
    PyObject *headers, *result;
    size_t i;
    if (f == NULL) /* its copy found no memory: judged on its code alone */
        return Py_BuildValue("(OisOOO[])", e->token, e->err, rdk.err2str(e->err), Py_None,
                             Py_None, Py_None);
    headers = PyList_New((Py_ssize_t)f->header_count);
    if (headers == NULL)
        return NULL;
    for (i = 0; i < f->header_count; i++) {
        PyObject *pair =
            Py_BuildValue("(sN)", f->headers[i].name,
                          bytes_or_none(f->headers[i].value, f->headers[i].size));
        if (pair == NULL) {
            Py_DECREF(headers);
            return NULL;
        }
        PyList_SET_ITEM(headers, (Py_ssize_t)i, pair);
    }
    result = Py_BuildValue("(OissNNN)", e->token, e->err, rdk.err2str(e->err), f->topic,
                           bytes_or_none(f->key, f->key_size),
                           bytes_or_none(f->value, f->value_size), headers);
    return result;
}

/* How many of the latest runs an acknowledgement is matched against: the records of one
 * transaction go to several partitions, whose acknowledgements interleave. */
#define RUN_LOOKBACK 8

static PyObject *run_tuple(const Run *run) {
    PyObject *events = PyLong_FromSsize_t(run->events), *bytes = PyLong_FromSsize_t(run->bytes);
    PyObject *tuple = events && bytes ? PyTuple_Pack(3, run->token, events, bytes) : NULL;
    Py_XDECREF(events);
    Py_XDECREF(bytes);
    return tuple;
}

/* collect() -> (acknowledged, failed) or None when nothing was reported since the last call.
 * acknowledged: [(token, events, bytes)], one per token (transaction) with acknowledgements
 * since the last call, in no particular order; failed: [(token, code, text, topic, key,
 * value, headers)] in the order reported. */
static PyObject *Acks_collect(Acks *self, PyObject *unused) {
    State *s = self->state;
    Entry *done;
    Run *runs;
    size_t count, capacity, i, run_count = 0, j;
    PyObject *acked = NULL, *failed = NULL, *result = NULL;
    (void)unused;

    pthread_mutex_lock(&s->lock);
    done = s->done;
    count = s->done_count;
    capacity = s->done_capacity;
    s->done = s->spare;
    s->done_capacity = s->spare_capacity;
    s->done_count = 0;
    s->spare = NULL; /* until this call gives ``done`` back */
    s->spare_capacity = 0;
    pthread_mutex_unlock(&s->lock);
    if (count == 0) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }

    if (self->runs_capacity < count) {
        runs = realloc(self->runs, count * sizeof(Run));
        if (runs == NULL)
            goto done;
        self->runs = runs;
        self->runs_capacity = count;
    }
    runs = self->runs;
    failed = PyList_New(0);
    if (failed == NULL)
        goto done;
    for (i = 0; i < count; i++) {
        Entry *e = &done[i];
        if (e->err == ERR_NO_ERROR) {
            for (j = run_count; j > 0 && j + RUN_LOOKBACK > run_count; j--) {
                if (runs[j - 1].token == e->token)
                    break;
            }
            if (j > 0 && j + RUN_LOOKBACK > run_count) {
                runs[j - 1].events += 1;
                runs[j - 1].bytes += e->size;
            } else {
                runs[run_count].token = e->token;
                runs[run_count].events = 1;
                runs[run_count].bytes = e->size;
                run_count++;
            }
        } else {
            PyObject *failure = failure_tuple(e);
            if (failure == NULL || PyList_Append(failed, failure) != 0) {
                Py_XDECREF(failure);
                goto done;
            }
            Py_DECREF(failure);
        }
    }
    acked = PyList_New((Py_ssize_t)run_count);
    if (acked == NULL)
        goto done;
    for (j = 0; j < run_count; j++) {
        PyObject *run = run_tuple(&runs[j]);
        if (run == NULL)
            goto done;
        PyList_SET_ITEM(acked, (Py_ssize_t)j, run);
    }
    result = PyTuple_Pack(2, acked, failed);

done:
    /* Only memory can fail above; the reports are lost with it, which leaves their
     * transactions unconfirmed (stuck, never skipped). */
    for (i = 0; i < count; i++)
        entry_release(&done[i]);
    pthread_mutex_lock(&s->lock);
    s->spare = done;
    s->spare_capacity = capacity;
    pthread_mutex_unlock(&s->lock);
    Py_XDECREF(acked);
    Py_XDECREF(failed);
    return result;
}

static PyObject *Acks_in_flight(Acks *self, PyObject *unused) {
    State *s = self->state;
    (void)unused;
    return PyLong_FromSize_t(__atomic_load_n(&s->in_flight, __ATOMIC_RELAXED));
}

static PyMethodDef Acks_methods[] = {
    {"produce", (PyCFunction)(void (*)(void))Acks_produce, METH_FASTCALL,
     "produce(topic, value, key, partition, token, None, timestamp, headers)"},
    {"collect", (PyCFunction)Acks_collect, METH_NOARGS,
     "collect() -> ([(token, events, bytes)], [(token, code, text, topic, key, value, "
     "headers)]) or None"},
    {"in_flight", (PyCFunction)Acks_in_flight, METH_NOARGS,
     "records produced here and not yet acknowledged"},
    {NULL, NULL, 0, NULL},
};

HIDDEN PyTypeObject AcksType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cdc_relay.adapters._kafka_acks.Acks",
    .tp_basicsize = sizeof(Acks),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The acknowledgements of the last producer created with this plugin.",
    .tp_new = Acks_new,
    .tp_dealloc = (destructor)Acks_dealloc,
    .tp_methods = Acks_methods,
};

/* ---------------------------------------------------------------- finding librdkafka */

static int find_rdkafka(struct dl_phdr_info *info, size_t size, void *data) {
    char *found = data;
    (void)size;
    if (info->dlpi_name != NULL && strstr(info->dlpi_name, "librdkafka") != NULL &&
        strlen(info->dlpi_name) < 4096) {
        strcpy(found, info->dlpi_name);
        return 1;
    }
    return 0;
}

static int resolve(void) {
    char path[4096] = "";
    void *lib;
    dl_iterate_phdr(find_rdkafka, path);
    if (path[0] == '\0') {
        PyErr_SetString(PyExc_ImportError, "librdkafka is not loaded (import confluent_kafka)");
        return -1;
    }
    lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) {
        PyErr_Format(PyExc_ImportError, "cannot reach %s: %s", path, dlerror());
        return -1;
    }
#define SYM(field, name)                                                                       \
    do {                                                                                       \
        *(void **)(&rdk.field) = dlsym(lib, name);                                             \
        if (rdk.field == NULL) {                                                               \
            PyErr_Format(PyExc_ImportError, "%s has no %s", path, name);                       \
            return -1;                                                                         \
        }                                                                                      \
    } while (0)
    SYM(version, "rd_kafka_version");
    SYM(err2str, "rd_kafka_err2str");
    SYM(produceva, "rd_kafka_produceva");
    SYM(error_code, "rd_kafka_error_code");
    SYM(error_destroy, "rd_kafka_error_destroy");
    SYM(headers_new, "rd_kafka_headers_new");
    SYM(headers_destroy, "rd_kafka_headers_destroy");
    SYM(header_add, "rd_kafka_header_add");
    SYM(add_on_ack, "rd_kafka_interceptor_add_on_acknowledgement");
    SYM(topic_name, "rd_kafka_topic_name");
    SYM(message_headers, "rd_kafka_message_headers");
    SYM(header_get_all, "rd_kafka_header_get_all");
    SYM(conf_add_on_new, "rd_kafka_conf_interceptor_add_on_new"); /* last: the ready flag */
#undef SYM
    if (rdk.version() < PRODUCEVA_VERSION) {
        rdk.conf_add_on_new = NULL;
        PyErr_Format(PyExc_ImportError, "librdkafka 0x%x is older than 1.4.0", rdk.version());
        return -1;
    }
    return 0;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cdc_relay.adapters._kafka_acks",
    .m_doc = "Kafka acknowledgements counted in C: see the source's opening comment.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__kafka_acks(void) {
    PyObject *m, *ck;
    ck = PyImport_ImportModule("confluent_kafka"); /* loads librdkafka */
    if (ck == NULL)
        return NULL;
    Py_DECREF(ck);
    if (resolve() != 0)
        return NULL;
    if (PyType_Ready(&AcksType) < 0 || PyType_Ready(&RowsType) < 0 ||
        PyType_Ready(&CopyReaderType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    ProduceFailed = PyErr_NewException("cdc_relay.adapters._kafka_acks.ProduceFailed",
                                       PyExc_Exception, NULL);
    Py_INCREF(&AcksType);
    Py_INCREF(&RowsType);
    Py_INCREF(&CopyReaderType);
    if (PyModule_AddObject(m, "Acks", (PyObject *)&AcksType) < 0 ||
        PyModule_AddObject(m, "Rows", (PyObject *)&RowsType) < 0 ||
        PyModule_AddObject(m, "CopyReader", (PyObject *)&CopyReaderType) < 0 ||
        PyModule_AddObject(m, "ProduceFailed", ProduceFailed) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
