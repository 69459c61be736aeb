/*
 * What the two halves of cdc_relay.adapters._kafka_acks share: librdkafka's ABI, the state of
 * one producer, and the one way a record is handed to librdkafka. _kafka_acks.c is the
 * interceptor plugin and the Acks type (acknowledgements); _outbox_rows.c is the Rows type
 * (an outbox insert decoded, mapped and produced in one call).
 */

#ifndef CDC_RELAY_KAFKA_ACKS_H
#define CDC_RELAY_KAFKA_ACKS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

/* Shared between the two files, never exported: the extension is also dlopen()ed by
 * librdkafka as a plugin, and its names must not meet the process's. */
#define HIDDEN __attribute__((visibility("hidden")))

/* ---------------------------------------------------------------- librdkafka's ABI */

typedef struct rd_kafka_s rd_kafka_t;
typedef struct rd_kafka_conf_s rd_kafka_conf_t;
typedef struct rd_kafka_topic_s rd_kafka_topic_t;
typedef struct rd_kafka_headers_s rd_kafka_headers_t;
typedef struct rd_kafka_error_s rd_kafka_error_t;
typedef int rd_kafka_resp_err_t;

typedef struct {
    rd_kafka_resp_err_t err;
    rd_kafka_topic_t *rkt;
    int32_t partition;
    void *payload;
    size_t len;
    void *key;
    size_t key_len;
    int64_t offset;
    void *_private;
} rd_kafka_message_t;

enum {
    VTYPE_END = 0,
    VTYPE_TOPIC = 1,
    VTYPE_PARTITION = 3,
    VTYPE_VALUE = 4,
    VTYPE_KEY = 5,
    VTYPE_OPAQUE = 6,
    VTYPE_MSGFLAGS = 7,
    VTYPE_TIMESTAMP = 8,
    VTYPE_HEADERS = 10,
};

typedef struct {
    int vtype;
    union {
        const char *cstr;
        int i;
        int32_t i32;
        int64_t i64;
        struct {
            void *ptr;
            size_t size;
        } mem;
        rd_kafka_headers_t *headers;
        char _pad[64];
    } u;
} rd_kafka_vu_t;

#define MSG_F_COPY 0x2
#define ERR_NO_ERROR 0
#define ERR__QUEUE_FULL (-184)
#define PRODUCEVA_VERSION 0x010400ff /* rd_kafka_produceva() came in 1.4.0 */

typedef rd_kafka_resp_err_t(on_new_f)(rd_kafka_t *, const rd_kafka_conf_t *, void *, char *,
                                      size_t);
typedef rd_kafka_resp_err_t(on_message_f)(rd_kafka_t *, rd_kafka_message_t *, void *);

typedef struct {
    int (*version)(void);
    const char *(*err2str)(rd_kafka_resp_err_t);
    rd_kafka_error_t *(*produceva)(rd_kafka_t *, const rd_kafka_vu_t *, size_t);
    rd_kafka_resp_err_t (*error_code)(const rd_kafka_error_t *);
    void (*error_destroy)(rd_kafka_error_t *);
    rd_kafka_headers_t *(*headers_new)(size_t);
    void (*headers_destroy)(rd_kafka_headers_t *);
    rd_kafka_resp_err_t (*header_add)(rd_kafka_headers_t *, const char *, ssize_t, const void *,
                                      ssize_t);
    const char *(*topic_name)(const rd_kafka_topic_t *);
    rd_kafka_resp_err_t (*message_headers)(const rd_kafka_message_t *, rd_kafka_headers_t **);
    rd_kafka_resp_err_t (*header_get_all)(const rd_kafka_headers_t *, size_t, const char **,
                                          const void **, size_t *);
    rd_kafka_resp_err_t (*conf_add_on_new)(rd_kafka_conf_t *, const char *, on_new_f *, void *);
    rd_kafka_resp_err_t (*add_on_ack)(rd_kafka_t *, const char *, on_message_f *, void *);
} Rdk;

/* librdkafka's functions, resolved at import (_kafka_acks.c, resolve()). */
extern HIDDEN Rdk rdk;

/* ---------------------------------------------------------------- one producer */

typedef struct Entry Entry;

typedef struct {
    pthread_mutex_t lock;
    rd_kafka_t *rk;
    size_t in_flight; /* produced here, not yet reported (atomic) */
    /* Acknowledged (or failed), in the order librdkafka reported them, until collect(). */
    struct Entry *done;
    size_t done_count;
    size_t done_capacity;
    /* The other buffer: collect() swaps it with ``done`` (allocations of this size are
     * mmap()ed, so freeing and growing one per call costs page faults every time). */
    struct Entry *spare;
    size_t spare_capacity;
} State;

/* The producer whose produce() of ours runs on this thread, else NULL: an acknowledgement on
 * this thread meanwhile is the synchronous failure of that record (the partitioner failed
 * it), which produce() raises instead. */
extern HIDDEN __thread State *producing;

#define TAG ((uintptr_t)1)

/* Acks: the Python face of one producer's State (_kafka_acks.c). */
typedef struct Run Run;
typedef struct {
    PyObject_HEAD State *state;
    Run *runs; /* collect()'s, kept from call to call */
    size_t runs_capacity;
} Acks;

extern HIDDEN PyTypeObject AcksType;
extern HIDDEN PyTypeObject RowsType;
extern HIDDEN PyTypeObject CopyReaderType;
extern HIDDEN PyObject *ProduceFailed; /* produce()'s error for anything but a full queue */

/* Hand one record to librdkafka: ``vus`` (``count`` of them, with room for one more) name
 * everything but its opaque, which this adds: ``token``, tagged, referenced until collect().
 * ``hdrs`` (or NULL) is librdkafka's on success, destroyed on failure. Returns 0, or -1 with
 * BufferError (queue full) or ProduceFailed(code, text) set. */
HIDDEN int produce_tagged(State *s, rd_kafka_vu_t *vus, size_t count, rd_kafka_headers_t *hdrs,
                          PyObject *token);

#endif
