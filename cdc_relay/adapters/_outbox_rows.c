/*
 * cdc_relay.adapters._kafka_acks.Rows: a plain outbox insert, from its CopyData frame to
 * librdkafka in one call, with no Python object per event (docs/performance.md, "Decoding and
 * mapping in C").
 *
 * Rows.produce(frame, token) does for one XLogData frame what Pipeline.feed() and
 * TablePlan.map() do on their hot path, then what Acks.produce() does: it reads the Insert's
 * TupleData in place, finds the mapped columns, the topic and the timestamp, and hands the key,
 * the value and the three headers to rd_kafka_produceva(), which copies them. It takes only
 * the rows that TablePlan.map()'s hot path takes (id, aggregate type, aggregate id, event type
 * and payload all text and not NULL, a text payload within the claim-check bound, no extra
 * headers) and whose topic the table's plan already knows; for any other frame it returns -1
 * and has done nothing, and the pipeline decodes it the reference way. What it does not know,
 * it never guesses: the pure-Python modules stay the reference, and Rows.map(frame), the
 * record it would produce, lets the tests hold it to TablePlan.map() (tests/unit/
 * test_outbox_rows.py).
 *
 * The pipeline registers each table's plan (Rows.plan(relid, spec, counts), spec from
 * TablePlan.row_spec()) when its Relation message comes, and forgets it when the table stops
 * being a source. One Rows per pipeline: a new session starts with none.
 */

#include "_kafka_acks.h"

#define XLOG_DATA_HEADER_SIZE 25 /* 'w', start, end, send time */
#define INSERT_HEADER_SIZE 6     /* 'I', relid, 'N' */
#define PARTITION_UA (-1)        /* librdkafka's partitioner chooses */
#define CREATED_AT_CACHE 64

/* One column of a TupleData: its kind ('t', 'b', 'n', 'u') and, for 't' and 'b', its bytes
 * (pointing into the frame). */
typedef struct {
    const char *data;
    size_t size;
    char kind;
} Column;

/* TablePlan.row_spec() of one table, and what the last row taught. */
typedef struct {
    uint32_t relid;
    Py_ssize_t width; /* columns a row needs at least */
    Py_ssize_t id, aggregate_type, aggregate_id, event_type, payload;
    Py_ssize_t headers, created_at; /* -1: the table has none */
    long long claim_check_over;
    PyObject *topics; /* the TablePlan's (aggregate_type, event_type) -> topic: shared */
    PyObject *counts; /* records per topic, the pipeline's statistics: shared */
    /* Records of one topic produced since they were last added to counts: a run of one
     * topic costs a dict update at its end, not one per record (fold_counts()). */
    PyObject *pending_topic; /* NULL: none pending */
    long pending;
    /* The last row's routing columns (aggregate type, then event type) and their topic. */
    char *routing;
    size_t routing_capacity, type_size, event_size;
    PyObject *topic; /* NULL until a row found one */
    const char *topic_utf8;
    /* The last created_at text and its milliseconds: a transaction's rows share it. */
    char created_at_text[CREATED_AT_CACHE];
    size_t created_at_size; /* 0: none yet */
    int64_t created_at_ms;
} Plan;

typedef struct {
    PyObject_HEAD PyObject *acks; /* an Acks, or None: map() only */
    Plan *plans;
    size_t plan_count, plan_capacity;
    Column *columns; /* one frame's, kept from call to call */
    size_t column_capacity;
    unsigned long long produced; /* records produce() handed to librdkafka */
} Rows;

/* What map_row() found: pointers into the frame, and the plan's topic (borrowed). */
typedef struct {
    PyObject *topic;
    const char *topic_utf8;
    const Column *id, *aggregate_type, *aggregate_id, *event_type, *payload;
    int64_t timestamp_ms;
} Record;

/* ---------------------------------------------------------------- created_at */

static int read_digits(const char *s, int n, int *out) {
    int value = 0, i;
    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        value = value * 10 + (s[i] - '0');
    }
    *out = value;
    return 1;
}

static int days_in_month(int year, int month) {
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    return month == 2 && leap ? 29 : days[month - 1];
}

/* Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int year, int month, int day) {
    int64_t era;
    unsigned yoe, doy, doe;
    year -= month <= 2;
    era = (year >= 0 ? year : year - 399) / 400;
    yoe = (unsigned)(year - era * 400);
    doy = (unsigned)((153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1);
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

/* parse_timestamp_ms() of core/mapping.py for the text PostgreSQL prints with DateStyle ISO
 * (which the replication connection sets): YYYY-MM-DD HH:MM:SS, an optional fraction of 1 to
 * 6 digits, an optional offset +HH, +HH:MM or +HH:MM:SS. 1 with *ms set, or 0 for any other
 * text (BC, years past 9999, infinity), which the reference path then reads. */
static int parse_timestamp_ms(const char *s, size_t n, int64_t *ms) {
    int year, month, day, hour, minute, second, digits, fraction = 0, scale;
    int offset_hours = 0, offset_minutes = 0, offset_seconds = 0, sign = 0;
    size_t pos = 19;
    int64_t seconds, millis;
    if (n < 19 || s[4] != '-' || s[7] != '-' || s[10] != ' ' || s[13] != ':' || s[16] != ':')
        return 0;
    if (!read_digits(s, 4, &year) || !read_digits(s + 5, 2, &month) ||
        !read_digits(s + 8, 2, &day) || !read_digits(s + 11, 2, &hour) ||
        !read_digits(s + 14, 2, &minute) || !read_digits(s + 17, 2, &second))
        return 0;
    if (year < 1 || month < 1 || month > 12 || day < 1 || day > days_in_month(year, month) ||
        hour > 23 || minute > 59 || second > 59)
        return 0;
    if (pos < n && s[pos] == '.') {
        pos++;
        for (digits = 0; pos < n && s[pos] >= '0' && s[pos] <= '9'; digits++, pos++) {
            if (digits == 6)
                return 0;
            fraction = fraction * 10 + (s[pos] - '0');
        }
        if (digits == 0)
            return 0;
        for (scale = digits; scale < 6; scale++)
            fraction *= 10; /* microseconds */
    }
    if (pos < n && (s[pos] == '+' || s[pos] == '-')) {
        sign = s[pos] == '+' ? 1 : -1;
        if (n - pos < 3 || !read_digits(s + pos + 1, 2, &offset_hours) || offset_hours > 23)
            return 0;
        pos += 3;
        if (pos < n && s[pos] == ':') {
            if (n - pos < 3 || !read_digits(s + pos + 1, 2, &offset_minutes) ||
                offset_minutes > 59)
                return 0;
            pos += 3;
            if (pos < n && s[pos] == ':') {
                if (n - pos < 3 || !read_digits(s + pos + 1, 2, &offset_seconds) ||
                    offset_seconds > 59)
                    return 0;
                pos += 3;
            }
        }
    }
    if (pos != n)
        return 0;
    seconds = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second -
              sign * (offset_hours * 3600 + offset_minutes * 60 + offset_seconds);
    millis = seconds * 1000 + fraction / 1000; /* floor: the fraction is never negative */
    *ms = millis > 0 ? millis : 0;
    return 1;
}

/* ---------------------------------------------------------------- one frame */

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static Plan *find_plan(Rows *self, uint32_t relid) {
    size_t i;
    for (i = 0; i < self->plan_count; i++) {
        if (self->plans[i].relid == relid)
            return &self->plans[i];
    }
    return NULL;
}

/* The plan of the plain Insert that fills the XLogData frame ``buf``, its columns read into
 * self->columns; NULL for any other frame, or one the reference decoder would refuse. */
static Plan *read_insert(Rows *self, const unsigned char *buf, size_t len) {
    size_t pos = XLOG_DATA_HEADER_SIZE + INSERT_HEADER_SIZE, ncols, i;
    Plan *plan;
    if (len < pos + 2 || buf[0] != 'w' || buf[XLOG_DATA_HEADER_SIZE] != 'I' ||
        buf[XLOG_DATA_HEADER_SIZE + 5] != 'N')
        return NULL;
    plan = find_plan(self, be32(buf + XLOG_DATA_HEADER_SIZE + 1));
    if (plan == NULL)
        return NULL;
    ncols = ((size_t)buf[pos] << 8) | buf[pos + 1];
    pos += 2;
    if (ncols < (size_t)plan->width)
        return NULL;
    if (ncols > self->column_capacity) {
        Column *columns = realloc(self->columns, ncols * sizeof(Column));
        if (columns == NULL)
            return NULL; /* the reference path, which needs less memory than this */
        self->columns = columns;
        self->column_capacity = ncols;
    }
    for (i = 0; i < ncols; i++) {
        Column *column = &self->columns[i];
        if (pos >= len)
            return NULL;
        column->kind = (char)buf[pos];
        if (column->kind == 't' || column->kind == 'b') {
            size_t size;
            if (len - pos < 5)
                return NULL;
            size = be32(buf + pos + 1);
            if (size > len - pos - 5)
                return NULL;
            column->data = (const char *)buf + pos + 5;
            column->size = size;
            pos += 5 + size;
        } else if (column->kind == 'n' || column->kind == 'u') {
            column->data = NULL;
            column->size = 0;
            pos += 1;
        } else {
            return NULL;
        }
    }
    return pos == len ? plan : NULL;
}

/* The topic of a row from the plan's cache: 1 found, 0 not known yet, -1 error. */
static int find_topic(Plan *plan, const Column *type, const Column *event, Record *record) {
    PyObject *key, *topic;
    const char *utf8;
    if (plan->topic != NULL && type->size == plan->type_size && event->size == plan->event_size &&
        memcmp(plan->routing, type->data, type->size) == 0 &&
        memcmp(plan->routing + type->size, event->data, event->size) == 0) {
        record->topic = plan->topic;
        record->topic_utf8 = plan->topic_utf8;
        return 1;
    }
    key = Py_BuildValue("(y#y#)", type->data, (Py_ssize_t)type->size, event->data,
                        (Py_ssize_t)event->size);
    if (key == NULL)
        return -1;
    topic = PyDict_GetItemWithError(plan->topics, key); /* borrowed */
    Py_DECREF(key);
    if (topic == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyUnicode_CheckExact(topic) || (utf8 = PyUnicode_AsUTF8(topic)) == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (plan->routing_capacity < type->size + event->size) {
        char *routing = realloc(plan->routing, type->size + event->size);
        if (routing == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        plan->routing = routing;
        plan->routing_capacity = type->size + event->size;
    }
    memcpy(plan->routing, type->data, type->size);
    memcpy(plan->routing + type->size, event->data, event->size);
    plan->type_size = type->size;
    plan->event_size = event->size;
    Py_INCREF(topic);
    Py_XSETREF(plan->topic, topic);
    plan->topic_utf8 = utf8;
    record->topic = topic;
    record->topic_utf8 = utf8;
    return 1;
}

/* TablePlan.map()'s hot path over the columns read_insert() found: 1 with ``record`` filled,
 * 0 for a row it leaves to the reference path, -1 error. */
static int map_row(Plan *plan, const Column *columns, Record *record) {
    const Column *created_at;
    int found;
    record->id = &columns[plan->id];
    record->aggregate_type = &columns[plan->aggregate_type];
    record->aggregate_id = &columns[plan->aggregate_id];
    record->event_type = &columns[plan->event_type];
    record->payload = &columns[plan->payload];
    if (record->id->kind != 't' || record->aggregate_type->kind != 't' ||
        record->aggregate_id->kind != 't' || record->event_type->kind != 't' ||
        record->payload->kind != 't' ||
        (plan->headers >= 0 && columns[plan->headers].kind != 'n') ||
        record->payload->size > (unsigned long long)plan->claim_check_over)
        return 0;
    found = find_topic(plan, record->aggregate_type, record->event_type, record);
    if (found != 1)
        return found;
    record->timestamp_ms = 0;
    if (plan->created_at < 0)
        return 1;
    created_at = &columns[plan->created_at];
    if (created_at->kind != 't')
        return 1; /* NULL: Kafka stamps it */
    if (created_at->size == plan->created_at_size &&
        memcmp(created_at->data, plan->created_at_text, created_at->size) == 0) {
        record->timestamp_ms = plan->created_at_ms;
        return 1;
    }
    if (!parse_timestamp_ms(created_at->data, created_at->size, &record->timestamp_ms))
        return 0;
    if (created_at->size <= CREATED_AT_CACHE) {
        memcpy(plan->created_at_text, created_at->data, created_at->size);
        plan->created_at_size = created_at->size;
        plan->created_at_ms = record->timestamp_ms;
    }
    return 1;
}

/* The frame's bytes, in place: bytes or a contiguous memoryview (psycopg's). */
static int frame_of(PyObject *frame, const unsigned char **buf, size_t *len) {
    if (PyBytes_CheckExact(frame)) {
        *buf = (const unsigned char *)PyBytes_AS_STRING(frame);
        *len = (size_t)PyBytes_GET_SIZE(frame);
        return 0;
    }
    if (PyMemoryView_Check(frame)) {
        Py_buffer *view = PyMemoryView_GET_BUFFER(frame);
        if (PyBuffer_IsContiguous(view, 'C')) {
            *buf = view->buf;
            *len = (size_t)view->len;
            return 0;
        }
    }
    PyErr_Format(PyExc_TypeError, "a frame must be bytes or a contiguous memoryview, not %.100s",
                 Py_TYPE(frame)->tp_name);
    return -1;
}

/* 1 with the frame's plan and record, 0 for a frame of the reference path, -1 error. */
static int frame_record(Rows *self, PyObject *frame, Plan **plan, Record *record) {
    const unsigned char *buf;
    size_t len;
    if (frame_of(frame, &buf, &len) != 0)
        return -1;
    *plan = read_insert(self, buf, len);
    if (*plan == NULL)
        return 0;
    return map_row(*plan, self->columns, record);
}

/* ---------------------------------------------------------------- the Python type */

static PyObject *Rows_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *acks;
    Rows *self;
    (void)kwargs;
    if (!PyArg_ParseTuple(args, "O:Rows", &acks))
        return NULL;
    if (acks != Py_None && !PyObject_TypeCheck(acks, &AcksType)) {
        PyErr_SetString(PyExc_TypeError, "Rows(acks): an Acks, or None for map() only");
        return NULL;
    }
    self = (Rows *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(acks);
    self->acks = acks;
    return (PyObject *)self;
}

static void fold_pending(Plan *plan);

static void plan_release(Plan *plan) {
    fold_pending(plan);
    Py_CLEAR(plan->pending_topic);
    Py_CLEAR(plan->topics);
    Py_CLEAR(plan->counts);
    Py_CLEAR(plan->topic);
    free(plan->routing);
    plan->routing = NULL;
}

static void Rows_dealloc(Rows *self) {
    size_t i;
    for (i = 0; i < self->plan_count; i++)
        plan_release(&self->plans[i]);
    free(self->plans);
    free(self->columns);
    Py_XDECREF(self->acks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int forget_relid(Rows *self, uint32_t relid) {
    Plan *plan = find_plan(self, relid);
    if (plan == NULL)
        return 0;
    plan_release(plan);
    *plan = self->plans[--self->plan_count];
    return 1;
}

/* plan(relid, spec, counts): rows of ``relid`` mapped by ``spec`` (TablePlan.row_spec():
 * width, the indexes of id, aggregate_type, aggregate_id, event_type, payload, headers and
 * created_at (-1: none), the claim-check bound, the plan's topic cache), counted per topic
 * in ``counts``. Replaces the relid's earlier plan. */
static PyObject *Rows_plan(Rows *self, PyObject *args) {
    unsigned long relid;
    PyObject *spec, *counts;
    Plan plan, *slot;
    Py_ssize_t *indexes[7], i;
    memset(&plan, 0, sizeof(plan));
    if (!PyArg_ParseTuple(args, "kO!O!:plan", &relid, &PyTuple_Type, &spec, &PyDict_Type,
                          &counts))
        return NULL;
    if (!PyArg_ParseTuple(spec, "nnnnnnnnLO!:plan spec", &plan.width, &plan.id,
                          &plan.aggregate_type, &plan.aggregate_id, &plan.event_type,
                          &plan.payload, &plan.headers, &plan.created_at,
                          &plan.claim_check_over, &PyDict_Type, &plan.topics))
        return NULL;
    indexes[0] = &plan.id, indexes[1] = &plan.aggregate_type, indexes[2] = &plan.aggregate_id;
    indexes[3] = &plan.event_type, indexes[4] = &plan.payload, indexes[5] = &plan.headers;
    indexes[6] = &plan.created_at;
    for (i = 0; i < 7; i++) {
        Py_ssize_t index = *indexes[i];
        if (index >= plan.width || index < (i < 5 ? 0 : -1)) {
            PyErr_SetString(PyExc_ValueError, "plan spec: a column index outside the row");
            return NULL;
        }
    }
    if (plan.claim_check_over < 0) {
        PyErr_SetString(PyExc_ValueError, "plan spec: a negative claim-check bound");
        return NULL;
    }
    plan.relid = (uint32_t)relid;
    forget_relid(self, plan.relid);
    if (self->plan_count == self->plan_capacity) {
        size_t capacity = self->plan_capacity ? self->plan_capacity * 2 : 4;
        Plan *plans = realloc(self->plans, capacity * sizeof(Plan));
        if (plans == NULL)
            return PyErr_NoMemory();
        self->plans = plans;
        self->plan_capacity = capacity;
    }
    Py_INCREF(plan.topics);
    Py_INCREF(counts);
    plan.counts = counts;
    slot = &self->plans[self->plan_count++];
    *slot = plan;
    Py_RETURN_NONE;
}

static PyObject *Rows_forget(Rows *self, PyObject *arg) {
    unsigned long relid = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(forget_relid(self, (uint32_t)relid));
}

static PyObject *column_bytes(const Column *column) {
    return PyBytes_FromStringAndSize(column->data, (Py_ssize_t)column->size);
}

/* map(frame) -> (topic, key, value, headers, timestamp_ms), the record produce() would hand
 * librdkafka, or None for a frame it leaves to the reference path. For the tests. */
static PyObject *Rows_map(Rows *self, PyObject *frame) {
    Plan *plan;
    Record r;
    int found = frame_record(self, frame, &plan, &r);
    if (found <= 0) {
        if (found < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(ONN[(sN)(sN)(sN)]L)", r.topic, column_bytes(r.aggregate_id),
                         column_bytes(r.payload), "id", column_bytes(r.id), "event_type",
                         column_bytes(r.event_type), "aggregate_type",
                         column_bytes(r.aggregate_type), (long long)r.timestamp_ms);
}

/* Adds the plan's pending records to counts. Leaves any exception already set as it was:
 * it also runs when a plan is dropped, a Rows deallocated, while one propagates. */
static void fold_pending(Plan *plan) {
    PyObject *now, *next, *type, *value, *traceback;
    long before;
    if (plan->pending == 0 || plan->pending_topic == NULL)
        return;
    PyErr_Fetch(&type, &value, &traceback);
    now = PyDict_GetItemWithError(plan->counts, plan->pending_topic);
    before = now != NULL ? PyLong_AsLong(now) : 0;
    next = PyErr_Occurred() ? NULL : PyLong_FromLong(before + plan->pending);
    if (next == NULL || PyDict_SetItem(plan->counts, plan->pending_topic, next) != 0) {
        /* Only memory fails here; the records are produced, and a statistic is not worth
         * producing them twice. */
        PyErr_Clear();
    }
    Py_XDECREF(next);
    plan->pending = 0;
    PyErr_Restore(type, value, traceback);
}

static void count_topic(Plan *plan, PyObject *topic) {
    if (topic != plan->pending_topic) {
        fold_pending(plan);
        Py_INCREF(topic);
        Py_XSETREF(plan->pending_topic, topic);
    }
    plan->pending++;
}

/* fold_counts(): every plan's pending records added to its counts, which then hold every
 * record produce() counted. The pipeline calls it at the end of each pump. */
static PyObject *Rows_fold_counts(Rows *self, PyObject *unused) {
    size_t i;
    (void)unused;
    for (i = 0; i < self->plan_count; i++)
        fold_pending(&self->plans[i]);
    Py_RETURN_NONE;
}

/* produce(frame, token) -> the value's size once the record is librdkafka's (counted in
 * its plan's counts by the next fold_counts()), or -1 for a frame it leaves to the reference path, having done
 * nothing. Raises as Acks.produce() does (BufferError, ProduceFailed), having done nothing. */
static PyObject *Rows_produce(Rows *self, PyObject *const *args, Py_ssize_t nargs) {
    Plan *plan;
    Record r;
    State *s;
    rd_kafka_vu_t vus[8];
    rd_kafka_headers_t *hdrs;
    int found;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "produce() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (self->acks == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "produce(): these Rows have no producer");
        return NULL;
    }
    found = frame_record(self, args[0], &plan, &r);
    if (found <= 0)
        return found < 0 ? NULL : PyLong_FromLong(-1);
    s = ((Acks *)self->acks)->state;
    hdrs = rdk.headers_new(3);
    rdk.header_add(hdrs, "id", 2, r.id->data, (ssize_t)r.id->size);
    rdk.header_add(hdrs, "event_type", 10, r.event_type->data, (ssize_t)r.event_type->size);
    rdk.header_add(hdrs, "aggregate_type", 14, r.aggregate_type->data,
                   (ssize_t)r.aggregate_type->size);
    memset(vus, 0, sizeof(vus));
    vus[0].vtype = VTYPE_TOPIC;
    vus[0].u.cstr = r.topic_utf8;
    vus[1].vtype = VTYPE_PARTITION;
    vus[1].u.i32 = PARTITION_UA;
    vus[2].vtype = VTYPE_MSGFLAGS;
    vus[2].u.i = MSG_F_COPY;
    vus[3].vtype = VTYPE_VALUE;
    vus[3].u.mem.ptr = (void *)r.payload->data;
    vus[3].u.mem.size = r.payload->size;
    vus[4].vtype = VTYPE_KEY;
    vus[4].u.mem.ptr = (void *)r.aggregate_id->data;
    vus[4].u.mem.size = r.aggregate_id->size;
    vus[5].vtype = VTYPE_TIMESTAMP;
    vus[5].u.i64 = r.timestamp_ms;
    vus[6].vtype = VTYPE_HEADERS;
    vus[6].u.headers = hdrs;
    if (produce_tagged(s, vus, 7, hdrs, args[1]) != 0)
        return NULL;
    count_topic(plan, r.topic);
    self->produced++;
    return PyLong_FromSize_t(r.payload->size);
}

static PyObject *Rows_produced(Rows *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromUnsignedLongLong(self->produced);
}

static PyMethodDef Rows_methods[] = {
    {"plan", (PyCFunction)Rows_plan, METH_VARARGS,
     "plan(relid, spec, counts): map the rows of relid by spec (TablePlan.row_spec())"},
    {"forget", (PyCFunction)Rows_forget, METH_O, "forget(relid) -> whether it had a plan"},
    {"map", (PyCFunction)Rows_map, METH_O,
     "map(frame) -> (topic, key, value, headers, timestamp_ms) or None"},
    {"produce", (PyCFunction)(void (*)(void))Rows_produce, METH_FASTCALL,
     "produce(frame, token) -> the value's size, or -1 for the reference path"},
    {"fold_counts", (PyCFunction)Rows_fold_counts, METH_NOARGS,
     "fold_counts(): add the records produced since the last call to their plans' counts"},
    {"produced", (PyCFunction)Rows_produced, METH_NOARGS,
     "produced() -> how many records produce() handed to librdkafka"},
    {NULL, NULL, 0, NULL},
};

HIDDEN PyTypeObject RowsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cdc_relay.adapters._kafka_acks.Rows",
    .tp_basicsize = sizeof(Rows),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Rows(acks): plain outbox inserts decoded, mapped and produced in one call.",
    .tp_new = Rows_new,
    .tp_dealloc = (destructor)Rows_dealloc,
    .tp_methods = Rows_methods,
};
