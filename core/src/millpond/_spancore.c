/* The traced task path in C: the worker's `process` and `run` spans, made, ended and encoded.
 *
 * A traced no-op task cost a solo worker about 18 us more than an untraced one in pure Python,
 * a fifth of the task: two span objects with their ids and times, the producer's header read,
 * the run span made current, both spans written as OTLP protobuf. This module does the common
 * case of each step without running Python bytecode; anything unusual (another traceparent
 * version, a tracestate, an attribute added by user code, a string that is not plain UTF-8)
 * returns a "not handled" answer and the Python code in `millpond.span_recorder` and
 * `millpond.telemetry`, which knows every rule, does the work. Tests compare the bytes written
 * here with the Python encoder's, and run the tracing tests with and without this module.
 *
 * Optional: when it cannot be compiled, or MILLPOND_PURE_PYTHON is set, everything runs in
 * Python with the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/random.h>
#endif

/* -- ids: xoshiro256**, seeded from the OS, re-seeded in a forked child ----------------------- */
static uint64_t rng[4];

static void
rng_seed(void)
{
    int seeded = 0;
#if defined(__linux__)
    seeded = getrandom(rng, sizeof rng, 0) == (ssize_t)sizeof rng;
#elif defined(__APPLE__) || defined(__FreeBSD__) || defined(__OpenBSD__) || defined(__NetBSD__)
    arc4random_buf(rng, sizeof rng);
    seeded = 1;
#endif
    if (!seeded) { /* no OS source: time, pid and an address, spread by splitmix64 */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ ((uint64_t)getpid() << 17)
                     ^ (uint64_t)(uintptr_t)&ts;
        for (int i = 0; i < 4; i++) {
            uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
            rng[i] = z ^ (z >> 31);
        }
    }
    if (!(rng[0] | rng[1] | rng[2] | rng[3]))
        rng[0] = 1;
}

static inline uint64_t
rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t
rng_next(void)
{
    uint64_t result = rotl(rng[1] * 5, 7) * 9;
    uint64_t t = rng[1] << 17;
    rng[2] ^= rng[0];
    rng[3] ^= rng[1];
    rng[1] ^= rng[2];
    rng[0] ^= rng[3];
    rng[2] ^= t;
    rng[3] = rotl(rng[3], 45);
    return result;
}

static const char HEX[] = "0123456789abcdef";

static void
write_hex(Py_UCS1 *out, uint64_t value)
{
    for (int i = 15; i >= 0; i--) {
        out[i] = (Py_UCS1)HEX[value & 0xF];
        value >>= 4;
    }
}

static PyObject *
new_span_hex(void)
{
    uint64_t id;
    do {
        id = rng_next();
    } while (!id);
    PyObject *text = PyUnicode_New(16, 127);
    if (text)
        write_hex(PyUnicode_1BYTE_DATA(text), id);
    return text;
}

static PyObject *
new_trace_hex(void)
{
    uint64_t high, low;
    do {
        high = rng_next();
        low = rng_next();
    } while (!(high | low));
    PyObject *text = PyUnicode_New(32, 127);
    if (text) {
        write_hex(PyUnicode_1BYTE_DATA(text), high);
        write_hex(PyUnicode_1BYTE_DATA(text) + 16, low);
    }
    return text;
}

static inline long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* the value of a lower-case hex digit, 0x10 for anything else: one table read per character,
 * no branch (random hex digits made a `c <= '9'` branch mispredict on a third of them) */
static unsigned char HEX_VALUE[256];

static void
hex_table_init(void)
{
    memset(HEX_VALUE, 0x10, sizeof HEX_VALUE);
    for (int i = 0; i < 10; i++)
        HEX_VALUE['0' + i] = (unsigned char)i;
    for (int i = 0; i < 6; i++)
        HEX_VALUE['a' + i] = (unsigned char)(10 + i);
}

/* whether `size` characters are all lower-case hex digits */
static inline int
all_hex(const Py_UCS1 *chars, Py_ssize_t size)
{
    unsigned char bad = 0;
    for (Py_ssize_t i = 0; i < size; i++)
        bad |= HEX_VALUE[chars[i]];
    return !(bad & 0x10);
}

/* A 1-byte str of exactly `size` lower-case hex digits: its characters, else NULL. */
static const Py_UCS1 *
hex_chars(PyObject *text, Py_ssize_t size)
{
    if (!PyUnicode_CheckExact(text) || PyUnicode_GET_LENGTH(text) != size
        || PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND)
        return NULL;
    const Py_UCS1 *chars = PyUnicode_1BYTE_DATA(text);
    return all_hex(chars, size) ? chars : NULL;
}

static int
all_zero(const Py_UCS1 *chars, Py_ssize_t size)
{
    for (Py_ssize_t i = 0; i < size; i++)
        if (chars[i] != '0')
            return 0;
    return 1;
}

/* -- SpanCore: the fields of a recorded span ---------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    PyObject *recorder;  /* None: not sampled, nothing recorded */
    PyObject *trace_hex;
    PyObject *span_hex;
    PyObject *parent_hex; /* "" for a root span */
    PyObject *name;
    PyObject *base;       /* pre-encoded attributes shared by the span's queue and task */
    PyObject *message;    /* (task id, retries, delivery count, sent at) or None */
    PyObject *trace_state;
    PyObject *link_from;  /* (trace hex, span hex, tracestate or None) or None */
    PyObject *state;      /* a `process` span's outcome, or None */
    long long start_ns;
    long long end_ns;
    int kind;
    char parent_remote;
    char plain;
} SpanCore;

static PyTypeObject SpanCoreType;

static PyObject *s_record;   /* "record" */
static PyObject *s_escaped;  /* "_escaped" */

static SpanCore *
span_make(PyTypeObject *type, PyObject *recorder, PyObject *trace_hex, PyObject *parent_hex,
          PyObject *name, int kind, PyObject *base, PyObject *message, int parent_remote,
          PyObject *trace_state, PyObject *link_from)
{
    PyObject *span_hex = new_span_hex();
    if (!span_hex)
        return NULL;
    SpanCore *self = (SpanCore *)type->tp_alloc(type, 0);
    if (!self) {
        Py_DECREF(span_hex);
        return NULL;
    }
    self->recorder = Py_NewRef(recorder);
    self->trace_hex = Py_NewRef(trace_hex);
    self->span_hex = span_hex;
    self->parent_hex = Py_NewRef(parent_hex);
    self->name = Py_NewRef(name);
    self->base = Py_NewRef(base);
    self->message = Py_NewRef(message);
    self->trace_state = Py_NewRef(trace_state);
    self->link_from = Py_NewRef(link_from);
    self->state = Py_NewRef(Py_None);
    self->kind = kind;
    self->parent_remote = (char)(parent_remote != 0);
    self->plain = 1;
    self->end_ns = 0;
    self->start_ns = now_ns();
    return self;
}

static PyObject *
span_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"recorder", "trace_hex", "parent_hex", "name", "kind", "base",
                             "message", "parent_remote", "trace_state", "link_from", NULL};
    PyObject *recorder, *trace_hex, *parent_hex, *name, *base, *message;
    PyObject *trace_state = Py_None, *link_from = Py_None;
    int kind, parent_remote = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOiOO|pOO", kwlist, &recorder, &trace_hex,
                                     &parent_hex, &name, &kind, &base, &message, &parent_remote,
                                     &trace_state, &link_from))
        return NULL;
    return (PyObject *)span_make(type, recorder, trace_hex, parent_hex, name, kind, base, message,
                                 parent_remote, trace_state, link_from);
}

static int
span_traverse(SpanCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->recorder);
    Py_VISIT(self->trace_hex);
    Py_VISIT(self->span_hex);
    Py_VISIT(self->parent_hex);
    Py_VISIT(self->name);
    Py_VISIT(self->base);
    Py_VISIT(self->message);
    Py_VISIT(self->trace_state);
    Py_VISIT(self->link_from);
    Py_VISIT(self->state);
    return 0;
}

static int
span_clear(SpanCore *self)
{
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->trace_hex);
    Py_CLEAR(self->span_hex);
    Py_CLEAR(self->parent_hex);
    Py_CLEAR(self->name);
    Py_CLEAR(self->base);
    Py_CLEAR(self->message);
    Py_CLEAR(self->trace_state);
    Py_CLEAR(self->link_from);
    Py_CLEAR(self->state);
    return 0;
}

static void
span_dealloc(SpanCore *self)
{
    PyObject_GC_UnTrack(self);
    span_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *encode(PyObject *module, PyObject *arg);
static PyObject *s_fast_queue, *s_append;

/* recorder.record(item), its common case done here: the recorder's `_fast_queue` is (queue,
 * batch size) once its export thread runs; an item that does not fill a batch is appended to the
 * queue directly (a deque: atomic under the GIL). A full queue, a batch to announce or a thread
 * to start: the recorder's own `record`. */
static PyObject *
record(PyObject *recorder, PyObject *item)
{
    PyObject *fast = PyObject_GetAttr(recorder, s_fast_queue);
    if (!fast) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
    } else if (PyTuple_CheckExact(fast) && PyTuple_GET_SIZE(fast) == 2) {
        PyObject *queue = PyTuple_GET_ITEM(fast, 0);
        Py_ssize_t queued = PyObject_Size(queue);
        Py_ssize_t batch = PyLong_AsSsize_t(PyTuple_GET_ITEM(fast, 1));
        if (queued < 0 || (batch == -1 && PyErr_Occurred())) {
            Py_DECREF(fast);
            return NULL;
        }
        if (queued + 1 < batch) {
            PyObject *done = PyObject_CallMethodOneArg(queue, s_append, item);
            Py_DECREF(fast);
            return done;
        }
        Py_DECREF(fast);
    } else {
        Py_DECREF(fast);
    }
    return PyObject_CallMethodOneArg(recorder, s_record, item);
}

/* end(): note the end time and hand the span to its recorder, once; unsampled spans do nothing.
 * A plain span is handed over as its OTLP bytes, written now while its fields are in the CPU's
 * cache (the export thread reading them a batch later missed the cache on nearly every field,
 * several times the cost of writing them); a span carrying more goes as itself, and the export
 * thread encodes it in Python. */
static PyObject *
span_end_at(SpanCore *self, long long end_ns)
{
    if (self->recorder == Py_None || self->recorder == NULL || self->end_ns)
        Py_RETURN_NONE;
    self->end_ns = end_ns ? end_ns : now_ns();
    PyObject *encoded = encode(NULL, (PyObject *)self);
    if (!encoded)
        return NULL;
    PyObject *item = encoded == Py_None ? (PyObject *)self : encoded;
    PyObject *result = record(self->recorder, item);
    Py_DECREF(encoded);
    return result;
}

static PyObject *
span_end(SpanCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *end_time = nargs ? args[0] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1) {
        PyErr_SetString(PyExc_TypeError, "end() takes at most one argument (end_time)");
        return NULL;
    }
    if (nkw) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, 0);
        if (!PyUnicode_Check(key) || PyUnicode_CompareWithASCIIString(key, "end_time") != 0) {
            PyErr_Format(PyExc_TypeError, "end() got an unexpected keyword argument %R", key);
            return NULL;
        }
        end_time = args[0];
    }
    long long end_ns = 0;
    if (end_time != NULL && end_time != Py_None) {
        end_ns = PyLong_AsLongLong(end_time);
        if (end_ns == -1 && PyErr_Occurred())
            return NULL;
    }
    return span_end_at(self, end_ns);
}

static PyObject *
span_enter(PyObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

/* __exit__: an exception escaping the block is recorded (the subclass's `_escaped`), then end */
static PyObject *
span_exit(SpanCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__exit__ takes three arguments");
        return NULL;
    }
    PyObject *exc = args[1];
    if (exc != Py_None && self->recorder != Py_None && !self->end_ns) {
        PyObject *done = PyObject_CallMethodOneArg((PyObject *)self, s_escaped, exc);
        if (!done)
            return NULL;
        Py_DECREF(done);
    }
    PyObject *ended = span_end_at(self, 0);
    if (!ended)
        return NULL;
    Py_DECREF(ended);
    Py_RETURN_NONE; /* never swallows the exception */
}

static PyMethodDef span_methods[] = {
    {"end", (PyCFunction)(void (*)(void))span_end, METH_FASTCALL | METH_KEYWORDS,
     "End the span (once) and hand it to its recorder; unsampled spans do nothing."},
    {"__enter__", span_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))span_exit, METH_FASTCALL, NULL},
    {NULL},
};

#define MEMBER(field, type) {#field, type, offsetof(SpanCore, field), 0, NULL}
static PyMemberDef span_members[] = {
    MEMBER(recorder, T_OBJECT),
    MEMBER(trace_hex, T_OBJECT),
    MEMBER(span_hex, T_OBJECT),
    MEMBER(parent_hex, T_OBJECT),
    MEMBER(name, T_OBJECT),
    MEMBER(base, T_OBJECT),
    MEMBER(message, T_OBJECT),
    MEMBER(trace_state, T_OBJECT),
    MEMBER(link_from, T_OBJECT),
    MEMBER(state, T_OBJECT),
    MEMBER(start_ns, T_LONGLONG),
    MEMBER(end_ns, T_LONGLONG),
    MEMBER(kind, T_INT),
    MEMBER(parent_remote, T_BOOL),
    MEMBER(plain, T_BOOL),
    {NULL},
};

static PyTypeObject SpanCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "millpond._spancore.SpanCore",
    .tp_basicsize = sizeof(SpanCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of a span the worker records; RecordedSpan adds the Span API.",
    .tp_new = span_new,
    .tp_dealloc = (destructor)span_dealloc,
    .tp_traverse = (traverseproc)span_traverse,
    .tp_clear = (inquiry)span_clear,
    .tp_methods = span_methods,
    .tp_members = span_members,
};

/* -- configuration, set from Python (telemetry.use_recorder and friends) ----------------------- */
typedef struct {
    PyObject *span_type;      /* RecordedSpan */
    PyObject *recorder;       /* None: not configured, the Python path runs */
    PyObject *process_shapes; /* (queue, task, pool) -> (encoded attributes, span name) */
    PyObject *run_shapes;     /* task name -> (encoded attributes, span name) */
    PyObject *sampler;        /* (parent sampled or None, trace hex) -> keep? */
    PyObject *otel_variable;  /* OpenTelemetry's current-context ContextVar, or None */
    PyObject *otel_key;       /* its span key */
    PyObject *otel_context;   /* opentelemetry.context.Context */
    PyObject *log_variables;  /* structlog's (trace_id, span_id) ContextVars, or None */
    PyObject *module_dict;    /* millpond.telemetry's globals: TRACING is read there */
    PyObject *not_traced;     /* what enter_run_span returns when a task is not traced */
    /* the Python functions doing what is not done here */
    PyObject *start_fallback, *run_fallback, *end_fallback;
    int follows_parent;
    int link_only;            /* PROCESS_PARENTING == "link" */
} Config;

static Config config;

/* attribute keys, each as its encoded KeyValue.key field */
static PyObject *key_message_id, *key_retries, *key_delivery_count, *key_queue_wait, *key_state;

static PyObject *s_producer_traceparent, *s_producer_tracestate, *s_queue, *s_task_name,
    *s_task_id, *s_retries, *s_delivery_count, *s_sent_at, *s_span, *s_traceparent,
    *s_tracestate;

#define SET_FIELD(field, value)                                                                   \
    do {                                                                                          \
        PyObject *old_ = (field);                                                                 \
        (field) = Py_NewRef(value);                                                               \
        Py_XDECREF(old_);                                                                         \
    } while (0)

static int
is_context_variables(PyObject *pair)
{
    return PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2
           && PyContextVar_CheckExact(PyTuple_GET_ITEM(pair, 0))
           && PyContextVar_CheckExact(PyTuple_GET_ITEM(pair, 1));
}

static PyObject *
configure(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"span_type",      "recorder",       "process_shapes", "run_shapes",
                             "sampler",        "follows_parent", "link_only",      "otel_variable",
                             "otel_key",       "otel_context",   "log_variables",  "module_dict",
                             "not_traced",     "start_fallback", "run_fallback",   "end_fallback",
                             NULL};
    PyObject *span_type, *recorder, *process_shapes, *run_shapes, *sampler, *otel_variable,
        *otel_key, *otel_context, *log_variables, *module_dict, *not_traced, *start_fallback,
        *run_fallback, *end_fallback;
    int follows_parent, link_only;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "$OOO!O!OppOOOOO!OOOO", kwlist, &span_type, &recorder, &PyDict_Type,
            &process_shapes, &PyDict_Type, &run_shapes, &sampler, &follows_parent, &link_only,
            &otel_variable, &otel_key, &otel_context, &log_variables, &PyDict_Type, &module_dict,
            &not_traced, &start_fallback, &run_fallback, &end_fallback))
        return NULL;
    if (!PyType_Check(span_type) || !PyType_IsSubtype((PyTypeObject *)span_type, &SpanCoreType)) {
        PyErr_SetString(PyExc_TypeError, "span_type must be a subclass of SpanCore");
        return NULL;
    }
    if (otel_variable != Py_None && !PyContextVar_CheckExact(otel_variable)) {
        PyErr_SetString(PyExc_TypeError, "otel_variable must be a ContextVar or None");
        return NULL;
    }
    if (log_variables != Py_None && !is_context_variables(log_variables)) {
        PyErr_SetString(PyExc_TypeError, "log_variables must be two ContextVars or None");
        return NULL;
    }
    SET_FIELD(config.span_type, span_type);
    SET_FIELD(config.recorder, recorder);
    SET_FIELD(config.process_shapes, process_shapes);
    SET_FIELD(config.run_shapes, run_shapes);
    SET_FIELD(config.sampler, sampler);
    SET_FIELD(config.otel_variable, otel_variable);
    SET_FIELD(config.otel_key, otel_key);
    SET_FIELD(config.otel_context, otel_context);
    SET_FIELD(config.log_variables, log_variables);
    SET_FIELD(config.module_dict, module_dict);
    SET_FIELD(config.not_traced, not_traced);
    SET_FIELD(config.start_fallback, start_fallback);
    SET_FIELD(config.run_fallback, run_fallback);
    SET_FIELD(config.end_fallback, end_fallback);
    config.follows_parent = follows_parent;
    config.link_only = link_only;
    Py_RETURN_NONE;
}

static PyObject *
configure_wire(PyObject *module, PyObject *args)
{
    PyObject *message_id, *retries, *delivery_count, *queue_wait, *state;
    if (!PyArg_ParseTuple(args, "SSSSS", &message_id, &retries, &delivery_count, &queue_wait,
                          &state))
        return NULL;
    SET_FIELD(key_message_id, message_id);
    SET_FIELD(key_retries, retries);
    SET_FIELD(key_delivery_count, delivery_count);
    SET_FIELD(key_queue_wait, queue_wait);
    SET_FIELD(key_state, state);
    Py_RETURN_NONE;
}

/* -- the process span --------------------------------------------------------------------------- */
/* sampler(parent_sampled, trace_hex) -> 1 keep, 0 drop, -1 error */
static int
sample(PyObject *parent_sampled, PyObject *trace_hex)
{
    PyObject *args[2] = {parent_sampled, trace_hex};
    PyObject *keep = PyObject_Vectorcall(config.sampler, args, 2, NULL);
    if (!keep)
        return -1;
    int result = PyObject_IsTrue(keep);
    Py_DECREF(keep);
    return result;
}

/* A 00 traceparent of two lower-case hex ids: 1; any other text: 0 (the Python path decides) */
static int
is_traceparent_00(PyObject *text)
{
    if (PyUnicode_GET_LENGTH(text) != 55 || PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND)
        return 0;
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(text);
    if (c[0] != '0' || c[1] != '0' || c[2] != '-' || c[35] != '-' || c[52] != '-')
        return 0;
    return all_hex(c + 3, 32) && all_hex(c + 36, 16) && all_hex(c + 53, 2);
}

static PyObject *
make_traceparent(PyObject *trace_hex, PyObject *span_hex, int sampled)
{
    PyObject *text = PyUnicode_New(55, 127);
    if (!text)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    memcpy(out, "00-", 3);
    memcpy(out + 3, PyUnicode_1BYTE_DATA(trace_hex), 32);
    out[35] = '-';
    memcpy(out + 36, PyUnicode_1BYTE_DATA(span_hex), 16);
    memcpy(out + 52, sampled ? "-01" : "-00", 3);
    return text;
}

/* the common case of start_process_span: True when done here, False for the Python path */
static PyObject *
try_start_process_span(PyObject *const *args)
{
    if (config.recorder == NULL || config.recorder == Py_None)
        Py_RETURN_FALSE;
    PyObject *job = args[0];
    PyObject *queue = NULL, *task_name = NULL, *key = NULL, *traceparent = NULL, *tracestate = NULL;
    PyObject *trace_hex = NULL, *parent_hex = NULL, *link_from = NULL, *message = NULL;
    PyObject *task_id = NULL, *retries = NULL, *delivery_count = NULL, *sent_at = NULL;
    PyObject *span = NULL, *job_traceparent = NULL, *result = NULL;

    queue = PyObject_GetAttr(job, s_queue);
    task_name = queue ? PyObject_GetAttr(job, s_task_name) : NULL;
    if (!task_name)
        goto done;
    key = PyTuple_Pack(3, queue, task_name, args[1]);
    if (!key)
        goto done;
    PyObject *shape = PyDict_GetItemWithError(config.process_shapes, key); /* borrowed */
    if (!shape) {
        if (!PyErr_Occurred())
            result = Py_NewRef(Py_False);
        goto done;
    }
    if (!PyTuple_CheckExact(shape) || PyTuple_GET_SIZE(shape) != 2) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    traceparent = PyObject_GetAttr(job, s_producer_traceparent);
    if (!traceparent)
        goto done;
    int has_producer = 0, producer_sampled = 0;
    if (traceparent != Py_None) {
        if (!PyUnicode_Check(traceparent)) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        if (PyUnicode_GET_LENGTH(traceparent)) {
            if (!is_traceparent_00(traceparent)) { /* another version, or malformed: the rules */
                result = Py_NewRef(Py_False);
                goto done;
            }
            tracestate = PyObject_GetAttr(job, s_producer_tracestate);
            if (!tracestate)
                goto done;
            int has_state = PyObject_IsTrue(tracestate);
            if (has_state < 0)
                goto done;
            if (has_state) { /* a TraceState to parse and carry: the Python path */
                result = Py_NewRef(Py_False);
                goto done;
            }
            const Py_UCS1 *c = PyUnicode_1BYTE_DATA(traceparent);
            if (!all_zero(c + 3, 32) && !all_zero(c + 36, 16)) {
                has_producer = 1;
                producer_sampled = HEX_VALUE[c[54]] & 1;
            }
        }
    }
    int sampled;
    int parent_remote = 0;
    if (has_producer) {
        PyObject *producer_trace = PyUnicode_Substring(traceparent, 3, 35);
        PyObject *producer_span = producer_trace ? PyUnicode_Substring(traceparent, 36, 52) : NULL;
        if (!producer_span) {
            Py_XDECREF(producer_trace);
            goto done;
        }
        link_from = PyTuple_Pack(3, producer_trace, producer_span, Py_None);
        if (!link_from) {
            Py_DECREF(producer_trace);
            Py_DECREF(producer_span);
            goto done;
        }
        if (config.link_only) {
            Py_DECREF(producer_trace);
            Py_DECREF(producer_span);
            trace_hex = new_trace_hex();
            if (!trace_hex)
                goto done;
            parent_hex = PyUnicode_New(0, 127);
            if (!parent_hex)
                goto done;
            sampled = sample(Py_None, trace_hex);
        } else {
            trace_hex = producer_trace;
            parent_hex = producer_span;
            parent_remote = 1;
            sampled = config.follows_parent
                          ? producer_sampled
                          : sample(producer_sampled ? Py_True : Py_False, trace_hex);
        }
    } else {
        trace_hex = new_trace_hex();
        if (!trace_hex)
            goto done;
        parent_hex = PyUnicode_New(0, 127);
        if (!parent_hex)
            goto done;
        sampled = sample(Py_None, trace_hex);
    }
    if (sampled < 0)
        goto done;
    task_id = PyObject_GetAttr(job, s_task_id);
    retries = task_id ? PyObject_GetAttr(job, s_retries) : NULL;
    delivery_count = retries ? PyObject_GetAttr(job, s_delivery_count) : NULL;
    sent_at = delivery_count ? PyObject_GetAttr(job, s_sent_at) : NULL;
    if (!sent_at)
        goto done;
    message = PyTuple_Pack(4, task_id, retries, delivery_count, sent_at);
    if (!message)
        goto done;
    span = (PyObject *)span_make((PyTypeObject *)config.span_type,
                                 sampled ? config.recorder : Py_None, trace_hex, parent_hex,
                                 PyTuple_GET_ITEM(shape, 1), 5 /* CONSUMER */,
                                 PyTuple_GET_ITEM(shape, 0), message, parent_remote, Py_None,
                                 link_from ? link_from : Py_None);
    if (!span)
        goto done;
    job_traceparent = make_traceparent(trace_hex, ((SpanCore *)span)->span_hex, sampled);
    if (!job_traceparent)
        goto done;
    if (PyObject_SetAttr(job, s_span, span) < 0
        || PyObject_SetAttr(job, s_traceparent, job_traceparent) < 0
        || PyObject_SetAttr(job, s_tracestate, Py_None) < 0)
        goto done;
    result = Py_NewRef(Py_True);
done:
    Py_XDECREF(queue);
    Py_XDECREF(task_name);
    Py_XDECREF(key);
    Py_XDECREF(traceparent);
    Py_XDECREF(tracestate);
    Py_XDECREF(trace_hex);
    Py_XDECREF(parent_hex);
    Py_XDECREF(link_from);
    Py_XDECREF(message);
    Py_XDECREF(task_id);
    Py_XDECREF(retries);
    Py_XDECREF(delivery_count);
    Py_XDECREF(sent_at);
    Py_XDECREF(span);
    Py_XDECREF(job_traceparent);
    return result;
}

/* start_process_span(job, pool_name): the process span opened here, else by the Python path */
static PyObject *
start_process_span(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "start_process_span(job, pool_name)");
        return NULL;
    }
    PyObject *done = try_start_process_span(args);
    if (done != Py_False)
        return done == Py_True ? (Py_DECREF(done), Py_NewRef(Py_None)) : done;
    Py_DECREF(done);
    if (config.start_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "millpond._spancore is not configured");
        return NULL;
    }
    return PyObject_Vectorcall(config.start_fallback, args, 2, NULL);
}

/* -- the run span --------------------------------------------------------------------------------- */
static PyObject *zero; /* the int 0 */

/* the run span, current, its ids in the log context; or None for the Python path (no live process
 * span here, a task name not seen yet, a variable not found) */
static PyObject *
try_enter_run_span(PyObject *job)
{
    if (config.recorder == NULL || config.otel_variable == NULL || config.otel_variable == Py_None
        || config.log_variables == NULL || config.log_variables == Py_None)
        Py_RETURN_NONE;
    PyObject *log_variables = config.log_variables;
    PyObject *process = PyObject_GetAttr(job, s_span);
    if (!process)
        return NULL;
    if (!PyObject_TypeCheck(process, &SpanCoreType)) {
        Py_DECREF(process);
        Py_RETURN_NONE;
    }
    SpanCore *parent = (SpanCore *)process;
    PyObject *span = NULL, *task_name = NULL, *task_id = NULL, *retries = NULL, *message = NULL;
    PyObject *context = NULL, *token = NULL;
    if (parent->recorder == Py_None) { /* not sampled: the process span carries the context */
        span = Py_NewRef(process);
    } else {
        task_name = PyObject_GetAttr(job, s_task_name);
        if (!task_name)
            goto fail;
        PyObject *shape = PyDict_GetItemWithError(config.run_shapes, task_name); /* borrowed */
        if (!shape || !PyTuple_CheckExact(shape) || PyTuple_GET_SIZE(shape) != 2) {
            if (PyErr_Occurred())
                goto fail;
            Py_DECREF(task_name);
            Py_DECREF(process);
            Py_RETURN_NONE;
        }
        task_id = PyObject_GetAttr(job, s_task_id);
        retries = task_id ? PyObject_GetAttr(job, s_retries) : NULL;
        if (!retries)
            goto fail;
        message = PyTuple_Pack(4, task_id, retries, zero, Py_None);
        if (!message)
            goto fail;
        span = (PyObject *)span_make((PyTypeObject *)config.span_type, parent->recorder,
                                     parent->trace_hex, parent->span_hex,
                                     PyTuple_GET_ITEM(shape, 1), 1 /* INTERNAL */,
                                     PyTuple_GET_ITEM(shape, 0), message, 0, parent->trace_state,
                                     Py_None);
        if (!span)
            goto fail;
    }
    PyObject *entries = PyDict_New();
    if (!entries)
        goto fail;
    if (PyDict_SetItem(entries, config.otel_key, span) < 0) {
        Py_DECREF(entries);
        goto fail;
    }
    context = PyObject_CallOneArg(config.otel_context, entries);
    Py_DECREF(entries);
    if (!context)
        goto fail;
    token = PyContextVar_Set(config.otel_variable, context);
    if (!token)
        goto fail;
    Py_DECREF(token);
    SpanCore *run = (SpanCore *)span;
    token = PyContextVar_Set(PyTuple_GET_ITEM(log_variables, 0), run->trace_hex);
    if (!token)
        goto fail;
    Py_DECREF(token);
    token = PyContextVar_Set(PyTuple_GET_ITEM(log_variables, 1), run->span_hex);
    if (!token)
        goto fail;
    Py_DECREF(token);
    Py_XDECREF(task_name);
    Py_XDECREF(task_id);
    Py_XDECREF(retries);
    Py_XDECREF(message);
    Py_DECREF(context);
    Py_DECREF(process);
    return span;
fail:
    Py_XDECREF(span);
    Py_XDECREF(task_name);
    Py_XDECREF(task_id);
    Py_XDECREF(retries);
    Py_XDECREF(message);
    Py_XDECREF(context);
    Py_DECREF(process);
    return NULL;
}

static PyObject *s_TRACING, *s_SUCCESS, *s_state;

/* enter_run_span(job): what millpond.execution enters around a task body. Not tracing, or no
 * trace context on the job: the shared do-nothing context manager; else the run span, current,
 * with its ids in the log context (made here, or by the configured Python function). */
static PyObject *
enter_run_span(PyObject *module, PyObject *job)
{
    if (config.module_dict == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "millpond._spancore is not configured");
        return NULL;
    }
    PyObject *tracing = PyDict_GetItemWithError(config.module_dict, s_TRACING); /* borrowed */
    if (tracing != Py_True) {
        if (tracing == NULL && PyErr_Occurred())
            return NULL;
        return Py_NewRef(config.not_traced);
    }
    PyObject *traceparent = PyObject_GetAttr(job, s_traceparent);
    if (!traceparent)
        return NULL;
    int traced = PyObject_IsTrue(traceparent);
    Py_DECREF(traceparent);
    if (traced <= 0)
        return traced < 0 ? NULL : Py_NewRef(config.not_traced);
    PyObject *span = try_enter_run_span(job);
    if (span != Py_None)
        return span;
    Py_DECREF(span);
    return PyObject_CallOneArg(config.run_fallback, job);
}

/* end_process_span(job, outcome): a successful job's process span ends here; anything else, and
 * spans not recorded here, go to the configured Python function */
static PyObject *
end_process_span(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "end_process_span(job, outcome)");
        return NULL;
    }
    if (config.end_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "millpond._spancore is not configured");
        return NULL;
    }
    PyObject *span = PyObject_GetAttr(args[0], s_span);
    if (!span)
        return NULL;
    if (PyObject_TypeCheck(span, &SpanCoreType)) {
        PyObject *state = PyObject_GetAttr(args[1], s_state);
        if (!state) {
            Py_DECREF(span);
            return NULL;
        }
        int success = state == s_SUCCESS
                      || (PyUnicode_CheckExact(state) && PyUnicode_Compare(state, s_SUCCESS) == 0);
        Py_DECREF(state);
        if (success) {
            if (PyObject_SetAttr(args[0], s_span, Py_None) < 0) {
                Py_DECREF(span);
                return NULL;
            }
            SpanCore *process = (SpanCore *)span;
            SET_FIELD(process->state, s_SUCCESS);
            PyObject *ended = span_end_at(process, 0);
            Py_DECREF(span);
            return ended;
        }
    }
    Py_DECREF(span);
    return PyObject_Vectorcall(config.end_fallback, args, 2, NULL);
}

/* -- the wire: a plain span as OTLP protobuf ------------------------------------------------------ */
static inline Py_ssize_t
varint_size(uint64_t value)
{
    Py_ssize_t size = 1;
    while (value >= 0x80) {
        value >>= 7;
        size++;
    }
    return size;
}

static inline char *
put_varint(char *out, uint64_t value)
{
    while (value >= 0x80) {
        *out++ = (char)((value & 0x7F) | 0x80);
        value >>= 7;
    }
    *out++ = (char)value;
    return out;
}

static inline char *
put_u64(char *out, uint64_t value)
{
    for (int i = 0; i < 8; i++) {
        out[i] = (char)(value & 0xFF);
        value >>= 8;
    }
    return out + 8;
}

static inline char *
put_hex_bytes(char *out, const Py_UCS1 *chars, Py_ssize_t size)
{
    for (Py_ssize_t i = 0; i < size; i += 2)
        *out++ = (char)((HEX_VALUE[chars[i]] << 4) | HEX_VALUE[chars[i + 1]]);
    return out;
}

/* One attribute (Span field 9) whose value is an AnyValue of `value_size` bytes. */
typedef struct {
    PyObject *key;     /* the encoded KeyValue.key field */
    Py_ssize_t value_size;
    Py_ssize_t kv_size;
    Py_ssize_t size;   /* the whole field */
} Attribute;

static void
attribute_sizes(Attribute *a, PyObject *key, Py_ssize_t value_size)
{
    a->key = key;
    a->value_size = value_size;
    a->kv_size = PyBytes_GET_SIZE(key) + 1 + varint_size((uint64_t)value_size) + value_size;
    a->size = 1 + varint_size((uint64_t)a->kv_size) + a->kv_size;
}

static char *
put_attribute_head(char *out, const Attribute *a)
{
    *out++ = 0x4a;
    out = put_varint(out, (uint64_t)a->kv_size);
    memcpy(out, PyBytes_AS_STRING(a->key), PyBytes_GET_SIZE(a->key));
    out += PyBytes_GET_SIZE(a->key);
    *out++ = 0x12;
    return put_varint(out, (uint64_t)a->value_size);
}

static int
as_int64(PyObject *value, int64_t *out)
{
    if (!PyLong_CheckExact(value))
        return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

static const char LINK_HEAD[] = {0x6a, 0x21, 0x0a, 0x10};
static const char LINK_TAIL[] = {0x35, 0x00, 0x03, 0x00, 0x00};
static const char LOCAL_FLAGS[] = {(char)0x85, 0x01, 0x00, 0x01, 0x00, 0x00};
static const char REMOTE_FLAGS[] = {(char)0x85, 0x01, 0x00, 0x03, 0x00, 0x00};

/* encode(span) -> the span's bytes (ScopeSpans field 2), or None for the Python encoder */
static PyObject *
encode(PyObject *module, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &SpanCoreType) || key_message_id == NULL)
        Py_RETURN_NONE;
    SpanCore *s = (SpanCore *)arg;
    if (!s->plain || s->trace_state != Py_None || !PyTuple_CheckExact(s->message)
        || PyTuple_GET_SIZE(s->message) != 4 || !PyBytes_CheckExact(s->base)
        || !PyUnicode_CheckExact(s->name) || s->kind < 0 || s->kind > 127 || s->start_ns < 0
        || s->end_ns < 0)
        Py_RETURN_NONE;
    const Py_UCS1 *trace = hex_chars(s->trace_hex, 32);
    const Py_UCS1 *span_id = hex_chars(s->span_hex, 16);
    if (!trace || !span_id || !PyUnicode_CheckExact(s->parent_hex))
        Py_RETURN_NONE;
    const Py_UCS1 *parent = NULL;
    if (PyUnicode_GET_LENGTH(s->parent_hex)) {
        parent = hex_chars(s->parent_hex, 16);
        if (!parent)
            Py_RETURN_NONE;
    }
    const Py_UCS1 *link_trace = NULL, *link_span = NULL;
    if (s->link_from != Py_None) {
        if (!PyTuple_CheckExact(s->link_from) || PyTuple_GET_SIZE(s->link_from) != 3
            || PyTuple_GET_ITEM(s->link_from, 2) != Py_None)
            Py_RETURN_NONE;
        link_trace = hex_chars(PyTuple_GET_ITEM(s->link_from, 0), 32);
        link_span = hex_chars(PyTuple_GET_ITEM(s->link_from, 1), 16);
        if (!link_trace || !link_span)
            Py_RETURN_NONE;
    }
    PyObject *task_id = PyTuple_GET_ITEM(s->message, 0);
    PyObject *sent_at = PyTuple_GET_ITEM(s->message, 3);
    int64_t retries, delivery_count;
    if (!PyUnicode_CheckExact(task_id) || !as_int64(PyTuple_GET_ITEM(s->message, 1), &retries)
        || !as_int64(PyTuple_GET_ITEM(s->message, 2), &delivery_count))
        Py_RETURN_NONE;
    if (sent_at != Py_None && !PyFloat_CheckExact(sent_at))
        Py_RETURN_NONE;
    if (s->state != Py_None && !PyUnicode_CheckExact(s->state))
        Py_RETURN_NONE;
    Py_ssize_t name_size, id_size, state_size = 0;
    const char *name = PyUnicode_AsUTF8AndSize(s->name, &name_size);
    const char *id = name ? PyUnicode_AsUTF8AndSize(task_id, &id_size) : NULL;
    const char *state = NULL;
    if (id && s->state != Py_None)
        state = PyUnicode_AsUTF8AndSize(s->state, &state_size);
    if (!id || (s->state != Py_None && !state)) { /* lone surrogates: Python replaces them */
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Attribute a_id, a_retries, a_delivery, a_wait, a_state;
    attribute_sizes(&a_id, key_message_id, 1 + varint_size((uint64_t)id_size) + id_size);
    attribute_sizes(&a_retries, key_retries, 1 + varint_size((uint64_t)retries));
    attribute_sizes(&a_delivery, key_delivery_count, 1 + varint_size((uint64_t)delivery_count));
    attribute_sizes(&a_wait, key_queue_wait, 9);
    attribute_sizes(&a_state, key_state, 1 + varint_size((uint64_t)state_size) + state_size);

    Py_ssize_t body = 18 + 10 + (parent ? 10 : 0);
    body += 1 + varint_size((uint64_t)name_size) + name_size + 2; /* name, kind */
    body += 18;                                                     /* start, end */
    body += PyBytes_GET_SIZE(s->base) + a_id.size + a_retries.size;
    if (delivery_count)
        body += a_delivery.size;
    if (sent_at != Py_None)
        body += a_wait.size;
    if (state)
        body += a_state.size;
    if (link_trace)
        body += 35;
    body += 6; /* flags */
    Py_ssize_t total = 1 + varint_size((uint64_t)body) + body;
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, total);
    if (!bytes)
        return NULL;
    char *out = PyBytes_AS_STRING(bytes);
    *out++ = 0x12;
    out = put_varint(out, (uint64_t)body);
    *out++ = 0x0a;
    *out++ = 0x10;
    out = put_hex_bytes(out, trace, 32);
    *out++ = 0x12;
    *out++ = 0x08;
    out = put_hex_bytes(out, span_id, 16);
    if (parent) {
        *out++ = 0x22;
        *out++ = 0x08;
        out = put_hex_bytes(out, parent, 16);
    }
    *out++ = 0x2a;
    out = put_varint(out, (uint64_t)name_size);
    memcpy(out, name, name_size);
    out += name_size;
    *out++ = 0x30;
    *out++ = (char)s->kind;
    *out++ = 0x39;
    out = put_u64(out, (uint64_t)s->start_ns);
    *out++ = 0x41;
    out = put_u64(out, (uint64_t)s->end_ns);
    memcpy(out, PyBytes_AS_STRING(s->base), PyBytes_GET_SIZE(s->base));
    out += PyBytes_GET_SIZE(s->base);
    out = put_attribute_head(out, &a_id);
    *out++ = 0x0a;
    out = put_varint(out, (uint64_t)id_size);
    memcpy(out, id, id_size);
    out += id_size;
    out = put_attribute_head(out, &a_retries);
    *out++ = 0x18;
    out = put_varint(out, (uint64_t)retries);
    if (delivery_count) {
        out = put_attribute_head(out, &a_delivery);
        *out++ = 0x18;
        out = put_varint(out, (uint64_t)delivery_count);
    }
    if (sent_at != Py_None) {
        double wait = (double)s->start_ns / 1e6 - PyFloat_AS_DOUBLE(sent_at) * 1000.0;
        if (0.0 > wait) /* as Python's max(wait, 0.0): NaN and -0.0 stay */
            wait = 0.0;
        uint64_t bits;
        memcpy(&bits, &wait, 8);
        out = put_attribute_head(out, &a_wait);
        *out++ = 0x21;
        out = put_u64(out, bits);
    }
    if (state) {
        out = put_attribute_head(out, &a_state);
        *out++ = 0x0a;
        out = put_varint(out, (uint64_t)state_size);
        memcpy(out, state, state_size);
        out += state_size;
    }
    if (link_trace) {
        memcpy(out, LINK_HEAD, 4);
        out = put_hex_bytes(out + 4, link_trace, 32);
        *out++ = 0x12;
        *out++ = 0x08;
        out = put_hex_bytes(out, link_span, 16);
        memcpy(out, LINK_TAIL, 5);
        out += 5;
    }
    memcpy(out, s->parent_remote ? REMOTE_FLAGS : LOCAL_FLAGS, 6);
    out += 6;
    if (out - PyBytes_AS_STRING(bytes) != total) { /* a sizing mistake: never send it */
        Py_DECREF(bytes);
        PyErr_SetString(PyExc_AssertionError, "millpond._spancore.encode: size mismatch");
        return NULL;
    }
    return bytes;
}

/* -- the module ------------------------------------------------------------------------------------ */
static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "Set what the fast paths use (the recorder, shape caches, sampler, context variable)."},
    {"configure_wire", configure_wire, METH_VARARGS,
     "The encoded keys of the message id, retries, delivery count, queue wait and state."},
    {"start_process_span", (PyCFunction)(void (*)(void))start_process_span, METH_FASTCALL,
     "Open a job's process span (the configured Python function does what this does not)."},
    {"enter_run_span", enter_run_span, METH_O,
     "The job's run span, made current with its ids in the log context (or a no-op manager)."},
    {"end_process_span", (PyCFunction)(void (*)(void))end_process_span, METH_FASTCALL,
     "End the job's process span (the configured Python function does what this does not)."},
    {"encode", encode, METH_O, "A plain span's OTLP bytes, or None when Python must encode it."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "millpond._spancore",
    .m_doc = "The traced task path in C (see millpond.span_recorder).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text)                                                                         \
    do {                                                                                          \
        if (!((var) = PyUnicode_InternFromString(text)))                                          \
            return NULL;                                                                          \
    } while (0)

PyMODINIT_FUNC
PyInit__spancore(void)
{
    static int seeded = 0;
    if (!seeded) {
        hex_table_init();
        rng_seed();
        if (pthread_atfork(NULL, NULL, rng_seed) != 0) {
            PyErr_SetString(PyExc_ImportError, "millpond._spancore: pthread_atfork failed");
            return NULL;
        }
        seeded = 1;
    }
    INTERN(s_record, "record");
    INTERN(s_fast_queue, "_fast_queue");
    INTERN(s_append, "append");
    INTERN(s_escaped, "_escaped");
    INTERN(s_producer_traceparent, "producer_traceparent");
    INTERN(s_producer_tracestate, "producer_tracestate");
    INTERN(s_queue, "queue");
    INTERN(s_task_name, "task_name");
    INTERN(s_task_id, "task_id");
    INTERN(s_retries, "retries");
    INTERN(s_delivery_count, "delivery_count");
    INTERN(s_sent_at, "sent_at");
    INTERN(s_span, "span");
    INTERN(s_traceparent, "traceparent");
    INTERN(s_tracestate, "tracestate");
    INTERN(s_TRACING, "TRACING");
    INTERN(s_SUCCESS, "SUCCESS");
    INTERN(s_state, "state");
    if (!zero && !(zero = PyLong_FromLong(0)))
        return NULL;
    if (PyType_Ready(&SpanCoreType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (!module)
        return NULL;
    if (PyModule_AddObjectRef(module, "SpanCore", (PyObject *)&SpanCoreType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
