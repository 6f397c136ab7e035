/* Hot loops that pure Python cannot make cheap: the walk of a creation stack, the
 * middleware's header scan on every request, a trace's resources and annotations written as
 * JSON, the loop methods the hooks replace (Dispatch), the recording core (TraceCore,
 * Resource), and what every traced task runs through: the task factory's traced side
 * (TaskFactory) and each step of its coroutine (TimedCoroutine).
 *
 *   got = stack_lookup(skip, max_depth, stop_code, cache)   # a Stack, or (hash, packed walk)
 *
 * Walks from the caller's frame (skip = 0) outwards, at most max_depth frames, stopping
 * before a frame running stop_code or where the loop runs the task (frame_kind, below), and
 * looks the (code object address, last instruction) pairs of the walk up in the cache,
 * allocating nothing the garbage collector sees on a hit.
 * The Python fallback in _stacks.py keys its own cache by the same pairs as a tuple; the two
 * caches never meet. Optional at build time: without a compiler the package runs on the
 * fallback.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <time.h>
#include <frameobject.h>
#include <structmember.h>

/* On CPython 3.11-3.13 the walk reads the interpreter's own frame records instead of asking for
 * frame objects: PyFrame_GetBack() makes a frame object (a garbage-collected allocation) for
 * every frame it passes that has none yet, which was most of what a stack cost. Which frames
 * count is decided by the interpreter's own _PyFrame_IsIncomplete, the test PyFrame_GetBack()
 * applies, so both walks see the same frames. Other versions use the public API. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000 && !defined(PYPY_VERSION)
#define INTERNAL_FRAMES 1
#ifndef Py_BUILD_CORE
#define Py_BUILD_CORE 1
#define UNDEF_BUILD_CORE 1
#endif
#include <internal/pycore_frame.h>
#ifdef UNDEF_BUILD_CORE
#undef Py_BUILD_CORE
#endif
#endif

/* Where obj keeps the attribute called name, when that is a __slots__ member of obj's class
 * (found through the type's attribute cache) and the class reads and writes attributes the
 * usual way: the traced side of every future, timer and stack reads and writes a few such
 * slots, and the generic attribute lookup was most of what each one cost. NULL otherwise,
 * for the caller to ask the usual way (a class that replaced the slot, or its
 * __getattribute__ / __setattr__, is asked). */
static PyObject **
slot_address(PyObject *obj, PyObject *name, int writing)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (writing ? tp->tp_setattro != PyObject_GenericSetAttr
                : tp->tp_getattro != PyObject_GenericGetAttr) {
        return NULL;
    }
    PyObject *descr = _PyType_Lookup(tp, name); /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        return NULL;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
    if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
        return NULL;
    }
    return (PyObject **)((char *)obj + m->offset);
}

/* obj.name: a new reference, NULL with an exception set (an unset slot raises as ever). */
static PyObject *
slot_get(PyObject *obj, PyObject *name)
{
    PyObject **at = slot_address(obj, name, 0);
    if (at != NULL && *at != NULL) {
        return Py_NewRef(*at);
    }
    return PyObject_GetAttr(obj, name);
}

/* obj.name = value; 0, or -1 with an exception set. */
static int
slot_set(PyObject *obj, PyObject *name, PyObject *value)
{
    PyObject **at = slot_address(obj, name, 1);
    if (at == NULL) {
        return PyObject_SetAttr(obj, name, value);
    }
    Py_XSETREF(*at, Py_NewRef(value));
    return 0;
}

#define MAX_FRAMES 256

/* Where a request's stack ends on a loop whose callbacks run in C (uvloop), where no frame of
 * asyncio's Handle._run is there to stop at: a coroutine's frame entered from a plain
 * function's is a coroutine being driven by whoever runs the loop (asyncio.Runner.run,
 * uvloop.run, a server's main), and everything from that plain function outwards is the
 * process, not the request. A plain function that drives a coroutine for the tracer itself
 * (the pure-Python TimedCoroutine's send and throw) is passed through. Both set by
 * set_stack_bounds. */
#define MAX_DRIVERS 4
static PyObject *stack_drivers[MAX_DRIVERS]; /* owned code objects */
static int n_stack_drivers;
/* And, for a callback's walk on such a loop, the frames that run a loop (asyncio.Runner.run,
 * asyncio.run): stopped at, as stop_code is. */
#define MAX_RUNNERS 4
static PyObject *loop_runners[MAX_RUNNERS]; /* owned code objects */
static int n_loop_runners;

#define CORO_FLAGS (CO_COROUTINE | CO_ITERABLE_COROUTINE)
#define RESUMABLE_FLAGS (CO_GENERATOR | CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR)

/* Whether code is one of the n codes (compared by address). */
static inline int
one_of(PyObject *code, PyObject *const *codes, int n)
{
    for (int i = 0; i < n; i++) {
        if (codes[i] == code) {
            return 1;
        }
    }
    return 0;
}
#define is_runner(code) one_of((code), loop_runners, n_loop_runners)
#define is_driver(code) one_of((code), stack_drivers, n_stack_drivers)

/* What the walk does at a frame running code, given whether the frame just inside it (walked
 * before) is a coroutine or stands for one: STOPS before it, or goes on, with *coro set to
 * whether this frame is a coroutine or stands for one (a driver stands for the coroutine it
 * drives). A request's walk is mostly coroutines, which cost one test of their flags. */
#define STOPS (-1)
static inline int
frame_kind(PyObject *code, PyObject *stop, int inner_coro, int *coro)
{
    *coro = 0;
    if (code == stop || !PyCode_Check(code)) {
        return code == stop ? STOPS : 0;
    }
    int flags = ((PyCodeObject *)code)->co_flags;
    if (flags & RESUMABLE_FLAGS) {
        *coro = (flags & CORO_FLAGS) != 0;
        return 0;
    }
    if (is_driver(code)) {
        *coro = 1;
        return 0;
    }
    return inner_coro || is_runner(code) ? STOPS : 0;
}

typedef struct {
    void *code;
    long long lasti;
} entry;

/* Fills buf with the (code, last instruction) of at most depth frames, from the caller's frame
 * (skip = 0) outwards, stopping before a frame running stop; returns how many. */
static Py_ssize_t
walk(Py_ssize_t skip, Py_ssize_t depth, PyObject *stop, entry *buf)
{
    Py_ssize_t n = 0;
#ifdef INTERNAL_FRAMES
    PyThreadState *tstate = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030D0000
    _PyInterpreterFrame *f = tstate->current_frame;
#define FRAME_CODE(f) ((PyObject *)(f)->f_executable)
#else
    _PyInterpreterFrame *f = tstate->cframe->current_frame;
#define FRAME_CODE(f) ((PyObject *)(f)->f_code)
#endif
    while (f != NULL && _PyFrame_IsIncomplete(f)) {
        f = f->previous;
    }
    for (Py_ssize_t i = 0; i < skip && f != NULL; i++) {
        f = f->previous;
        while (f != NULL && _PyFrame_IsIncomplete(f)) {
            f = f->previous;
        }
    }
    int coro = 0;
    while (f != NULL && n < depth) {
        PyObject *code = FRAME_CODE(f);
        if (frame_kind(code, stop, coro, &coro) == STOPS) {
            break;
        }
        buf[n].code = (void *)code;
        buf[n].lasti = _PyInterpreterFrame_LASTI(f);
        n++;
        f = f->previous;
        while (f != NULL && _PyFrame_IsIncomplete(f)) {
            f = f->previous;
        }
    }
#undef FRAME_CODE
#else
    PyFrameObject *f = PyEval_GetFrame(); /* borrowed */
    Py_XINCREF(f);
    for (Py_ssize_t i = 0; i < skip && f != NULL; i++) {
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    int coro = 0;
    while (f != NULL && n < depth) {
        PyCodeObject *code = PyFrame_GetCode(f);
        if (frame_kind((PyObject *)code, stop, coro, &coro) == STOPS) {
            Py_DECREF(code);
            break;
        }
        buf[n].code = (void *)code;
#if PY_VERSION_HEX >= 0x030B0000
        buf[n].lasti = PyFrame_GetLasti(f);
#else
        buf[n].lasti = f->f_lasti;
#endif
        n++;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
        Py_DECREF(code);
    }
    Py_XDECREF(f);
#endif
    return n;
}

static int
walk_args(PyObject *const *args, Py_ssize_t *skip, Py_ssize_t *depth)
{
    *skip = PyLong_AsSsize_t(args[0]);
    *depth = PyLong_AsSsize_t(args[1]);
    if ((*skip == -1 || *depth == -1) && PyErr_Occurred()) {
        return -1;
    }
    if (*depth > MAX_FRAMES) {
        *depth = MAX_FRAMES;
    }
    if (*skip < 0 || *depth < 0) {
        PyErr_SetString(PyExc_ValueError, "skip and max_depth must be >= 0");
        return -1;
    }
    return 0;
}

/* The walks found last, by their hash: a hit here skips making the hash an int and looking
 * it up in the cache dict (a third of what a found stack cost). An entry counts only while the
 * dict it was found in is unchanged since (its version tag, which CPython moves on every
 * change to a dict and never gives two dicts): a stack seen for the first time, or a cache
 * cleared or replaced, and the entries are looked up again. */
#define FRONT_SIZE 256
static struct {
    PyObject *cache; /* compared, not owned: the version tells a new dict at the same place */
    uint64_t version;
    uint64_t hash;
    PyObject *packed;
    PyObject *stack;
} front[FRONT_SIZE];

/* The dict's version tag; 0 where CPython has none (3.14 dropped it): no entry is kept. */
static uint64_t
dict_version(PyObject *dict)
{
#if PY_VERSION_HEX < 0x030E0000 && !defined(PYPY_VERSION)
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
    return ((PyDictObject *)dict)->ma_version_tag; /* deprecated as API in 3.12, still kept */
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#else
    return 0;
#endif
}

/* stack_lookup(skip, max_depth, stop_code, cache): the caller's walk, looked up in cache
 * (a dict: hash of the walk -> (its packed key, the Stack made for it)) without building the
 * key: on a hit, the Stack; on a miss, (hash, packed key) for the caller to format and store.
 * The hash only finds the entry: the packed key is compared in full, so two walks that share
 * a hash can never share a Stack. */
static PyObject *
stack_lookup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "stack_lookup(skip, max_depth, stop_code, cache: dict)");
        return NULL;
    }
    Py_ssize_t skip, depth;
    if (walk_args(args, &skip, &depth) < 0) {
        return NULL;
    }
    entry buf[MAX_FRAMES];
    Py_ssize_t n = walk(skip, depth, args[2], buf);
    Py_ssize_t size = n * (Py_ssize_t)sizeof(entry);
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        h = (h ^ (uint64_t)(uintptr_t)buf[i].code) * 0xFF51AFD7ED558CCDULL;
        h = (h ^ (uint64_t)buf[i].lasti ^ (h >> 29)) * 0xC4CEB9FE1A85EC53ULL;
    }
    h ^= h >> 32;
    PyObject *cache = args[3];
    uint64_t version = dict_version(cache);
    Py_ssize_t slot = (Py_ssize_t)(h & (FRONT_SIZE - 1));
    if (version != 0 && front[slot].stack != NULL && front[slot].cache == cache &&
        front[slot].version == version && front[slot].hash == h &&
        PyBytes_GET_SIZE(front[slot].packed) == size &&
        memcmp(PyBytes_AS_STRING(front[slot].packed), buf, (size_t)size) == 0) {
        return Py_NewRef(front[slot].stack);
    }
    PyObject *key = PyLong_FromUnsignedLongLong(h);
    if (key == NULL) {
        return NULL;
    }
    PyObject *hit = PyDict_GetItemWithError(cache, key); /* borrowed */
    if (hit == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    if (hit != NULL && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 2) {
        PyObject *packed = PyTuple_GET_ITEM(hit, 0);
        if (PyBytes_CheckExact(packed) && PyBytes_GET_SIZE(packed) == size &&
            memcmp(PyBytes_AS_STRING(packed), buf, (size_t)size) == 0) {
            Py_DECREF(key);
            PyObject *stack = PyTuple_GET_ITEM(hit, 1);
            if (version != 0) {
                Py_XSETREF(front[slot].packed, Py_NewRef(packed));
                Py_XSETREF(front[slot].stack, Py_NewRef(stack));
                front[slot].cache = cache;
                front[slot].version = version;
                front[slot].hash = h;
            }
            return Py_NewRef(stack);
        }
    }
    PyObject *packed = PyBytes_FromStringAndSize((const char *)buf, size);
    if (packed == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *miss = PyTuple_Pack(2, key, packed);
    Py_DECREF(key);
    Py_DECREF(packed);
    return miss;
}

/* The value of the first header called name, None when there is none, or NotImplemented
 * when headers is not a list or tuple of (bytes, bytes) pairs (the caller then scans them in
 * Python). Part of untraced_check. */
static PyObject *
find_header(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "find_header(headers, name: bytes)");
        return NULL;
    }
    PyObject *headers = args[0];
    const char *want = PyBytes_AS_STRING(args[1]);
    Py_ssize_t want_len = PyBytes_GET_SIZE(args[1]);
    PyObject **items;
    Py_ssize_t n;
    if (PyList_CheckExact(headers)) {
        items = PySequence_Fast_ITEMS(headers);
        n = PyList_GET_SIZE(headers);
    }
    else if (PyTuple_CheckExact(headers)) {
        items = PySequence_Fast_ITEMS(headers);
        n = PyTuple_GET_SIZE(headers);
    }
    else {
        Py_RETURN_NOTIMPLEMENTED;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = items[i];
        PyObject *key, *value;
        if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2) {
            key = PyTuple_GET_ITEM(pair, 0);
            value = PyTuple_GET_ITEM(pair, 1);
        }
        else if (PyList_CheckExact(pair) && PyList_GET_SIZE(pair) == 2) {
            key = PyList_GET_ITEM(pair, 0);
            value = PyList_GET_ITEM(pair, 1);
        }
        else {
            Py_RETURN_NOTIMPLEMENTED;
        }
        if (!PyBytes_CheckExact(key)) {
            Py_RETURN_NOTIMPLEMENTED;
        }
        if (PyBytes_GET_SIZE(key) == want_len &&
            memcmp(PyBytes_AS_STRING(key), want, (size_t)want_len) == 0) {
            Py_INCREF(value);
            return value;
        }
    }
    Py_RETURN_NONE;
}

/* untraced_check(scope, header, prefix): the middleware's whole per-request decision in one
 * call. None: nothing asks for tracing (an untraced request goes straight to the app);
 * the header's value when the request carries it; True for a path under ``prefix`` (the
 * store and viewer) without it; NotImplemented for anything unusual (checked in Python). */
/* Interned once: dictionary lookups with them hit on the pointer, with no string built. */
static PyObject *s_type, *s_headers, *s_path, *s_http, *s_websocket;

static int
same_text(PyObject *a, PyObject *b)
{
    return a == b || PyUnicode_Compare(a, b) == 0;
}

static PyObject *
untraced_check(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[1]) || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "untraced_check(scope, header: bytes, prefix: str)");
        return NULL;
    }
    PyObject *scope = args[0];
    if (!PyDict_CheckExact(scope)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *type = PyDict_GetItemWithError(scope, s_type); /* borrowed */
    if (type == NULL || !PyUnicode_Check(type)) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (!same_text(type, s_http) && !same_text(type, s_websocket)) {
        Py_RETURN_NONE;
    }
    PyObject *headers = PyDict_GetItemWithError(scope, s_headers);
    if (headers != NULL && headers != Py_None) {
        PyObject *found_args[2] = {headers, args[1]};
        PyObject *found = find_header(module, found_args, 2);
        if (found != Py_None) {
            return found; /* the value, NotImplemented, or NULL on error */
        }
        Py_DECREF(found);
    }
    else if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *prefix = args[2];
    Py_ssize_t want = PyUnicode_GET_LENGTH(prefix);
    if (want > 0) {
        PyObject *path = PyDict_GetItemWithError(scope, s_path);
        if (path != NULL && PyUnicode_Check(path) && PyUnicode_GET_LENGTH(path) >= want) {
            if (PyUnicode_IS_ASCII(path) && PyUnicode_IS_ASCII(prefix)) {
                if (memcmp(PyUnicode_DATA(path), PyUnicode_DATA(prefix), (size_t)want) == 0) {
                    Py_RETURN_TRUE;
                }
            }
            else {
                Py_ssize_t at = PyUnicode_Tailmatch(path, prefix, 0, PY_SSIZE_T_MAX, -1);
                if (at < 0) {
                    return NULL;
                }
                if (at) {
                    Py_RETURN_TRUE;
                }
            }
        }
        else if (path == NULL && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}


/* Format v1's "resources" array (write_resources, below, for trace_json): the same bytes
 * orjson writes for _serialize.resource_dicts(resources, origin), with no dict, list or int
 * made on the way (building those is what the Python path spends its
 * time on, and what wakes the garbage collector). ``slots`` are the member descriptors of
 * Resource's async_id, trigger_id, type, stack_id, created_at, callbacks, settled_at, state
 * and awaited_by, read straight at their offsets; ``encode`` (orjson.dumps) writes each
 * distinct string once (into ``cache``, str -> bytes, kept across calls), so escaping stays
 * exactly orjson's. */
enum { R_ID, R_TRIGGER, R_TYPE, R_STACK, R_CREATED, R_CALLBACKS, R_SETTLED, R_STATE, R_AWAITED,
       R_SLOTS };

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} buffer;

static int
reserve(buffer *b, Py_ssize_t more)
{
    if (b->len + more <= b->cap) {
        return 0;
    }
    Py_ssize_t cap = b->cap * 2;
    if (cap < b->len + more) {
        cap = b->len + more;
    }
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

/* Writers reserve first: ROOM before each resource and after each string, enough for any
 * run of keys and ints up to the next reserve (an int is at most 20 characters). */
#define ROOM 512
#define PUT(b, lit) (memcpy((b)->data + (b)->len, lit, sizeof(lit) - 1), (b)->len += sizeof(lit) - 1)

static void
put_int(buffer *b, long long v)
{
    char tmp[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) {
        tmp[n++] = '-';
    }
    while (n) {
        b->data[b->len++] = tmp[--n];
    }
}

static PyObject *
slot(PyObject *obj, Py_ssize_t offset, const char *name)
{
    PyObject *v = *(PyObject **)((char *)obj + offset);
    if (v == NULL) {
        PyErr_Format(PyExc_AttributeError, "resource has no %s", name);
    }
    return v; /* borrowed */
}

static int
get_ll(PyObject *v, long long *out)
{
    if (!PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "resource times and ids must be ints");
        return -1;
    }
    /* not PyLong_AsLongLong: for the multi-digit ints a clock reading is, it goes through a
     * generic byte conversion; this one adds up the digits */
    int overflow = 0;
    *out = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "int too big for a trace time or id");
        return -1;
    }
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* An int, or null for None; ``minus`` is taken off (the trace's origin for times). */
static int
put_opt(buffer *b, PyObject *v, long long minus)
{
    if (v == Py_None) {
        PUT(b, "null");
        return 0;
    }
    long long x;
    if (get_ll(v, &x) < 0) {
        return -1;
    }
    put_int(b, x - minus);
    return 0;
}

static int
put_str(buffer *b, PyObject *s, PyObject *cache, PyObject *encode)
{
    PyObject *done = PyDict_GetItemWithError(cache, s); /* borrowed */
    if (done == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        done = PyObject_CallOneArg(encode, s);
        if (done == NULL) {
            return -1;
        }
        int failed = !PyBytes_Check(done) || PyDict_SetItem(cache, s, done) < 0;
        Py_DECREF(done); /* the cache holds it */
        if (failed) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "encode must return bytes");
            }
            return -1;
        }
    }
    Py_ssize_t n = PyBytes_GET_SIZE(done);
    if (reserve(b, n + ROOM) < 0) {
        return -1;
    }
    memcpy(b->data + b->len, PyBytes_AS_STRING(done), (size_t)n);
    b->len += n;
    return 0;
}

static int
put_resource(buffer *b, PyObject *r, const Py_ssize_t *off, long long o, PyObject *cache,
             PyObject *encode)
{
    static const char *names[R_SLOTS] = {"async_id", "trigger_id", "type", "stack_id",
                                         "created_at", "callbacks", "settled_at", "state",
                                         "awaited_by"};
    PyObject *v[R_SLOTS];
    for (int i = 0; i < R_SLOTS; i++) {
        /* A Resource's callbacks list is made on first use: none yet reads as empty. */
        if (i == R_CALLBACKS && *(PyObject **)((char *)r + off[i]) == NULL) {
            v[i] = NULL;
            continue;
        }
        if ((v[i] = slot(r, off[i], names[i])) == NULL) {
            return -1;
        }
    }
    PyObject *cb = v[R_CALLBACKS];
    if (cb != NULL && !PyList_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "resource callbacks must be a list");
        return -1;
    }
    Py_ssize_t n = cb != NULL ? PyList_GET_SIZE(cb) : 0;
    if (reserve(b, ROOM) < 0) {
        return -1;
    }
    long long x;
    PUT(b, "{\"asyncId\":");
    if (get_ll(v[R_ID], &x) < 0) {
        return -1;
    }
    put_int(b, x);
    PUT(b, ",\"triggerId\":");
    if (put_opt(b, v[R_TRIGGER], 0) < 0) {
        return -1;
    }
    PUT(b, ",\"type\":");
    if (put_str(b, v[R_TYPE], cache, encode) < 0) {
        return -1;
    }
    PUT(b, ",\"stackTraceId\":");
    if (put_opt(b, v[R_STACK], 0) < 0) {
        return -1;
    }
    PUT(b, ",\"createdAt\":");
    if (get_ll(v[R_CREATED], &x) < 0) {
        return -1;
    }
    put_int(b, x - o);
    /* first start; last end (the start before a step still running has no end yet) */
    PUT(b, ",\"callbackStartedAt\":");
    if (n == 0) {
        PUT(b, "null,\"callbackEndedAt\":null");
    }
    else {
        if (put_opt(b, PyList_GET_ITEM(cb, 0), o) < 0) {
            return -1;
        }
        PUT(b, ",\"callbackEndedAt\":");
        PyObject *last = (n & 1) ? (n > 1 ? PyList_GET_ITEM(cb, n - 2) : Py_None)
                                 : PyList_GET_ITEM(cb, n - 1);
        if (put_opt(b, last, o) < 0) {
            return -1;
        }
    }
    PUT(b, ",\"destroyedAt\":");
    if (put_opt(b, v[R_SETTLED], o) < 0) {
        return -1;
    }
    PUT(b, ",\"callbacks\":[");
    if (reserve(b, 64 + n * 24) < 0) { /* "[a,b]," per pair of ints: at most 2 * 24 */
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i += 2) {
        if (i) {
            PUT(b, ",");
        }
        PUT(b, "[");
        if (get_ll(PyList_GET_ITEM(cb, i), &x) < 0) {
            return -1;
        }
        put_int(b, x - o);
        PUT(b, ",");
        if (put_opt(b, i + 1 < n ? PyList_GET_ITEM(cb, i + 1) : Py_None, o) < 0) {
            return -1;
        }
        PUT(b, "]");
    }
    PUT(b, "],\"state\":");
    if (put_str(b, v[R_STATE], cache, encode) < 0) {
        return -1;
    }
    PyObject *aw = v[R_AWAITED];
    if (aw != Py_None && PyList_Check(aw) && PyList_GET_SIZE(aw) > 0) {
        Py_ssize_t m = PyList_GET_SIZE(aw);
        if (reserve(b, 32 + m * 21) < 0) {
            return -1;
        }
        PUT(b, ",\"awaitedBy\":[");
        for (Py_ssize_t i = 0; i < m; i++) {
            if (i) {
                PUT(b, ",");
            }
            if (get_ll(PyList_GET_ITEM(aw, i), &x) < 0) {
                return -1;
            }
            put_int(b, x);
        }
        PUT(b, "]");
    }
    else if (aw != Py_None && !PyList_Check(aw)) {
        PyErr_SetString(PyExc_TypeError, "resource awaited_by must be a list or None");
        return -1;
    }
    PUT(b, "}");
    return 0;
}

/* The slot offsets of a Resource class, from its 9 member descriptors; its type in *owner. */
static int
slot_offsets(PyObject *slots, Py_ssize_t *off, PyTypeObject **owner)
{
    if (!PyTuple_Check(slots) || PyTuple_GET_SIZE(slots) != R_SLOTS) {
        PyErr_SetString(PyExc_TypeError, "slots must be a tuple of 9 member descriptors");
        return -1;
    }
    *owner = NULL;
    for (int i = 0; i < R_SLOTS; i++) {
        PyObject *d = PyTuple_GET_ITEM(slots, i);
        if (!Py_IS_TYPE(d, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            PyErr_SetString(PyExc_TypeError, "slots must be the __slots__ members of one class");
            return -1;
        }
        PyTypeObject *t = ((PyMemberDescrObject *)d)->d_common.d_type;
        if (*owner != NULL && t != *owner) {
            PyErr_SetString(PyExc_TypeError, "slots must be the __slots__ members of one class");
            return -1;
        }
        *owner = t;
        off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
    }
    return 0;
}

/* Appends format v1's "resources" array to b. */
static int
write_resources(buffer *b, PyObject *resources, long long o, PyObject *slots, PyObject *encode,
                PyObject *cache)
{
    Py_ssize_t off[R_SLOTS];
    PyTypeObject *owner;
    if (!PyList_Check(resources) || slot_offsets(slots, off, &owner) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "resources must be a list");
        }
        return -1;
    }
    Py_ssize_t count = PyList_GET_SIZE(resources);
    if (reserve(b, 64 + count * 256) < 0) {
        return -1;
    }
    b->data[b->len++] = '[';
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyList_GET_ITEM(resources, i);
        if (!PyObject_TypeCheck(r, owner)) {
            PyErr_Format(PyExc_TypeError, "resources[%zd] is not a %s", i, owner->tp_name);
            return -1;
        }
        if (i) {
            b->data[b->len++] = ','; /* put_resource leaves room to spare */
        }
        if (put_resource(b, r, off, o, cache, encode) < 0) {
            return -1;
        }
    }
    if (reserve(b, 1) < 0) {
        return -1;
    }
    b->data[b->len++] = ']';
    return 0;
}

/* The bytes of a buffer, which is freed either way. */
static PyObject *
take_bytes(buffer *b)
{
    PyObject *out = PyBytes_FromStringAndSize(b->data, b->len);
    PyMem_Free(b->data);
    b->data = NULL;
    return out;
}

/* A JSON string as orjson writes it: ASCII escaped here (quote, backslash, the control
 * characters), anything else handed to ``encode``. */
static int
put_text(buffer *b, PyObject *s, PyObject *encode)
{
    if (!PyUnicode_IS_ASCII(s)) {
        PyObject *done = PyObject_CallOneArg(encode, s);
        if (done == NULL) {
            return -1;
        }
        if (!PyBytes_Check(done)) {
            Py_DECREF(done);
            PyErr_SetString(PyExc_TypeError, "encode must return bytes");
            return -1;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(done);
        int failed = reserve(b, n + ROOM) < 0;
        if (!failed) {
            memcpy(b->data + b->len, PyBytes_AS_STRING(done), (size_t)n);
            b->len += n;
        }
        Py_DECREF(done);
        return failed ? -1 : 0;
    }
    static const char hex[] = "0123456789abcdef";
    const unsigned char *c = PyUnicode_1BYTE_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    if (reserve(b, n * 6 + 2 + ROOM) < 0) {
        return -1;
    }
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char ch = c[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *out++ = (char)ch;
            continue;
        }
        *out++ = '\\';
        switch (ch) {
        case '"': *out++ = '"'; break;
        case '\\': *out++ = '\\'; break;
        case '\b': *out++ = 'b'; break;
        case '\t': *out++ = 't'; break;
        case '\n': *out++ = 'n'; break;
        case '\f': *out++ = 'f'; break;
        case '\r': *out++ = 'r'; break;
        default:
            memcpy(out, "u00", 3);
            out[3] = hex[ch >> 4];
            out[4] = hex[ch & 15];
            out += 5;
        }
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

/* Appends format v1's "annotations" array (for trace_json) to bp: the
 * same bytes orjson writes for [{"asyncId": a, "key": k, "value": v}, ...] made from the
 * trace's (async_id, key, value) tuples. Values other than str, int, bool and None (floats,
 * int subclasses) go through ``encode``, so every one is written as orjson would. */
static int
write_annotations(buffer *bp, PyObject *items, PyObject *encode, PyObject *keys)
{
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "annotations must be a list");
        return -1;
    }
    Py_ssize_t count = PyList_GET_SIZE(items);
#define b (*bp)
    if (reserve(&b, ROOM + count * 64) < 0) {
        goto fail;
    }
    b.data[b.len++] = '[';
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *t = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(t, 1))) {
            PyErr_Format(PyExc_TypeError, "annotations[%zd] is not (async_id, key, value)", i);
            goto fail;
        }
        if (reserve(&b, ROOM) < 0) {
            goto fail;
        }
        if (i) {
            b.data[b.len++] = ',';
        }
        long long x;
        PUT(&b, "{\"asyncId\":");
        if (get_ll(PyTuple_GET_ITEM(t, 0), &x) < 0) {
            goto fail;
        }
        put_int(&b, x);
        PUT(&b, ",\"key\":");
        if (put_str(&b, PyTuple_GET_ITEM(t, 1), keys, encode) < 0) {
            goto fail;
        }
        PUT(&b, ",\"value\":");
        PyObject *v = PyTuple_GET_ITEM(t, 2);
        if (v == Py_None) {
            PUT(&b, "null");
        }
        else if (v == Py_True) {
            PUT(&b, "true");
        }
        else if (v == Py_False) {
            PUT(&b, "false");
        }
        else if (PyUnicode_CheckExact(v)) {
            if (put_text(&b, v, encode) < 0) {
                goto fail;
            }
        }
        else {
            int overflow = 0;
            x = PyLong_CheckExact(v) ? PyLong_AsLongLongAndOverflow(v, &overflow) : 0;
            if (PyLong_CheckExact(v) && !overflow && !(x == -1 && PyErr_Occurred())) {
                put_int(&b, x);
            }
            else {
                PyErr_Clear();
                PyObject *done = PyObject_CallOneArg(encode, v);
                if (done == NULL) {
                    goto fail;
                }
                Py_ssize_t n = PyBytes_Check(done) ? PyBytes_GET_SIZE(done) : -1;
                if (n < 0 || reserve(&b, n + ROOM) < 0) {
                    Py_DECREF(done);
                    if (n < 0) {
                        PyErr_SetString(PyExc_TypeError, "encode must return bytes");
                    }
                    goto fail;
                }
                memcpy(b.data + b.len, PyBytes_AS_STRING(done), (size_t)n);
                b.len += n;
                Py_DECREF(done);
            }
        }
        b.data[b.len++] = '}';
    }
    if (reserve(&b, 1) < 0) {
        goto fail;
    }
    b.data[b.len++] = ']';
    return 0;
fail:
    return -1;
#undef b
}

/* Dispatch(var, untraced, traced): a callable that calls ``untraced`` with its arguments
 * when the ContextVar ``var`` is unset or None, and ``traced`` otherwise. The hooks put it in
 * place of a loop's create_future, call_at (call_later on uvloop) and task factory while any
 * traced request runs, and instrumentation in place of library methods: the calls of every
 * other request then cost one context lookup, with no Python frame of ours. In a class it is a
 * method (see dispatch_get); its __dict__ takes functools.wraps' attributes. */
typedef struct {
    PyObject_HEAD
    PyObject *var;
    PyObject *untraced;
    PyObject *traced;
    vectorcallfunc vectorcall;
    PyObject *dict; /* __dict__: functools.wraps' attributes, a coroutine function's mark */
} Dispatch;

static PyObject *
dispatch_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Dispatch *d = (Dispatch *)self;
    PyObject *value = NULL;
    if (PyContextVar_Get(d->var, NULL, &value) < 0) {
        return NULL;
    }
    PyObject *target = (value == NULL || value == Py_None) ? d->untraced : d->traced;
    Py_XDECREF(value);
    return PyObject_Vectorcall(target, args, nargsf, kwnames);
}

static PyObject *
dispatch_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *var, *untraced, *traced;
    if (!PyArg_ParseTuple(args, "OOO:Dispatch", &var, &untraced, &traced)) {
        return NULL;
    }
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Dispatch(var, untraced, traced) takes no keywords");
        return NULL;
    }
    if (!PyContextVar_CheckExact(var) || !PyCallable_Check(untraced) ||
        !PyCallable_Check(traced)) {
        PyErr_SetString(PyExc_TypeError, "Dispatch(var: ContextVar, untraced, traced: callable)");
        return NULL;
    }
    Dispatch *d = (Dispatch *)type->tp_alloc(type, 0);
    if (d == NULL) {
        return NULL;
    }
    d->var = Py_NewRef(var);
    d->untraced = Py_NewRef(untraced);
    d->traced = Py_NewRef(traced);
    d->vectorcall = dispatch_call;
    return (PyObject *)d;
}

static int
dispatch_traverse(Dispatch *d, visitproc visit, void *arg)
{
    Py_VISIT(d->var);
    Py_VISIT(d->untraced);
    Py_VISIT(d->traced);
    Py_VISIT(d->dict);
    return 0;
}

static int
dispatch_clear(Dispatch *d)
{
    Py_CLEAR(d->var);
    Py_CLEAR(d->untraced);
    Py_CLEAR(d->traced);
    Py_CLEAR(d->dict);
    return 0;
}

static void
dispatch_dealloc(Dispatch *d)
{
    PyObject_GC_UnTrack(d);
    dispatch_clear(d);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

/* Put in a class's namespace, it binds like a function: ``loop.create_future`` is a method
 * whose first argument is the loop (and, with Py_TPFLAGS_METHOD_DESCRIPTOR, a method call
 * passes the loop along without making a bound method at all). In an instance's namespace,
 * as ever, it is called as it is. */
static PyObject *
dispatch_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *
dispatch_repr(Dispatch *d)
{
    return PyUnicode_FromFormat("<Dispatch untraced=%R traced=%R>", d->untraced, d->traced);
}

static PyMemberDef dispatch_members[] = {
    {"untraced", T_OBJECT, offsetof(Dispatch, untraced), READONLY, "called outside traces"},
    {"traced", T_OBJECT, offsetof(Dispatch, traced), READONLY, "called inside a trace"},
    {NULL},
};

static PyGetSetDef dispatch_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyTypeObject DispatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.Dispatch",
    .tp_basicsize = sizeof(Dispatch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "Dispatch(var, untraced, traced): calls untraced while var is unset or None.",
    .tp_descr_get = dispatch_get,
    .tp_new = dispatch_new,
    .tp_traverse = (traverseproc)dispatch_traverse,
    .tp_clear = (inquiry)dispatch_clear,
    .tp_dealloc = (destructor)dispatch_dealloc,
    .tp_repr = (reprfunc)dispatch_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Dispatch, vectorcall),
    .tp_members = dispatch_members,
    .tp_getset = dispatch_getset,
    .tp_dictoffset = offsetof(Dispatch, dict),
};

/* TaskCall(task_type): a task factory, ``(loop, coro, **kw) -> task_type(coro, loop=loop,
 * **kw)``, what asyncio does with no factory set: the untraced side of the hooks' factory.
 * Called with the loop alone, ``task_type(loop=loop)``: TaskCall(Future) is asyncio's
 * ``loop.create_future()`` without its Python frame. */
typedef struct {
    PyObject_HEAD
    PyObject *task_type;
    vectorcallfunc vectorcall;
} TaskCall;

static PyObject *s_loop_only; /* ("loop",) */

static PyObject *
taskcall_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *type = ((TaskCall *)self)->task_type;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs == 1 && nkw == 0) { /* (loop) -> type(loop=loop): asyncio's create_future */
        return PyObject_Vectorcall(type, args, 0, s_loop_only);
    }
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "takes (loop, coro, **kwargs) or (loop)");
        return NULL;
    }
    if (nkw == 0) {
        PyObject *stack[2] = {args[1], args[0]};
        return PyObject_Vectorcall(type, stack, 1, s_loop_only);
    }
    if (nkw > 8) {
        PyErr_SetString(PyExc_TypeError, "too many keyword arguments for a task factory");
        return NULL;
    }
    PyObject *stack[10];
    stack[0] = args[1];
    stack[1] = args[0];
    PyObject *names = PyTuple_New(nkw + 1);
    if (names == NULL) {
        return NULL;
    }
    PyTuple_SET_ITEM(names, 0, Py_NewRef(PyTuple_GET_ITEM(s_loop_only, 0)));
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyTuple_SET_ITEM(names, i + 1, Py_NewRef(PyTuple_GET_ITEM(kwnames, i)));
        stack[2 + i] = args[2 + i];
    }
    PyObject *out = PyObject_Vectorcall(type, stack, 1, names);
    Py_DECREF(names);
    return out;
}

static PyObject *
taskcall_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *task_type;
    if (!PyArg_ParseTuple(args, "O:TaskCall", &task_type)) {
        return NULL;
    }
    if (!PyCallable_Check(task_type)) {
        PyErr_SetString(PyExc_TypeError, "TaskCall(task_type: callable)");
        return NULL;
    }
    TaskCall *t = (TaskCall *)type->tp_alloc(type, 0);
    if (t == NULL) {
        return NULL;
    }
    t->task_type = Py_NewRef(task_type);
    t->vectorcall = taskcall_call;
    return (PyObject *)t;
}

static int
taskcall_traverse(TaskCall *t, visitproc visit, void *arg)
{
    Py_VISIT(t->task_type);
    return 0;
}

static int
taskcall_clear(TaskCall *t)
{
    Py_CLEAR(t->task_type);
    return 0;
}

static void
taskcall_dealloc(TaskCall *t)
{
    PyObject_GC_UnTrack(t);
    taskcall_clear(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyTypeObject TaskCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TaskCall",
    .tp_basicsize = sizeof(TaskCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "TaskCall(task_type): the task factory (loop, coro, **kw) -> task_type(coro, "
              "loop=loop, **kw).",
    .tp_new = taskcall_new,
    .tp_traverse = (traverseproc)taskcall_traverse,
    .tp_clear = (inquiry)taskcall_clear,
    .tp_dealloc = (destructor)taskcall_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TaskCall, vectorcall),
};

/* stacks_json(stacks, cache, encode): the "stackTraces" array of format v1, the bytes orjson
 * writes for [{"id": i, "frames": list(frames)}, ...]. Each distinct frames tuple is encoded
 * once per process: ``cache`` maps id(frames) -> (frames, its ``,"frames":[...]}`` bytes), the
 * entry holding the tuple so its id cannot be reused while the entry lives (call sites repeat
 * across requests, and the stack cache hands out one tuple per call site). */
static int
write_stacks(buffer *bp, PyObject *stacks, PyObject *cache, PyObject *encode)
{
    if (!PyList_Check(stacks) || !PyDict_CheckExact(cache)) {
        PyErr_SetString(PyExc_TypeError, "stacks must be a list, cache a dict");
        return -1;
    }
    Py_ssize_t count = PyList_GET_SIZE(stacks);
#define b (*bp)
    if (reserve(&b, 64 + count * 64) < 0) {
        return -1;
    }
    b.data[b.len++] = '[';
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *frames = PyList_GET_ITEM(stacks, i);
        PyObject *key = PyLong_FromVoidPtr(frames);
        if (key == NULL) {
            goto fail;
        }
        PyObject *hit = PyDict_GetItemWithError(cache, key); /* borrowed */
        PyObject *piece = NULL;
        if (hit != NULL && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 2 &&
            PyTuple_GET_ITEM(hit, 0) == frames && PyBytes_CheckExact(PyTuple_GET_ITEM(hit, 1))) {
            piece = Py_NewRef(PyTuple_GET_ITEM(hit, 1));
        }
        else if (hit == NULL && PyErr_Occurred()) {
            Py_DECREF(key);
            goto fail;
        }
        else {
            PyObject *encoded = PyObject_CallOneArg(encode, frames);
            if (encoded == NULL || !PyBytes_Check(encoded)) {
                if (encoded != NULL) {
                    PyErr_SetString(PyExc_TypeError, "encode must return bytes");
                }
                Py_XDECREF(encoded);
                Py_DECREF(key);
                goto fail;
            }
            piece = PyBytes_FromFormat(",\"frames\":%s}", PyBytes_AS_STRING(encoded));
            Py_DECREF(encoded);
            PyObject *entry = piece ? PyTuple_Pack(2, frames, piece) : NULL;
            if (entry == NULL || PyDict_SetItem(cache, key, entry) < 0) {
                Py_XDECREF(entry);
                Py_XDECREF(piece);
                Py_DECREF(key);
                goto fail;
            }
            Py_DECREF(entry);
        }
        Py_DECREF(key);
        Py_ssize_t n = PyBytes_GET_SIZE(piece);
        if (reserve(&b, n + ROOM) < 0) {
            Py_DECREF(piece);
            goto fail;
        }
        if (i) {
            PUT(&b, ",");
        }
        PUT(&b, "{\"id\":");
        put_int(&b, i);
        memcpy(b.data + b.len, PyBytes_AS_STRING(piece), (size_t)n);
        b.len += n;
        Py_DECREF(piece);
    }
    if (reserve(&b, 1) < 0) {
        goto fail;
    }
    b.data[b.len++] = ']';
    return 0;
fail:
    return -1;
#undef b
}

static PyObject *
stacks_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "stacks_json(stacks: list, cache: dict, encode)");
        return NULL;
    }
    buffer b = {NULL, 0, 0};
    if (write_stacks(&b, args[0], args[1], args[2]) < 0) {
        PyMem_Free(b.data);
        return NULL;
    }
    return take_bytes(&b);
}

/* trace_json(head, resources, origin, slots, stacks, frames, annotations, dropped, encode,
 * strings): a whole trace in format v1, the bytes orjson writes for Trace.to_dict(), in one
 * buffer: ``head`` is orjson's object of the fields before "resources" (version ... duration),
 * ``dropped`` orjson's bytes of the dropped counts; stacks None leaves "stackTraces" out. */
static PyObject *
trace_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[7]) ||
        PyBytes_GET_SIZE(args[0]) < 2 || !PyDict_CheckExact(args[9])) {
        PyErr_SetString(PyExc_TypeError,
                        "trace_json(head: bytes, resources, origin, slots, stacks, frames, "
                        "annotations, dropped: bytes, encode, strings: dict)");
        return NULL;
    }
    long long o;
    if (get_ll(args[2], &o) < 0) {
        return NULL;
    }
    PyObject *head = args[0], *dropped = args[7], *encode = args[8], *strings = args[9];
    Py_ssize_t n = PyBytes_GET_SIZE(head);
    if (PyBytes_AS_STRING(head)[n - 1] != '}') {
        PyErr_SetString(PyExc_ValueError, "head must be a JSON object");
        return NULL;
    }
    buffer b = {NULL, 0, 0};
    /* Sized from the last trace too: the traces of one app are alike, and a buffer grown by
     * doubling copies itself over again (the stack table is most of a trace). */
    static Py_ssize_t last_size = 0;
    Py_ssize_t guess = n + PyBytes_GET_SIZE(dropped) + 64 + PyList_GET_SIZE(args[1]) * 256;
    if (guess < last_size + 1024) {
        guess = last_size + 1024;
    }
    if (reserve(&b, guess) < 0) {
        return NULL;
    }
    memcpy(b.data, PyBytes_AS_STRING(head), (size_t)(n - 1));
    b.len = n - 1;
    PUT(&b, ",\"resources\":");
    if (write_resources(&b, args[1], o, args[3], encode, strings) < 0) {
        goto fail;
    }
    if (args[4] != Py_None) {
        if (reserve(&b, 32) < 0) {
            goto fail;
        }
        PUT(&b, ",\"stackTraces\":");
        if (write_stacks(&b, args[4], args[5], encode) < 0) {
            goto fail;
        }
    }
    if (reserve(&b, 32) < 0) {
        goto fail;
    }
    PUT(&b, ",\"annotations\":");
    if (write_annotations(&b, args[6], encode, strings) < 0) {
        goto fail;
    }
    if (reserve(&b, PyBytes_GET_SIZE(dropped) + 32) < 0) {
        goto fail;
    }
    PUT(&b, ",\"dropped\":");
    memcpy(b.data + b.len, PyBytes_AS_STRING(dropped), (size_t)PyBytes_GET_SIZE(dropped));
    b.len += PyBytes_GET_SIZE(dropped);
    b.data[b.len++] = '}';
    last_size = b.len < (1 << 24) ? b.len : (1 << 24);
    return take_bytes(&b);
fail:
    PyMem_Free(b.data);
    return NULL;
}

/* Resource: one record of the trace model (see _recording.Resource, the same in Python). Not
 * garbage-collected: it holds only ints, strings, None and lists of ints, so it can never be
 * part of a reference cycle, and a traced request makes one per resource; as a collected
 * object each one was counted towards the next collection and walked by every collection
 * while its request ran. Its callbacks list is made on first use: most resources (futures,
 * timers, cache calls) never run a callback. */
typedef struct {
    PyObject_HEAD
    PyObject *async_id;
    PyObject *trigger_id;
    PyObject *type;
    PyObject *stack_id;
    PyObject *created_at;
    PyObject *callbacks; /* NULL until first asked for */
    PyObject *settled_at;
    PyObject *state;
    PyObject *annotation_count;
    PyObject *awaited_by;
} ResourceObject;

static PyObject *s_pending, *zero;

static PyObject *
resource_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"async_id", "trigger_id", "type", "stack_id", "created_at", NULL};
    PyObject *a[5];
    if (kwds == NULL && PyTuple_GET_SIZE(args) == 5) {
        for (int i = 0; i < 5; i++) {
            a[i] = PyTuple_GET_ITEM(args, i);
        }
    }
    else if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO:Resource", kwlist, &a[0], &a[1],
                                          &a[2], &a[3], &a[4])) {
        return NULL;
    }
    ResourceObject *self = (ResourceObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->async_id = Py_NewRef(a[0]);
    self->trigger_id = Py_NewRef(a[1]);
    self->type = Py_NewRef(a[2]);
    self->stack_id = Py_NewRef(a[3]);
    self->created_at = Py_NewRef(a[4]);
    self->callbacks = NULL;
    self->settled_at = Py_NewRef(Py_None);
    self->state = Py_NewRef(s_pending);
    self->annotation_count = Py_NewRef(zero);
    self->awaited_by = Py_NewRef(Py_None);
    return (PyObject *)self;
}

static void
resource_dealloc(ResourceObject *self)
{
    Py_XDECREF(self->async_id);
    Py_XDECREF(self->trigger_id);
    Py_XDECREF(self->type);
    Py_XDECREF(self->stack_id);
    Py_XDECREF(self->created_at);
    Py_XDECREF(self->callbacks);
    Py_XDECREF(self->settled_at);
    Py_XDECREF(self->state);
    Py_XDECREF(self->annotation_count);
    Py_XDECREF(self->awaited_by);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
resource_get_callbacks(ResourceObject *self, void *closure)
{
    if (self->callbacks == NULL && (self->callbacks = PyList_New(0)) == NULL) {
        return NULL;
    }
    return Py_NewRef(self->callbacks);
}

static int
resource_set_callbacks(ResourceObject *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a resource's callbacks cannot be deleted");
        return -1;
    }
    Py_XSETREF(self->callbacks, Py_NewRef(value));
    return 0;
}

static PyObject *
resource_intervals(ResourceObject *self, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    PyObject *cb = self->callbacks;
    if (out == NULL || cb == NULL) {
        return out;
    }
    if (!PyList_Check(cb)) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_TypeError, "resource callbacks must be a list");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(cb); i += 2) {
        PyObject *end = i + 1 < PyList_GET_SIZE(cb) ? PyList_GET_ITEM(cb, i + 1) : Py_None;
        PyObject *pair = PyTuple_Pack(2, PyList_GET_ITEM(cb, i), end);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(pair);
    }
    return out;
}

/* Pickling and copying, as for the slotted Python record: the five constructor arguments,
 * then the rest as state. */
static PyObject *
resource_reduce(ResourceObject *self, PyObject *unused)
{
    PyObject *cb = self->callbacks ? self->callbacks : Py_None;
    return Py_BuildValue("O(OOOOO)(OOOOO)", (PyObject *)Py_TYPE(self), self->async_id,
                         self->trigger_id, self->type, self->stack_id, self->created_at, cb,
                         self->settled_at, self->state, self->annotation_count,
                         self->awaited_by);
}

static PyObject *
resource_setstate(ResourceObject *self, PyObject *state)
{
    PyObject *cb, *settled, *st, *count, *awaited;
    if (!PyTuple_Check(state) ||
        !PyArg_ParseTuple(state, "OOOOO", &cb, &settled, &st, &count, &awaited)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "Resource state must be a tuple of 5");
        }
        return NULL;
    }
    Py_XSETREF(self->callbacks, cb == Py_None ? NULL : Py_NewRef(cb));
    Py_XSETREF(self->settled_at, Py_NewRef(settled));
    Py_XSETREF(self->state, Py_NewRef(st));
    Py_XSETREF(self->annotation_count, Py_NewRef(count));
    Py_XSETREF(self->awaited_by, Py_NewRef(awaited));
    Py_RETURN_NONE;
}

static PyObject *
resource_repr(ResourceObject *self)
{
    return PyUnicode_FromFormat("<Resource %R %S <-%R %S>", self->async_id, self->type,
                                self->trigger_id, self->state);
}

#define RMEMBER(name) {#name, T_OBJECT_EX, offsetof(ResourceObject, name), 0, NULL}
static PyMemberDef resource_members[] = {
    RMEMBER(async_id), RMEMBER(trigger_id), RMEMBER(type), RMEMBER(stack_id),
    RMEMBER(created_at), RMEMBER(settled_at), RMEMBER(state), RMEMBER(annotation_count),
    RMEMBER(awaited_by),
    /* the raw field, for the JSON writer (which reads members at their offsets) */
    {"_callbacks", T_OBJECT_EX, offsetof(ResourceObject, callbacks), READONLY, NULL},
    {NULL},
};
#undef RMEMBER

static PyGetSetDef resource_getset[] = {
    {"callbacks", (getter)resource_get_callbacks, (setter)resource_set_callbacks,
     "Flat callback times: start, end, start, end, ... (raw clock).", NULL},
    {NULL},
};

static PyMethodDef resource_methods[] = {
    {"intervals", (PyCFunction)resource_intervals, METH_NOARGS,
     "Callback intervals as (start, end) pairs; end is None for a step still running."},
    {"__reduce__", (PyCFunction)resource_reduce, METH_NOARGS, NULL},
    {"__setstate__", (PyCFunction)resource_setstate, METH_O, NULL},
    {NULL},
};

static PyTypeObject ResourceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.Resource",
    .tp_basicsize = sizeof(ResourceObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Resource(async_id, trigger_id, type, stack_id, created_at): one async resource.",
    .tp_new = resource_new,
    .tp_dealloc = (destructor)resource_dealloc,
    .tp_repr = (reprfunc)resource_repr,
    .tp_members = resource_members,
    .tp_getset = resource_getset,
    .tp_methods = resource_methods,
};

/* in_order(resources): whether the resources' async ids only ever increase (the order they
 * are written in; a trace joined from several or loaded from a file may need sorting). */
static PyObject *
in_order(PyObject *module, PyObject *resources)
{
    if (!PyList_Check(resources)) {
        PyErr_SetString(PyExc_TypeError, "in_order(resources: list)");
        return NULL;
    }
    long long last = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(resources); i++) {
        PyObject *r = PyList_GET_ITEM(resources, i);
        PyObject *id = Py_IS_TYPE(r, &ResourceType) ? ((ResourceObject *)r)->async_id : NULL;
        long long x;
        if (id == NULL || !PyLong_CheckExact(id)) {
            Py_RETURN_NONE; /* not ours to judge: the caller checks in Python */
        }
        if (get_ll(id, &x) < 0) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        if (i && x <= last) {
            Py_RETURN_FALSE;
        }
        last = x;
    }
    Py_RETURN_TRUE;
}

/* TraceCore: the recording half of _model.Trace (its base class when this module is built):
 * add, begin, end, settle, annotate, stack_id and new_resource, the calls every hook makes
 * for every resource of a traced request. _recording._PyTraceCore is the same in Python; the
 * tests run both. Limits are kept as plain integers (set by Trace.__init__); what goes over
 * them is counted on the trace's Dropped object (a rare path: attribute arithmetic). */
typedef struct {
    PyObject_HEAD
    PyObject *resources;   /* list of Resource */
    PyObject *annotations; /* list of (async_id, key, value) */
    PyObject *stacks;      /* list of frame tuples */
    PyObject *stack_ids;   /* dict: stack key -> index in stacks */
    PyObject *dropped;     /* Dropped */
    char closed;
    Py_ssize_t max_resources, max_annotations, max_annotation_length, max_callbacks, max_stacks;
    Py_ssize_t stack_depth;
    long long next_id;
    /* The first IDENTITY_KEYS stack keys that compare by identity (the creation stacks the
     * hooks capture) with their indexes, found by a pointer scan: a request's few stacks
     * then need no dict (made, hashed into, grown) per trace. NULL until the first one; 16
     * entries, then 32 (no bigger than the dict it saves for a trace with few stacks). */
    struct ident_key *ident;
    Py_ssize_t n_ident, ident_size;
    /* Timers whose loop reports no cancel (uvloop's handles take no class of ours): the
     * async_id of the resource that made them -> a list of (Resource, handle); looked at as
     * steps end, see core_check_watched. NULL: none. */
    PyObject *watched;
    /* The resource whose step runs now, and the thread running it (set around each step of a
     * TimedCoroutine or a timer's callback, the outer step's put back after): what the
     * blocked-loop watchdog (_watchdog.py) reads to know which step to sample. NULL: none. */
    PyObject *running;
    unsigned long running_thread;
    /* What the watchdog saw a long step doing: a list of (async_id, when, frames), or NULL. */
    PyObject *samples;
} TraceCore;

/* What the watchdog's thread reads without the GIL (quiet_wait, below): how many traces have a
 * step running now, and a count bumped each time any trace's running step changes. Written
 * with the GIL held, by every thread that runs traced steps; read by the watchdog's thread
 * with the GIL released, so both are atomic (relaxed: only "did it change", "is it zero"). */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32) && \
    !defined(ASYNCTRACE_NO_QUIET_WAIT)
#define HAVE_QUIET_WAIT 1 /* atomics, nanosleep, CLOCK_MONOTONIC; elsewhere the thread polls */
static long steps_running;
static unsigned long step_changes;
#endif

static inline void
running_changed(PyObject *before, PyObject *after)
{
#ifndef HAVE_QUIET_WAIT
    (void)before;
    (void)after;
#else
    if (before == NULL && after != NULL) {
        __atomic_add_fetch(&steps_running, 1, __ATOMIC_RELAXED);
    }
    else if (before != NULL && after == NULL) {
        __atomic_sub_fetch(&steps_running, 1, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&step_changes, __atomic_load_n(&step_changes, __ATOMIC_RELAXED) + 1,
                     __ATOMIC_RELAXED);
#endif
}

/* What a step replaced as the trace's running step, given back when it ends. */
typedef struct {
    PyObject *res;
    unsigned long thread;
} step_mark;

static inline step_mark
step_enter(TraceCore *t, PyObject *res)
{
    step_mark outer = {t->running, t->running_thread};
    running_changed(outer.res, res);
    t->running = Py_NewRef(res);
    t->running_thread = PyThread_get_thread_ident();
    return outer;
}

static inline void
step_leave(TraceCore *t, step_mark outer)
{
    PyObject *mine = t->running;
    running_changed(mine, outer.res);
    t->running = outer.res;
    t->running_thread = outer.thread;
    Py_XDECREF(mine);
}

#define IDENTITY_KEYS 32
struct ident_key {
    PyObject *key;
    PyObject *sid;
};

/* Whether key's equality and hash are object's own, which are its identity. */
static int
identity_key(PyObject *key)
{
    PyTypeObject *tp = Py_TYPE(key);
    return tp->tp_hash == PyBaseObject_Type.tp_hash &&
           tp->tp_richcompare == PyBaseObject_Type.tp_richcompare;
}

static PyObject *perf_counter_ns;    /* time.perf_counter_ns */

/* time.perf_counter_ns() now. On Linux CPython reads that clock as CLOCK_MONOTONIC in whole
 * nanoseconds: read here the same way, the same number without a Python call (a traced
 * /cache request reads the clock 51 times); elsewhere, perf_counter_ns itself. */
static PyObject *
clock_ns(void)
{
#if defined(__linux__) && defined(CLOCK_MONOTONIC)
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
        return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec);
    }
#endif
    return PyObject_CallNoArgs(perf_counter_ns);
}
static PyObject *format_stack;       /* _stacks._format_and_cache_c, set by _stacks */
static PyObject *stack_cache;        /* _stacks._c_cache */
static PyObject *stop_code;          /* _stacks._STOP_CODE */
static PyObject *s_frames, *s_ellipsis;

static int
count_dropped(TraceCore *t, const char *name)
{
    if (t->dropped == NULL) {
        return 0;
    }
    PyObject *v = PyObject_GetAttrString(t->dropped, name);
    if (v == NULL) {
        return -1;
    }
    PyObject *one = PyLong_FromLong(1);
    PyObject *sum = one ? PyNumber_Add(v, one) : NULL;
    Py_DECREF(v);
    Py_XDECREF(one);
    if (sum == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttrString(t->dropped, name, sum);
    Py_DECREF(sum);
    return rc;
}

static int
core_ready(TraceCore *t)
{
    if (t->resources == NULL || t->annotations == NULL || t->stacks == NULL ||
        t->stack_ids == NULL || !PyList_CheckExact(t->resources) ||
        !PyList_CheckExact(t->annotations) || !PyList_CheckExact(t->stacks) ||
        !PyDict_CheckExact(t->stack_ids)) {
        PyErr_SetString(PyExc_TypeError, "trace not initialised: resources, annotations and "
                                         "stacks must be lists, _stack_ids a dict");
        return -1;
    }
    return 0;
}

static ResourceObject *
as_resource(PyObject *res)
{
    if (!Py_IS_TYPE(res, &ResourceType)) {
        PyErr_Format(PyExc_TypeError, "expected a Resource, got %.100s", Py_TYPE(res)->tp_name);
        return NULL;
    }
    return (ResourceObject *)res;
}

/* res reached its final state at now; only the first settle counts. */
static void
settle_resource(ResourceObject *r, PyObject *now, PyObject *state)
{
    if (r->settled_at == Py_None || r->settled_at == NULL) {
        Py_XSETREF(r->settled_at, Py_NewRef(now));
        Py_XSETREF(r->state, Py_NewRef(state));
    }
}

static PyObject *s_cancelled;
static PyObject *report_and_clear(const char *where);

/* Of the watched timers in list w (see TraceCore.watched), those whose handle says it was
 * cancelled are settled "cancelled" now, and those settled are let go. A handle that cannot
 * say is let go, the failure reported. */
static void
check_watched_list(PyObject *w, PyObject *now)
{
    Py_INCREF(w);
    for (Py_ssize_t i = PyList_GET_SIZE(w) - 1; i >= 0; i--) {
        if (i >= PyList_GET_SIZE(w)) { /* a handle's cancelled() shortened it */
            continue;
        }
        PyObject *pair = Py_NewRef(PyList_GET_ITEM(w, i));
        int done = 1;
        if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2 &&
            Py_IS_TYPE(PyTuple_GET_ITEM(pair, 0), &ResourceType)) {
            ResourceObject *r = (ResourceObject *)PyTuple_GET_ITEM(pair, 0);
            if (r->settled_at == Py_None || r->settled_at == NULL) {
                PyObject *c = PyObject_CallMethodNoArgs(PyTuple_GET_ITEM(pair, 1), s_cancelled);
                int yes = c == NULL ? -1 : PyObject_IsTrue(c);
                Py_XDECREF(c);
                if (yes < 0) {
                    report_and_clear("timers");
                }
                else if (yes) {
                    settle_resource(r, now, s_cancelled);
                }
                else {
                    done = 0;
                }
            }
        }
        Py_DECREF(pair);
        if (done && i < PyList_GET_SIZE(w) && PyList_SetSlice(w, i, i + 1, NULL) < 0) {
            report_and_clear("timers");
        }
    }
    Py_DECREF(w);
}

/* A step of res ended at now. The watched timers (see TraceCore.watched) that res made are
 * asked whether they were cancelled (a sleep's, a deadline's: cancelled by the task that made
 * them, in that step); at a step of the root, all of them (one task cancelling what another
 * made, a delete cancelling an entry's expiry, is seen when the request resumes). Never fails. */
static void
core_check_watched(TraceCore *t, ResourceObject *res, PyObject *now)
{
    PyObject *w = t->watched;
    if (w == NULL || !PyDict_CheckExact(w) || PyDict_GET_SIZE(w) == 0) {
        return;
    }
    int root = PyList_Check(t->resources) && PyList_GET_SIZE(t->resources) > 0 &&
               PyList_GET_ITEM(t->resources, 0) == (PyObject *)res;
    if (!root) {
        PyObject *mine = PyDict_GetItemWithError(w, res->async_id); /* borrowed */
        if (mine == NULL) {
            if (PyErr_Occurred()) {
                report_and_clear("timers");
            }
            return;
        }
        if (PyList_CheckExact(mine)) {
            Py_INCREF(mine);
            check_watched_list(mine, now);
            if (PyList_GET_SIZE(mine) == 0 && PyDict_DelItem(w, res->async_id) < 0) {
                report_and_clear("timers");
            }
            Py_DECREF(mine);
        }
        return;
    }
    PyObject *lists = PyDict_Values(w); /* a copy: the dict may change meanwhile */
    if (lists == NULL) {
        report_and_clear("timers");
        return;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lists); i++) {
        PyObject *one = PyList_GET_ITEM(lists, i);
        if (PyList_CheckExact(one)) {
            check_watched_list(one, now);
        }
    }
    Py_DECREF(lists);
}

/* add(type, trigger_id, stack_id, now) -> Resource | None */
static PyObject *
core_add_impl(TraceCore *t, PyObject *type, PyObject *trigger, PyObject *stack, PyObject *now)
{
    if (core_ready(t) < 0) {
        return NULL;
    }
    if (PyList_GET_SIZE(t->resources) >= t->max_resources) {
        if (count_dropped(t, "resources") < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    ResourceObject *r = PyObject_New(ResourceObject, &ResourceType);
    if (r == NULL) {
        return NULL;
    }
    r->async_id = PyLong_FromLongLong(t->next_id);
    if (r->async_id == NULL) {
        r->trigger_id = r->type = r->stack_id = r->created_at = r->callbacks = NULL;
        r->settled_at = r->state = r->annotation_count = r->awaited_by = NULL;
        Py_DECREF(r);
        return NULL;
    }
    t->next_id++;
    r->trigger_id = Py_NewRef(trigger);
    r->type = Py_NewRef(type);
    r->stack_id = Py_NewRef(stack);
    r->created_at = Py_NewRef(now);
    r->callbacks = NULL;
    r->settled_at = Py_NewRef(Py_None);
    r->state = Py_NewRef(s_pending);
    r->annotation_count = Py_NewRef(zero);
    r->awaited_by = Py_NewRef(Py_None);
    if (PyList_Append(t->resources, (PyObject *)r) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

static PyObject *
core_add(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "add(type, trigger_id, stack_id, now)");
        return NULL;
    }
    return core_add_impl(t, args[0], args[1], args[2], args[3]);
}

static PyObject *
core_begin(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "begin(res, now)");
        return NULL;
    }
    ResourceObject *r = as_resource(args[0]);
    if (r == NULL) {
        return NULL;
    }
    if (r->callbacks == NULL && (r->callbacks = PyList_New(0)) == NULL) {
        return NULL;
    }
    if (!PyList_Check(r->callbacks)) {
        PyErr_SetString(PyExc_TypeError, "resource callbacks must be a list");
        return NULL;
    }
    if (PyList_GET_SIZE(r->callbacks) < t->max_callbacks) {
        if (PyList_Append(r->callbacks, args[1]) < 0) {
            return NULL;
        }
    }
    else if (count_dropped(t, "callbacks") < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
core_end(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "end(res, now)");
        return NULL;
    }
    ResourceObject *r = as_resource(args[0]);
    if (r == NULL) {
        return NULL;
    }
    PyObject *cb = r->callbacks;
    if (cb != NULL && PyList_Check(cb) && (PyList_GET_SIZE(cb) & 1)) {
        if (PyList_Append(cb, args[1]) < 0) {
            return NULL;
        }
    }
    core_check_watched(t, r, args[1]);
    Py_RETURN_NONE;
}

static PyObject *
core_settle(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "settle(res, now, state)");
        return NULL;
    }
    ResourceObject *r = as_resource(args[0]);
    if (r == NULL) {
        return NULL;
    }
    settle_resource(r, args[1], args[2]);
    Py_RETURN_NONE;
}

static PyObject *
core_annotate(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "annotate(res, key, value)");
        return NULL;
    }
    ResourceObject *r = as_resource(args[0]);
    if (r == NULL || core_ready(t) < 0) {
        return NULL;
    }
    Py_ssize_t count = r->annotation_count ? PyLong_AsSsize_t(r->annotation_count) : 0;
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count >= t->max_annotations) {
        if (count_dropped(t, "annotations") < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *value = args[2];
    Py_ssize_t limit = t->max_annotation_length;
    if (PyUnicode_Check(value)) {
        if (PyUnicode_GET_LENGTH(value) > limit) {
            PyObject *head = PyUnicode_Substring(value, 0, limit);
            value = head ? PyUnicode_Concat(head, s_ellipsis) : NULL;
            Py_XDECREF(head);
            if (value == NULL || count_dropped(t, "truncated") < 0) {
                Py_XDECREF(value);
                return NULL;
            }
        }
        else {
            Py_INCREF(value);
        }
    }
    else if (value == Py_None || PyLong_Check(value) || PyFloat_Check(value)) {
        Py_INCREF(value); /* bool is an int */
    }
    else {
        PyObject *text = PyObject_Repr(value);
        if (text == NULL) {
            return NULL;
        }
        value = PyUnicode_Substring(text, 0, Py_MIN(limit, PyUnicode_GET_LENGTH(text)));
        Py_DECREF(text);
        if (value == NULL) {
            return NULL;
        }
    }
    PyObject *n = PyLong_FromSsize_t(count + 1);
    PyObject *item = n ? PyTuple_Pack(3, r->async_id, args[1], value) : NULL;
    Py_DECREF(value);
    if (item == NULL || PyList_Append(t->annotations, item) < 0) {
        Py_XDECREF(n);
        Py_XDECREF(item);
        return NULL;
    }
    Py_DECREF(item);
    Py_XSETREF(r->annotation_count, n);
    Py_RETURN_NONE;
}

/* The index of ``key`` in the stack table, adding ``frames`` (or, when NULL, the key's
 * ``frames`` attribute) under it: a new reference, None when the table is full. */
static PyObject *
core_stack_id_impl(TraceCore *t, PyObject *key, PyObject *frames)
{
    /* An identity key is either among t->ident (the first IDENTITY_KEYS of them) or in the
     * dict, never both: the scan always comes first. */
    int by_identity = identity_key(key);
    if (by_identity) {
        for (Py_ssize_t i = 0; i < t->n_ident; i++) {
            if (t->ident[i].key == key) {
                return Py_NewRef(t->ident[i].sid);
            }
        }
        if (t->n_ident == t->ident_size && t->ident_size < IDENTITY_KEYS) {
            Py_ssize_t size = t->ident_size ? IDENTITY_KEYS : IDENTITY_KEYS / 2;
            struct ident_key *grown = PyMem_Realloc(t->ident, size * sizeof(struct ident_key));
            if (grown == NULL) {
                PyErr_NoMemory();
                return NULL;
            }
            t->ident = grown;
            t->ident_size = size;
        }
        by_identity = t->n_ident < IDENTITY_KEYS;
    }
    PyObject *sid = NULL;
    if (!by_identity) {
        sid = PyDict_GetItemWithError(t->stack_ids, key);
        if (sid != NULL) {
            return Py_NewRef(sid);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    if (PyList_GET_SIZE(t->stacks) >= t->max_stacks) {
        if (count_dropped(t, "stacks") < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *owned = NULL;
    if (frames == NULL && (frames = owned = slot_get(key, s_frames)) == NULL) {
        return NULL;
    }
    sid = PyLong_FromSsize_t(PyList_GET_SIZE(t->stacks));
    if (sid == NULL || PyList_Append(t->stacks, frames) < 0 ||
        (!by_identity && PyDict_SetItem(t->stack_ids, key, sid) < 0)) {
        Py_XDECREF(owned);
        Py_XDECREF(sid);
        return NULL;
    }
    if (by_identity) {
        t->ident[t->n_ident].key = Py_NewRef(key);
        t->ident[t->n_ident].sid = Py_NewRef(sid);
        t->n_ident++;
    }
    Py_XDECREF(owned);
    return sid;
}

static PyObject *
core_stack_id(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stack_id(key, frames)");
        return NULL;
    }
    if (core_ready(t) < 0) {
        return NULL;
    }
    return core_stack_id_impl(t, args[0], args[1]);
}

/* new_resource(type, parent, skip): a resource of ``type`` made now by ``parent``, with the
 * creation stack that starts ``skip`` frames out from the calling frame (0: the caller). */
static PyObject *
core_new_resource(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "new_resource(type, parent, skip)");
        return NULL;
    }
    ResourceObject *parent = as_resource(args[1]);
    Py_ssize_t skip = PyLong_AsSsize_t(args[2]);
    if (parent == NULL || (skip == -1 && PyErr_Occurred()) || core_ready(t) < 0) {
        return NULL;
    }
    if (skip < 0) {
        PyErr_SetString(PyExc_ValueError, "skip must be >= 0");
        return NULL;
    }
    PyObject *now = clock_ns();
    if (now == NULL) {
        return NULL;
    }
    PyObject *sid = Py_NewRef(Py_None);
    if (t->stack_depth > 0 && format_stack != NULL && stack_cache != NULL) {
        PyObject *walk[4] = {args[2], NULL, stop_code, stack_cache};
        PyObject *depth = PyLong_FromSsize_t(t->stack_depth);
        walk[1] = depth;
        PyObject *stack = depth ? stack_lookup(NULL, walk, 4) : NULL;
        Py_XDECREF(depth);
        if (stack != NULL && PyTuple_CheckExact(stack)) { /* a miss: (hash, key) to format */
            PyObject *at = PyLong_FromSsize_t(skip + 1);
            PyObject *made = at ? PyObject_CallFunctionObjArgs(format_stack, stack, at, NULL)
                                : NULL;
            Py_XDECREF(at);
            Py_SETREF(stack, made);
        }
        if (stack == NULL) {
            Py_DECREF(now);
            Py_DECREF(sid);
            return NULL;
        }
        Py_SETREF(sid, core_stack_id_impl(t, stack, NULL));
        Py_DECREF(stack);
        if (sid == NULL) {
            Py_DECREF(now);
            return NULL;
        }
    }
    PyObject *res = core_add_impl(t, args[0], parent->async_id, sid, now);
    Py_DECREF(sid);
    Py_DECREF(now);
    return res;
}

static void
core_drop_index(TraceCore *t)
{
    if (t->ident != NULL) {
        struct ident_key *ident = t->ident;
        Py_ssize_t n = t->n_ident;
        t->ident = NULL;
        t->n_ident = t->ident_size = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_DECREF(ident[i].key);
            Py_DECREF(ident[i].sid);
        }
        PyMem_Free(ident);
    }
}

static int
core_traverse(TraceCore *t, visitproc visit, void *arg)
{
    Py_VISIT(t->resources);
    Py_VISIT(t->annotations);
    Py_VISIT(t->stacks);
    Py_VISIT(t->stack_ids);
    Py_VISIT(t->dropped);
    Py_VISIT(t->watched);
    Py_VISIT(t->running);
    Py_VISIT(t->samples);
    for (Py_ssize_t i = 0; i < t->n_ident; i++) {
        Py_VISIT(t->ident[i].key);
    }
    return 0;
}

static int
core_clear(TraceCore *t)
{
    Py_CLEAR(t->resources);
    Py_CLEAR(t->annotations);
    Py_CLEAR(t->stacks);
    Py_CLEAR(t->stack_ids);
    Py_CLEAR(t->dropped);
    Py_CLEAR(t->watched);
    if (t->running != NULL) {
        running_changed(t->running, NULL);
        Py_CLEAR(t->running);
    }
    Py_CLEAR(t->samples);
    core_drop_index(t);
    return 0;
}

static void
core_dealloc(TraceCore *t)
{
    PyObject_GC_UnTrack(t);
    core_clear(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *
core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    TraceCore *t = (TraceCore *)type->tp_alloc(type, 0);
    if (t != NULL) {
        t->next_id = 1;
        t->max_resources = t->max_annotations = t->max_annotation_length = PY_SSIZE_T_MAX;
        t->max_callbacks = t->max_stacks = PY_SSIZE_T_MAX;
    }
    return (PyObject *)t;
}

/* Set by _stacks: how a missed walk is formatted, where walks are cached, where they stop. */
static PyObject *
set_stack_formatter(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyCallable_Check(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_stack_formatter(format, cache: dict, stop_code)");
        return NULL;
    }
    Py_XSETREF(format_stack, Py_NewRef(args[0]));
    Py_XSETREF(stack_cache, Py_NewRef(args[1]));
    Py_XSETREF(stop_code, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* Keeps codes (a tuple of at most max code objects) in slots; 0, or -1 with an exception. */
static int
keep_codes(PyObject *codes, PyObject **slots, int *n, int max)
{
    if (!PyTuple_Check(codes) || PyTuple_GET_SIZE(codes) > max) {
        PyErr_Format(PyExc_TypeError, "set_stack_bounds: a tuple of at most %d code objects", max);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(codes); i++) {
        if (!PyCode_Check(PyTuple_GET_ITEM(codes, i))) {
            PyErr_SetString(PyExc_TypeError, "set_stack_bounds: not a code object");
            return -1;
        }
    }
    for (int i = 0; i < *n; i++) {
        Py_CLEAR(slots[i]);
    }
    *n = (int)PyTuple_GET_SIZE(codes);
    for (int i = 0; i < *n; i++) {
        slots[i] = Py_NewRef(PyTuple_GET_ITEM(codes, i));
    }
    return 0;
}

/* Set by _stacks: the plain functions that drive a coroutine for the tracer (walked past, see
 * frame_kind) and the frames that run a loop (stopped at). */
static PyObject *
set_stack_bounds(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_stack_bounds(drivers, runners)");
        return NULL;
    }
    if (keep_codes(args[0], stack_drivers, &n_stack_drivers, MAX_DRIVERS) < 0 ||
        keep_codes(args[1], loop_runners, &n_loop_runners, MAX_RUNNERS) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"add", (PyCFunction)(void (*)(void))core_add, METH_FASTCALL,
     "add(type, trigger_id, stack_id, now) -> Resource | None (None over the cap)."},
    {"begin", (PyCFunction)(void (*)(void))core_begin, METH_FASTCALL,
     "begin(res, now): a callback of res starts running."},
    {"end", (PyCFunction)(void (*)(void))core_end, METH_FASTCALL,
     "end(res, now): the running callback of res returns."},
    {"settle", (PyCFunction)(void (*)(void))core_settle, METH_FASTCALL,
     "settle(res, now, state): res reached its final state; only the first counts."},
    {"annotate", (PyCFunction)(void (*)(void))core_annotate, METH_FASTCALL,
     "annotate(res, key, value): label res."},
    {"stack_id", (PyCFunction)(void (*)(void))core_stack_id, METH_FASTCALL,
     "stack_id(key, frames) -> int | None: the stack's index in this trace's table."},
    {"new_resource", (PyCFunction)(void (*)(void))core_new_resource, METH_FASTCALL,
     "new_resource(type, parent, skip) -> Resource | None, with its creation stack."},
    {NULL},
};

static PyMemberDef core_members[] = {
    {"resources", T_OBJECT_EX, offsetof(TraceCore, resources), 0, NULL},
    {"annotations", T_OBJECT_EX, offsetof(TraceCore, annotations), 0, NULL},
    {"stacks", T_OBJECT_EX, offsetof(TraceCore, stacks), 0, NULL},
    {"_stack_ids", T_OBJECT_EX, offsetof(TraceCore, stack_ids), 0, NULL},
    {"dropped", T_OBJECT_EX, offsetof(TraceCore, dropped), 0, NULL},
    {"closed", T_BOOL, offsetof(TraceCore, closed), 0, NULL},
    {"_max_resources", T_PYSSIZET, offsetof(TraceCore, max_resources), 0, NULL},
    {"_max_annotations", T_PYSSIZET, offsetof(TraceCore, max_annotations), 0, NULL},
    {"_max_annotation_length", T_PYSSIZET, offsetof(TraceCore, max_annotation_length), 0, NULL},
    {"_max_callbacks", T_PYSSIZET, offsetof(TraceCore, max_callbacks), 0, NULL},
    {"_max_stacks", T_PYSSIZET, offsetof(TraceCore, max_stacks), 0, NULL},
    {"stack_depth", T_PYSSIZET, offsetof(TraceCore, stack_depth), 0, NULL},
    {"_next_id", T_LONGLONG, offsetof(TraceCore, next_id), 0, NULL},
    {"_watched", T_OBJECT, offsetof(TraceCore, watched), 0, NULL},
    {"samples", T_OBJECT, offsetof(TraceCore, samples), 0, NULL},
    {NULL},
};

/* (resource, thread ident) of the step running now, or None: for the watchdog. */
static PyObject *
core_get_running(TraceCore *t, void *unused)
{
    if (t->running == NULL) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(Ok)", t->running, t->running_thread);
}

static int
core_set_running(TraceCore *t, PyObject *value, void *unused)
{
    PyObject *res = NULL;
    unsigned long thread = 0;
    if (value != NULL && value != Py_None &&
        !PyArg_ParseTuple(value, "Ok:_running", &res, &thread)) {
        return -1;
    }
    running_changed(t->running, res);
    Py_XSETREF(t->running, Py_XNewRef(res));
    t->running_thread = thread;
    return 0;
}

#ifdef HAVE_QUIET_WAIT
static long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static unsigned long quiet_pokes;

/* quiet_poke(bump) -> int: with bump true, every quiet_wait under way returns False now (a
 * trace watched meanwhile wants its steps sampled sooner than the wait's after_ns); the count
 * of pokes, which a quiet_wait is given as where it starts from. */
static PyObject *
quiet_poke(PyObject *module, PyObject *bump)
{
    int yes = PyObject_IsTrue(bump);
    if (yes < 0) {
        return NULL;
    }
    if (yes) {
        __atomic_add_fetch(&quiet_pokes, 1, __ATOMIC_RELAXED);
    }
    return PyLong_FromUnsignedLong(__atomic_load_n(&quiet_pokes, __ATOMIC_RELAXED));
}

/* quiet_wait(pause_ns, after_ns, limit_ns, pokes) -> bool: the watchdog's sleep, with the GIL
 * let go throughout. Returns True when a step may be due for a sample: the step running at
 * the call still runs pause_ns later (the caller reckoned it due then), or one that began
 * since has run after_ns with no step starting or ending (counted from when this wait saw the
 * change, so never before the step itself had run that long); then the watchdog takes the GIL
 * to look. Returns False after limit_ns, or once the count of pokes is no longer pokes (read
 * with quiet_poke(False) before the caller said what it waits for). A thread that woke every
 * 20 ms to look with the GIL took it from a busy loop each time (up to the 5 ms switch
 * interval of handing it over, a futile wake-up at each of the loop's polls meanwhile): with
 * traced requests one in a hundred, 1-2 % of the process's CPU. Now it asks for the GIL only
 * when a step is long. */
static PyObject *
quiet_wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long long pause, after, limit;
    unsigned long pokes;
    if (nargs != 4 || (pause = PyLong_AsLongLong(args[0])) == -1 ||
        (after = PyLong_AsLongLong(args[1])) == -1 || (limit = PyLong_AsLongLong(args[2])) == -1 ||
        ((pokes = PyLong_AsUnsignedLong(args[3])) == (unsigned long)-1 && PyErr_Occurred())) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "quiet_wait(pause_ns, after_ns, limit_ns, pokes)");
        }
        return NULL;
    }
    after = after < 1000000 ? 1000000 : after; /* at least 1 ms: never a spin */
    pause = pause < 1000000 ? 1000000 : pause;
    int long_step = 0;
    Py_BEGIN_ALLOW_THREADS
    long long start = monotonic_ns(), since = start, now = start;
    unsigned long seen = __atomic_load_n(&step_changes, __ATOMIC_RELAXED);
    for (;;) {
        /* look four times per after_ns (a long step is seen within 1.25 after_ns of its start),
         * and at least every 5 ms, for a poke */
        long long nap = after / 4 < 5000000 ? after / 4 : 5000000;
        if (now - start < pause && pause - (now - start) < nap) {
            nap = pause - (now - start);
        }
        if (limit - (now - start) < nap) {
            nap = limit - (now - start);
        }
        if (nap > 0) {
            struct timespec ts = {(time_t)(nap / 1000000000LL), (long)(nap % 1000000000LL)};
            nanosleep(&ts, NULL);
        }
        now = monotonic_ns();
        if (__atomic_load_n(&quiet_pokes, __ATOMIC_RELAXED) != pokes) {
            break;
        }
        unsigned long changes = __atomic_load_n(&step_changes, __ATOMIC_RELAXED);
        if (changes != seen || __atomic_load_n(&steps_running, __ATOMIC_RELAXED) <= 0) {
            seen = changes;
            since = now;
        }
        else if (since == start ? now - start >= pause : now - since >= after) {
            /* the step running at the call, now due (pause: the caller's reckoning from its
             * start); or one that began since, after_ns ago or more */
            long_step = 1;
            break;
        }
        if (now - start >= limit) {
            break;
        }
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(long_step);
}
#endif /* HAVE_QUIET_WAIT */

static PyGetSetDef core_getset[] = {
    {"_running", (getter)core_get_running, (setter)core_set_running,
     "(resource, thread ident) of the step running now, or None", NULL},
    {NULL},
};

static PyTypeObject TraceCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TraceCore",
    .tp_basicsize = sizeof(TraceCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The recording methods of a trace (the base of _model.Trace).",
    .tp_new = core_new,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_members = core_members,
    .tp_getset = core_getset,
};

/* trace.new_resource(type, parent, skip) for call = {trace, type, parent, skip}: the hooks
 * call it by name, so a Trace subclass's own method (or a test's) is the one that runs; when
 * the trace's class has not replaced TraceCore's, it is called straight, without the lookup
 * and the bound call. */
static PyObject *core_new_resource_method; /* TraceCore's own, from its type dict */
static PyObject *s_new_resource;

static PyObject *
call_new_resource(PyObject *const *call)
{
    PyTypeObject *type = Py_TYPE(call[0]);
    if (core_new_resource_method != NULL && type->tp_dictoffset == 0 &&
        PyObject_TypeCheck(call[0], &TraceCoreType) &&
        _PyType_Lookup(type, s_new_resource) == core_new_resource_method) {
        return core_new_resource((TraceCore *)call[0], call + 1, 3);
    }
    return PyObject_VectorcallMethod(s_new_resource, (PyObject **)call, 4, NULL);
}

/* TimedCoroutine(coro, trace, res): the C form of _tasks.PyTimedCoroutine, what every step of
 * every traced task runs through. Each send/throw is one callback interval of res (begin and
 * end on res's callbacks list, capped like TraceCore.begin), and the moment the coroutine
 * returns or raises settles res. It implements am_send, so a task (and an ``await`` of it)
 * drives it with no bound method and no StopIteration made per step. Everything else it does
 * not define (cr_frame, cr_await, __qualname__, ...) is the wrapped coroutine's. */
typedef struct {
    PyObject_HEAD
    PyObject *coro;
    TraceCore *trace;
    ResourceObject *res;
} Timed;

static PyObject *traced_future_type;     /* _futures.TracedFuture */
static PyObject *settle_from_exception;  /* _context.settle_from_exception */
static PyObject *report_failure;         /* _failures.report */
static PyObject *s_ok, *s_callbacks, *s_throw, *s_close, *s_asynctrace_res, *s_task;
static PyObject *s_coroutine, *s_qualname, *s_context, *s_annotate;

/* The exception being raised, taken out with its traceback attached (as PyErr_Fetch, then
 * normalized): given back with PyErr_Restore once what runs in between is done. */
static void
fetch_exception(PyObject **type, PyObject **value, PyObject **tb)
{
    PyErr_Fetch(type, value, tb);
    PyErr_NormalizeException(type, value, tb);
    if (*tb != NULL && *value != NULL) {
        PyException_SetTraceback(*value, *tb);
    }
}

static PyObject *
report_and_clear(const char *where)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (report_failure != NULL && value != NULL) {
        PyObject *out = PyObject_CallFunction(report_failure, "sO", where, value);
        Py_XDECREF(out);
    }
    PyErr_Clear();
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return NULL;
}

static PyObject *
now_ns(void)
{
    return clock_ns();
}

/* A step starts: its start time on res's callbacks, or counted as dropped over the cap. */
static int
timed_begin(Timed *self)
{
    ResourceObject *r = self->res;
    if (r->callbacks == NULL && (r->callbacks = PyList_New(0)) == NULL) {
        return -1;
    }
    if (!PyList_Check(r->callbacks)) {
        PyErr_SetString(PyExc_TypeError, "resource callbacks must be a list");
        return -1;
    }
    if (PyList_GET_SIZE(r->callbacks) >= self->trace->max_callbacks) {
        return count_dropped(self->trace, "callbacks");
    }
    PyObject *now = now_ns();
    if (now == NULL) {
        return -1;
    }
    int rc = PyList_Append(r->callbacks, now);
    Py_DECREF(now);
    return rc;
}

/* The step ends: its end time, when its start was recorded. */
static int
timed_end(Timed *self, PyObject *now)
{
    PyObject *cb = self->res->callbacks;
    if (cb == NULL || !PyList_Check(cb) || !(PyList_GET_SIZE(cb) & 1)) {
        return 0;
    }
    PyObject *owned = NULL;
    if (now == NULL && (now = owned = now_ns()) == NULL) {
        return -1;
    }
    int rc = PyList_Append(cb, now);
    core_check_watched(self->trace, self->res, now);
    Py_XDECREF(owned);
    return rc;
}

/* The coroutine yielded a TracedFuture: this task waits for it. */
static int
timed_awaits(Timed *self, PyObject *fut)
{
    if (traced_future_type == NULL || (PyObject *)Py_TYPE(fut) != traced_future_type) {
        return 0;
    }
    PyObject *waited = slot_get(fut, s_asynctrace_res);
    if (waited == NULL) {
        return -1;
    }
    int rc = 0;
    if (Py_IS_TYPE(waited, &ResourceType)) {
        ResourceObject *w = (ResourceObject *)waited;
        PyObject *rid = self->res->async_id;
        if (w->awaited_by == NULL || w->awaited_by == Py_None) {
            PyObject *list = PyList_New(1);
            if (list == NULL) {
                rc = -1;
            }
            else {
                PyList_SET_ITEM(list, 0, Py_NewRef(rid));
                Py_XSETREF(w->awaited_by, list);
            }
        }
        else if (PyList_Check(w->awaited_by)) {
            int has = PySequence_Contains(w->awaited_by, rid);
            rc = has < 0 ? -1 : has ? 0 : PyList_Append(w->awaited_by, rid);
        }
    }
    Py_DECREF(waited);
    return rc;
}

/* The coroutine returned (ok) or raised (the exception set): the step ends, res settles. The
 * exception, if any, is set again for the caller; a failure to record is dropped for it. */
static void
timed_stop(Timed *self, int returned)
{
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (!returned) {
        fetch_exception(&type, &value, &tb);
        returned = type != NULL && PyErr_GivenExceptionMatches(type, PyExc_StopIteration);
    }
    ResourceObject *r = self->res;
    PyObject *now = now_ns();
    if (now != NULL && timed_end(self, now) == 0) {
        if (returned) {
            settle_resource(r, now, s_ok);
        }
        else if (settle_from_exception != NULL && value != NULL) {
            /* cancelled, or error with the exception's type: the Python rule */
            PyObject *out = PyObject_CallFunctionObjArgs(
                settle_from_exception, (PyObject *)self->trace, (PyObject *)r, now, value, NULL);
            Py_XDECREF(out);
        }
    }
    Py_XDECREF(now);
    if (PyErr_Occurred()) {
        report_and_clear("timed-coroutine");
    }
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
    }
}

static PySendResult
timed_am_send(Timed *self, PyObject *arg, PyObject **result)
{
    if (self->trace->closed) {
        return PyIter_Send(self->coro, arg, result);
    }
    if (timed_begin(self) < 0) {
        *result = NULL;
        return PYGEN_ERROR;
    }
    step_mark outer = step_enter(self->trace, (PyObject *)self->res);
    PySendResult status = PyIter_Send(self->coro, arg, result);
    step_leave(self->trace, outer);
    if (status == PYGEN_NEXT) {
        if (timed_end(self, NULL) < 0 || timed_awaits(self, *result) < 0) {
            Py_CLEAR(*result);
            return PYGEN_ERROR;
        }
        return PYGEN_NEXT;
    }
    timed_stop(self, status == PYGEN_RETURN);
    return status;
}

/* A return value as the StopIteration a send() or next() raises. */
static PyObject *
stop_with(PyObject *value)
{
    if (value == Py_None) {
        PyErr_SetNone(PyExc_StopIteration);
    }
    else {
        PyObject *e = PyObject_CallOneArg(PyExc_StopIteration, value);
        if (e != NULL) {
            PyErr_SetObject(PyExc_StopIteration, e);
            Py_DECREF(e);
        }
    }
    Py_DECREF(value);
    return NULL;
}

static PyObject *
timed_send(Timed *self, PyObject *arg)
{
    PyObject *result = NULL;
    PySendResult status = timed_am_send(self, arg, &result);
    if (status == PYGEN_RETURN) {
        return stop_with(result);
    }
    return result; /* NEXT: the value; ERROR: NULL with the exception set */
}

static PyObject *
timed_iternext(Timed *self)
{
    return timed_send(self, Py_None);
}

static PyObject *
timed_throw(Timed *self, PyObject *args)
{
    PyObject *throw = PyObject_GetAttr(self->coro, s_throw);
    if (throw == NULL) {
        return NULL;
    }
    if (self->trace->closed) {
        PyObject *out = PyObject_Call(throw, args, NULL);
        Py_DECREF(throw);
        return out;
    }
    if (timed_begin(self) < 0) {
        Py_DECREF(throw);
        return NULL;
    }
    step_mark outer = step_enter(self->trace, (PyObject *)self->res);
    PyObject *out = PyObject_Call(throw, args, NULL);
    step_leave(self->trace, outer);
    Py_DECREF(throw);
    if (out == NULL) {
        timed_stop(self, 0);
        return NULL;
    }
    if (timed_end(self, NULL) < 0 || timed_awaits(self, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
timed_close(Timed *self, PyObject *unused)
{
    return PyObject_CallMethodNoArgs(self->coro, s_close);
}

static PyObject *
timed_self(PyObject *self)
{
    return Py_NewRef(self);
}

static PyObject *
timed_await_method(PyObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

static PyObject *
timed_getattro(Timed *self, PyObject *name)
{
    PyObject *out = PyObject_GenericGetAttr((PyObject *)self, name);
    if (out == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        out = PyObject_GetAttr(self->coro, name);
    }
    return out;
}

static PyObject *
timed_repr(Timed *self)
{
    return PyObject_Repr(self->coro);
}

static PyObject *
timed_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *coro, *trace, *res;
    if (!PyArg_ParseTuple(args, "OOO:TimedCoroutine", &coro, &trace, &res)) {
        return NULL;
    }
    if (!PyObject_TypeCheck(trace, &TraceCoreType) || !Py_IS_TYPE(res, &ResourceType)) {
        PyErr_SetString(PyExc_TypeError, "TimedCoroutine(coro, trace: TraceCore, res: Resource)");
        return NULL;
    }
    Timed *t = PyObject_GC_New(Timed, type);
    if (t == NULL) {
        return NULL;
    }
    t->coro = Py_NewRef(coro);
    t->trace = (TraceCore *)Py_NewRef(trace);
    t->res = (ResourceObject *)Py_NewRef(res);
    PyObject_GC_Track(t);
    return (PyObject *)t;
}

static int
timed_traverse(Timed *t, visitproc visit, void *arg)
{
    Py_VISIT(t->coro);
    Py_VISIT(t->trace);
    Py_VISIT(t->res);
    return 0;
}

static int
timed_clear(Timed *t)
{
    Py_CLEAR(t->coro);
    Py_CLEAR(t->trace);
    Py_CLEAR(t->res);
    return 0;
}

static void
timed_dealloc(Timed *t)
{
    PyObject_GC_UnTrack(t);
    timed_clear(t);
    PyObject_GC_Del(t);
}

static PyMethodDef timed_methods[] = {
    {"send", (PyCFunction)timed_send, METH_O, "send(value): one step of the coroutine, timed."},
    {"throw", (PyCFunction)timed_throw, METH_VARARGS, "throw(...): as the coroutine's, timed."},
    {"close", (PyCFunction)timed_close, METH_NOARGS, "close(): the coroutine's close()."},
    {"__await__", (PyCFunction)timed_await_method, METH_NOARGS, "Its own iterator."},
    {NULL},
};

static PyAsyncMethods timed_as_async = {
    .am_await = (unaryfunc)timed_self,
    .am_send = (sendfunc)timed_am_send,
};

static PyTypeObject TimedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TimedCoroutine",
    .tp_basicsize = sizeof(Timed),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "TimedCoroutine(coro, trace, res): coro, each step recorded on res.",
    .tp_new = timed_new,
    .tp_traverse = (traverseproc)timed_traverse,
    .tp_clear = (inquiry)timed_clear,
    .tp_dealloc = (destructor)timed_dealloc,
    .tp_repr = (reprfunc)timed_repr,
    .tp_getattro = (getattrofunc)timed_getattro,
    .tp_as_async = &timed_as_async,
    .tp_iter = (getiterfunc)timed_self,
    .tp_iternext = (iternextfunc)timed_iternext,
    .tp_methods = timed_methods,
};

/* TaskFactory(var, make, iscoroutine): the traced side of the hooks' task factory (Dispatch
 * calls it only while var holds a request's (trace, current resource)). A task made then is a
 * "task" resource caused by the current one, annotated with its coroutine's name, its
 * coroutine run through TimedCoroutine, and made with var set to (trace, the task) so the
 * task's copy of the context carries it. Anything else, or any failure here (counted), and
 * ``make`` is called as it would have been. */
typedef struct {
    PyObject_HEAD
    PyObject *var;
    PyObject *make;
    PyObject *iscoroutine;
    vectorcallfunc vectorcall;
} TaskFactory;

/* The task resource and its timed coroutine for ``coro``, or 0 when it is not to be traced;
 * -1 with an exception set on failure. */
static int
factory_prepare(TaskFactory *f, PyObject *active, PyObject *coro, PyObject **state,
                PyObject **timed)
{
    if (!PyTuple_CheckExact(active) || PyTuple_GET_SIZE(active) != 2) {
        return 0;
    }
    PyObject *trace = PyTuple_GET_ITEM(active, 0), *parent = PyTuple_GET_ITEM(active, 1);
    if (!PyObject_TypeCheck(trace, &TraceCoreType) || ((TraceCore *)trace)->closed) {
        return 0;
    }
    if (!PyCoro_CheckExact(coro)) {
        PyObject *is = PyObject_CallOneArg(f->iscoroutine, coro);
        int yes = is == NULL ? -1 : PyObject_IsTrue(is);
        Py_XDECREF(is);
        if (yes <= 0) {
            return yes;
        }
    }
    PyObject *zero_skip = PyLong_FromLong(0);
    if (zero_skip == NULL) {
        return -1;
    }
    /* By name, as the Python factory calls them: a Trace subclass's own methods count. The
     * stack starts at create_task's caller (skip 0: there is no frame of ours). */
    PyObject *args[4] = {trace, s_task, parent, zero_skip};
    PyObject *res = call_new_resource(args);
    Py_DECREF(zero_skip);
    if (res == NULL) {
        return -1;
    }
    if (res == Py_None) {
        Py_DECREF(res);
        return 0;
    }
    if (!Py_IS_TYPE(res, &ResourceType)) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "new_resource returned something not a Resource");
        return -1;
    }
    PyObject *name = PyObject_GetAttr(coro, s_qualname);
    if (name == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            Py_DECREF(res);
            return -1;
        }
        PyErr_Clear();
    }
    else if (PyUnicode_Check(name)) {
        PyObject *note[4] = {trace, res, s_coroutine, name};
        PyObject *out = PyObject_VectorcallMethod(s_annotate, note, 4, NULL);
        if (out == NULL) {
            Py_DECREF(name);
            Py_DECREF(res);
            return -1;
        }
        Py_DECREF(out);
    }
    Py_XDECREF(name);
    *state = PyTuple_Pack(2, trace, res);
    Timed *t = *state ? PyObject_GC_New(Timed, &TimedType) : NULL;
    if (t == NULL) {
        Py_CLEAR(*state);
        Py_DECREF(res);
        return -1;
    }
    t->coro = Py_NewRef(coro);
    t->trace = (TraceCore *)Py_NewRef(trace);
    t->res = (ResourceObject *)res; /* the reference made above */
    PyObject_GC_Track(t);
    *timed = (PyObject *)t;
    return 1;
}

static PyObject *
factory_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TaskFactory *f = (TaskFactory *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *active = NULL;
    if (nargs != 2 || nkw > 8 || PyContextVar_Get(f->var, NULL, &active) < 0) {
        PyErr_Clear();
        Py_XDECREF(active);
        return PyObject_Vectorcall(f->make, args, nargsf, kwnames);
    }
    PyObject *state = NULL, *timed = NULL;
    int traced = active == NULL ? 0 : factory_prepare(f, active, args[1], &state, &timed);
    Py_XDECREF(active);
    if (traced <= 0) {
        if (traced < 0) {
            report_and_clear("task-factory");
        }
        return PyObject_Vectorcall(f->make, args, nargsf, kwnames);
    }
    PyObject *stack[10];
    stack[0] = args[0];
    stack[1] = timed;
    PyObject *context = NULL; /* a context= given: a copy of it carries the task */
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *value = args[2 + i];
        stack[2 + i] = value;
        if (value != Py_None &&
            PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, i), s_context) == 0) {
            context = PyContext_Copy(value);
            PyObject *token = NULL;
            if (context != NULL && PyContext_Enter(context) == 0) {
                token = PyContextVar_Set(f->var, state);
                if (PyContext_Exit(context) < 0) {
                    Py_CLEAR(token);
                }
            }
            if (token == NULL) {
                Py_XDECREF(context);
                Py_DECREF(state);
                Py_DECREF(timed);
                report_and_clear("task-factory");
                return PyObject_Vectorcall(f->make, args, nargsf, kwnames);
            }
            Py_DECREF(token);
            stack[2 + i] = context;
        }
    }
    PyObject *out;
    if (context != NULL) {
        out = PyObject_Vectorcall(f->make, stack, 2, kwnames);
        Py_DECREF(context);
    }
    else {
        /* The task copies the current context when it is made: the copy gets the task as its
         * current resource. (Also how it works on 3.10, whose factories take no context.) */
        PyObject *token = PyContextVar_Set(f->var, state);
        if (token == NULL) {
            Py_DECREF(state);
            Py_DECREF(timed);
            report_and_clear("task-factory");
            return PyObject_Vectorcall(f->make, args, nargsf, kwnames);
        }
        out = PyObject_Vectorcall(f->make, stack, 2, kwnames);
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (PyContextVar_Reset(f->var, token) < 0) {
            PyErr_Clear();
        }
        PyErr_Restore(type, value, tb);
        Py_DECREF(token);
    }
    Py_DECREF(state);
    Py_DECREF(timed);
    return out;
}

static PyObject *
factory_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *var, *make, *iscoroutine;
    if (!PyArg_ParseTuple(args, "OOO:TaskFactory", &var, &make, &iscoroutine)) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(var) || !PyCallable_Check(make) ||
        !PyCallable_Check(iscoroutine)) {
        PyErr_SetString(PyExc_TypeError,
                        "TaskFactory(var: ContextVar, make: callable, iscoroutine: callable)");
        return NULL;
    }
    TaskFactory *f = (TaskFactory *)type->tp_alloc(type, 0);
    if (f == NULL) {
        return NULL;
    }
    f->var = Py_NewRef(var);
    f->make = Py_NewRef(make);
    f->iscoroutine = Py_NewRef(iscoroutine);
    f->vectorcall = factory_call;
    return (PyObject *)f;
}

static int
factory_traverse(TaskFactory *f, visitproc visit, void *arg)
{
    Py_VISIT(f->var);
    Py_VISIT(f->make);
    Py_VISIT(f->iscoroutine);
    return 0;
}

static int
factory_clear(TaskFactory *f)
{
    Py_CLEAR(f->var);
    Py_CLEAR(f->make);
    Py_CLEAR(f->iscoroutine);
    return 0;
}

static void
factory_dealloc(TaskFactory *f)
{
    PyObject_GC_UnTrack(f);
    factory_clear(f);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyTypeObject TaskFactoryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TaskFactory",
    .tp_basicsize = sizeof(TaskFactory),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "TaskFactory(var, make, iscoroutine): the traced side of the hooks' factory.",
    .tp_new = factory_new,
    .tp_traverse = (traverseproc)factory_traverse,
    .tp_clear = (inquiry)factory_clear,
    .tp_dealloc = (destructor)factory_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TaskFactory, vectorcall),
};

/* Set by _futures: the future type whose waiters are recorded, how a raised exception settles
 * a resource, and where failures are counted. */
static PyObject *
set_timed_hooks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyType_Check(args[0]) || !PyCallable_Check(args[1]) ||
        !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "set_timed_hooks(traced_future_type, settle_from_exception, report)");
        return NULL;
    }
    Py_XSETREF(traced_future_type, Py_NewRef(args[0]));
    Py_XSETREF(settle_from_exception, Py_NewRef(args[1]));
    Py_XSETREF(report_failure, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* Timers (instrumentation/timers.py, in C): a traced timer's callback (TimerCallback), and the
 * traced side of the loop's call_at / call_later (TimerPatch), the same as the Python forms
 * there, which run without the accelerator. */
static PyObject *active_var;           /* _context.ACTIVE */
static PyObject *timer_handle_type;    /* asyncio.TimerHandle */
/* Whether CPython has let a handle of timer_handle_type become a traced_handle_type: its
 * checks (the two layouts compatible) hold for every handle of that pair of types, so after
 * the first, the class is swapped as handle.__class__ = ... would, without them. */
static int class_swap_checked;
static PyObject *traced_handle_type;   /* timers._TracedTimerHandle */
static PyObject *unsettled_append;     /* timers._unsettled_append(trace, callback) */
static PyObject *builtin_round;
static PyObject *s_time, *s_timer, *s_kind, *s_delay_ms, *s_late_ms, *s_callback, *s_error;
static PyObject *s_error_state, *s_class, *s_delay, *s_f_locals;
static PyObject *s_sleep, *s_timeout, *s_wait_for, *s_set_result_unless, *s_on_timeout;
static PyObject *s_release_waiter, *thousand, *zero_float, *s_kind_call_later;

typedef struct {
    PyObject_HEAD
    PyObject *callback;
    TraceCore *trace;
    ResourceObject *res;
    PyObject *loop;
    PyObject *when;
    PyObject *handle;
    vectorcallfunc vectorcall;
} TimerCallback;

static PyTypeObject TimerCallbackType;

/* A duration in milliseconds to the microsecond, as timers._ms writes it: for a float,
 * round(max(seconds, 0.0) * 1000 * 1000) / 1000 (round() halves to even, as nearbyint does;
 * round(x, 3) would cost a decimal conversion, a tenth of a traced timer); for an int not
 * below 0, seconds * 1000 (what round(seconds * 1000, 3) gives back, without calling it: a
 * timeout such as wait_for's is often an int); otherwise, or beyond 2**52 microseconds,
 * round(max(seconds, 0.0) * 1000, 3). */
static PyObject *
as_ms(PyObject *seconds)
{
    if (PyLong_CheckExact(seconds)) {
        int overflow = 0;
        long long s = PyLong_AsLongLongAndOverflow(seconds, &overflow);
        if (s == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (!overflow && s >= 0 && s <= LLONG_MAX / 1000) {
            return PyLong_FromLongLong(s * 1000);
        }
    }
    if (PyFloat_CheckExact(seconds)) {
        double s = PyFloat_AS_DOUBLE(seconds);
        double micro = (s < 0.0 ? 0.0 : s) * 1000.0 * 1000.0;
        if (fabs(micro) < 4503599627370496.0) {
            /* + 0.0: -0.0 as 0.0, as round() makes the int 0 of it */
            return PyFloat_FromDouble(nearbyint(micro) / 1000.0 + 0.0);
        }
    }
    int negative = PyObject_RichCompareBool(seconds, zero_float, Py_LT);
    if (negative < 0) {
        return NULL;
    }
    PyObject *ms = PyNumber_Multiply(negative ? zero_float : seconds, thousand);
    if (ms == NULL) {
        return NULL;
    }
    PyObject *out = PyObject_CallFunction(builtin_round, "Oi", ms, 3);
    Py_DECREF(ms);
    return out;
}

static PyObject *
duration_ms(PyObject *module, PyObject *seconds)
{
    return as_ms(seconds);
}

static int
note(TraceCore *t, PyObject *res, PyObject *key, PyObject *value)
{
    if (value == NULL) {
        return -1;
    }
    PyObject *args[3] = {res, key, value};
    PyObject *out = core_annotate(t, args, 3);
    Py_DECREF(value);
    Py_XDECREF(out);
    return out == NULL ? -1 : 0;
}

/* The callback returned (exc NULL) or raised: the run ends, the timer settles. */
static void
timer_done(TimerCallback *cb, PyObject *token, PyObject *exc)
{
    if (token != NULL && PyContextVar_Reset(active_var, token) < 0) {
        report_and_clear("timers");
    }
    PyObject *now = now_ns();
    if (now == NULL) {
        report_and_clear("timers");
        return;
    }
    PyObject *cbs = cb->res->callbacks;
    if (cbs != NULL && PyList_Check(cbs) && (PyList_GET_SIZE(cbs) & 1) &&
        PyList_Append(cbs, now) < 0) {
        report_and_clear("timers");
    }
    settle_resource(cb->res, now, exc == NULL ? s_ok : s_error_state);
    Py_DECREF(now);
    if (exc != NULL) {
        PyObject *name = PyObject_GetAttr((PyObject *)Py_TYPE(exc), s_qualname);
        if (note(cb->trace, (PyObject *)cb->res, s_error, name) < 0) {
            report_and_clear("timers");
        }
    }
}

static PyObject *
timer_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TimerCallback *cb = (TimerCallback *)self;
    if (cb->trace->closed) {
        return PyObject_Vectorcall(cb->callback, args, nargsf, kwnames);
    }
    PyObject *token = NULL;
    { /* the run starts: its time, how late it is, and the timer as the current resource */
        int ok = 0;
        ResourceObject *r = cb->res;
        if (r->callbacks == NULL) {
            r->callbacks = PyList_New(0);
        }
        PyObject *now = r->callbacks != NULL ? now_ns() : NULL;
        if (now != NULL) {
            PyObject *begin_args[2] = {(PyObject *)r, now};
            PyObject *out = core_begin(cb->trace, begin_args, 2);
            Py_DECREF(now);
            PyObject *time = out != NULL ? PyObject_CallMethodNoArgs(cb->loop, s_time) : NULL;
            Py_XDECREF(out);
            PyObject *late = time != NULL ? PyNumber_Subtract(time, cb->when) : NULL;
            Py_XDECREF(time);
            if (late != NULL && note(cb->trace, (PyObject *)r, s_late_ms, as_ms(late)) == 0) {
                PyObject *state = PyTuple_Pack(2, (PyObject *)cb->trace, (PyObject *)r);
                token = state != NULL ? PyContextVar_Set(active_var, state) : NULL;
                Py_XDECREF(state);
                ok = token != NULL;
            }
            Py_XDECREF(late);
        }
        if (!ok) {
            report_and_clear("timers");
        }
    }
    step_mark outer = step_enter(cb->trace, (PyObject *)cb->res);
    PyObject *out = PyObject_Vectorcall(cb->callback, args, nargsf, kwnames);
    step_leave(cb->trace, outer);
    if (out == NULL) {
        PyObject *type, *value, *tb;
        fetch_exception(&type, &value, &tb);
        timer_done(cb, token, value);
        PyErr_Restore(type, value, tb);
    }
    else {
        timer_done(cb, token, NULL);
    }
    Py_XDECREF(token);
    return out;
}

static PyObject *
timer_cancelled(TimerCallback *cb, PyObject *unused)
{
    if (!cb->trace->closed) {
        PyObject *now = now_ns();
        if (now == NULL) {
            return NULL;
        }
        settle_resource(cb->res, now, s_cancelled);
        Py_DECREF(now);
    }
    Py_RETURN_NONE;
}

static PyObject *
timer_new_impl(PyObject *callback, PyObject *trace, PyObject *res, PyObject *loop,
               PyObject *when)
{
    if (!PyObject_TypeCheck(trace, &TraceCoreType) || !Py_IS_TYPE(res, &ResourceType)) {
        PyErr_SetString(PyExc_TypeError, "TimerCallback(callback, trace: TraceCore, res: "
                                         "Resource, loop, when)");
        return NULL;
    }
    TimerCallback *cb = PyObject_GC_New(TimerCallback, &TimerCallbackType);
    if (cb == NULL) {
        return NULL;
    }
    cb->callback = Py_NewRef(callback);
    cb->trace = (TraceCore *)Py_NewRef(trace);
    cb->res = (ResourceObject *)Py_NewRef(res);
    cb->loop = Py_NewRef(loop);
    cb->when = Py_NewRef(when);
    cb->handle = Py_NewRef(Py_None);
    cb->vectorcall = timer_call;
    PyObject_GC_Track(cb);
    return (PyObject *)cb;
}

static PyObject *
timer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *callback, *trace, *res, *loop, *when;
    if (!PyArg_ParseTuple(args, "OOOOO:TimerCallback", &callback, &trace, &res, &loop, &when)) {
        return NULL;
    }
    return timer_new_impl(callback, trace, res, loop, when);
}

static int
timer_traverse(TimerCallback *cb, visitproc visit, void *arg)
{
    Py_VISIT(cb->callback);
    Py_VISIT(cb->trace);
    Py_VISIT(cb->res);
    Py_VISIT(cb->loop);
    Py_VISIT(cb->when);
    Py_VISIT(cb->handle);
    return 0;
}

static int
timer_clear(TimerCallback *cb)
{
    Py_CLEAR(cb->callback);
    Py_CLEAR(cb->trace);
    Py_CLEAR(cb->res);
    Py_CLEAR(cb->loop);
    Py_CLEAR(cb->when);
    Py_CLEAR(cb->handle);
    return 0;
}

static void
timer_dealloc(TimerCallback *cb)
{
    PyObject_GC_UnTrack(cb);
    timer_clear(cb);
    PyObject_GC_Del(cb);
}

static PyObject *
timer_repr(TimerCallback *cb)
{
    return PyObject_Repr(cb->callback);
}

static PyMemberDef timer_members[] = {
    {"callback", T_OBJECT, offsetof(TimerCallback, callback), READONLY, NULL},
    {"trace", T_OBJECT, offsetof(TimerCallback, trace), READONLY, NULL},
    {"res", T_OBJECT, offsetof(TimerCallback, res), READONLY, NULL},
    {"loop", T_OBJECT, offsetof(TimerCallback, loop), READONLY, NULL},
    {"when", T_OBJECT, offsetof(TimerCallback, when), READONLY, NULL},
    {"handle", T_OBJECT, offsetof(TimerCallback, handle), 0, NULL},
    {NULL},
};

static PyMethodDef timer_methods[] = {
    {"cancelled", (PyCFunction)timer_cancelled, METH_NOARGS, "The timer was cancelled."},
    {NULL},
};

static PyTypeObject TimerCallbackType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TimerCallback",
    .tp_basicsize = sizeof(TimerCallback),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "TimerCallback(callback, trace, res, loop, when): a traced timer's callback.",
    .tp_new = timer_new,
    .tp_traverse = (traverseproc)timer_traverse,
    .tp_clear = (inquiry)timer_clear,
    .tp_dealloc = (destructor)timer_dealloc,
    .tp_repr = (reprfunc)timer_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimerCallback, vectorcall),
    .tp_members = timer_members,
    .tp_methods = timer_methods,
};

/* TimerCancel(cancel, python_callback_type): ``cancel`` of a traced timer's handle on
 * asyncio's loops (timers._TracedTimerHandle), as the Python method there does it: a handle not
 * cancelled yet whose callback is a traced timer's settles that timer "cancelled", then
 * ``cancel(handle)`` (asyncio's TimerHandle.cancel) runs and the handle lets go of its context.
 * A method in the class (see dispatch_get), so handle.cancel() runs no Python frame of ours. */
typedef struct {
    PyObject_HEAD
    PyObject *cancel;
    PyObject *python_type; /* timers._TimerCallback: its own cancelled() is called */
    vectorcallfunc vectorcall;
} TimerCancel;

static PyObject *s__callback, *s__cancelled, *s__context;

static void
cancel_record(TimerCancel *c, PyObject *handle)
{
    PyObject *done = slot_get(handle, s__cancelled);
    int was = done == NULL ? -1 : PyObject_IsTrue(done);
    Py_XDECREF(done);
    if (was == 0) {
        PyObject *cb = slot_get(handle, s__callback);
        PyObject *out = NULL;
        if (cb == NULL) {
            was = -1;
        }
        else if (Py_IS_TYPE(cb, &TimerCallbackType)) {
            out = timer_cancelled((TimerCallback *)cb, NULL);
        }
        else if ((PyObject *)Py_TYPE(cb) == c->python_type) {
            out = PyObject_CallMethodNoArgs(cb, s_cancelled);
        }
        else {
            out = Py_NewRef(Py_None); /* not a traced timer's: nothing to record */
        }
        Py_XDECREF(cb);
        if (out == NULL) {
            was = -1;
        }
        Py_XDECREF(out);
    }
    if (was < 0) {
        report_and_clear("timers");
    }
}

static PyObject *
cancel_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TimerCancel *c = (TimerCancel *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs >= 1) {
        cancel_record(c, args[0]);
    }
    PyObject *out = PyObject_Vectorcall(c->cancel, args, nargsf, kwnames);
    if (out != NULL && nargs >= 1 && slot_set(args[0], s__context, Py_None) < 0) {
        Py_CLEAR(out);
    }
    return out;
}

static PyObject *
cancel_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *cancel, *python_type;
    if (!PyArg_ParseTuple(args, "OO:TimerCancel", &cancel, &python_type)) {
        return NULL;
    }
    if (!PyCallable_Check(cancel)) {
        PyErr_SetString(PyExc_TypeError, "TimerCancel(cancel: callable, python_callback_type)");
        return NULL;
    }
    TimerCancel *c = (TimerCancel *)type->tp_alloc(type, 0);
    if (c == NULL) {
        return NULL;
    }
    c->cancel = Py_NewRef(cancel);
    c->python_type = Py_NewRef(python_type);
    c->vectorcall = cancel_call;
    return (PyObject *)c;
}

static int
cancel_traverse(TimerCancel *c, visitproc visit, void *arg)
{
    Py_VISIT(c->cancel);
    Py_VISIT(c->python_type);
    return 0;
}

static int
cancel_clear(TimerCancel *c)
{
    Py_CLEAR(c->cancel);
    Py_CLEAR(c->python_type);
    return 0;
}

static void
cancel_dealloc(TimerCancel *c)
{
    PyObject_GC_UnTrack(c);
    cancel_clear(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyTypeObject TimerCancelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TimerCancel",
    .tp_basicsize = sizeof(TimerCancel),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "TimerCancel(cancel, python_callback_type): a traced timer handle's cancel().",
    .tp_descr_get = dispatch_get,
    .tp_new = cancel_new,
    .tp_traverse = (traverseproc)cancel_traverse,
    .tp_clear = (inquiry)cancel_clear,
    .tp_dealloc = (destructor)cancel_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimerCancel, vectorcall),
};

/* The "delay" asyncio's call_later was given, when the calling frame is that call_later
 * (code): borrowed, or NULL (no exception) when it is not, or not a number. */
static PyObject *
call_later_delay(PyObject *code, Py_ssize_t index)
{
#ifdef INTERNAL_FRAMES
    PyThreadState *tstate = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030D0000
    _PyInterpreterFrame *f = tstate->current_frame;
#define FRAME_CODE(f) ((PyObject *)(f)->f_executable)
#else
    _PyInterpreterFrame *f = tstate->cframe->current_frame;
#define FRAME_CODE(f) ((PyObject *)(f)->f_code)
#endif
    while (f != NULL && _PyFrame_IsIncomplete(f)) {
        f = f->previous;
    }
    if (f == NULL || FRAME_CODE(f) != code || index < 0 ||
        index >= ((PyCodeObject *)code)->co_nlocalsplus) {
        return NULL;
    }
#undef FRAME_CODE
    PyObject *delay = f->localsplus[index];
#else
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed */
    if (frame == NULL) {
        return NULL;
    }
    PyCodeObject *fcode = PyFrame_GetCode(frame);
    Py_DECREF(fcode);
    if ((PyObject *)fcode != code) {
        return NULL;
    }
    PyObject *locals = PyObject_GetAttr((PyObject *)frame, s_f_locals);
    if (locals == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *delay = PyMapping_Check(locals) ? PyObject_GetItem(locals, s_delay) : NULL;
    Py_DECREF(locals);
    if (delay == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(delay); /* the frame's locals keep it */
#endif
    if (delay == NULL || !(PyLong_Check(delay) || PyFloat_Check(delay))) {
        return NULL;
    }
    return delay;
}

/* TimerPatch(original, kind, takes_delay, call_later_code, delay_index): the traced side of
 * the loop's call_at (takes_delay False) or call_later (True), called as original is. */
typedef struct {
    PyObject_HEAD
    PyObject *original;
    PyObject *kind;
    int takes_delay;
    PyObject *call_later_code;
    Py_ssize_t delay_index;
    vectorcallfunc vectorcall;
} TimerPatch;

static PyObject *
timer_kind(PyObject *callback, PyObject *fallback)
{
    PyObject *name = PyObject_GetAttr(callback, s_qualname);
    if (name == NULL) {
        PyErr_Clear();
        return Py_NewRef(fallback);
    }
    PyObject *kind = fallback;
    if (PyUnicode_Check(name)) {
        if (PyUnicode_Compare(name, s_set_result_unless) == 0) {
            kind = s_sleep;
        }
        else if (PyUnicode_Compare(name, s_on_timeout) == 0) {
            kind = s_timeout;
        }
        else if (PyUnicode_Compare(name, s_release_waiter) == 0) {
            kind = s_wait_for; /* wait_for's deadline before Python 3.12 */
        }
    }
    Py_DECREF(name);
    return Py_NewRef(kind);
}

/* What a timer scheduled directly is called: its callback's __qualname__, else its type's. */
static PyObject *
callback_name(PyObject *callback)
{
    PyObject *name = PyObject_GetAttr(callback, s_qualname);
    if (name == NULL) {
        PyErr_Clear();
    }
    else {
        int truthy = PyObject_IsTrue(name);
        if (truthy > 0) {
            return name;
        }
        Py_DECREF(name);
        if (truthy < 0) {
            return NULL;
        }
    }
    return PyObject_GetAttr((PyObject *)Py_TYPE(callback), s_qualname);
}

/* The timer's resource and callback, or 0 when it is not to be traced; -1 on failure. */
static int
patch_prepare(TimerPatch *p, PyObject *const *args, PyObject **wrapper)
{
    PyObject *active = NULL;
    if (active_var == NULL) {
        return 0; /* set_timer_hooks was not called: nothing to record with */
    }
    if (PyContextVar_Get(active_var, NULL, &active) < 0) {
        return -1;
    }
    if (active == NULL) {
        return 0;
    }
    int rc = 0;
    PyObject *loop = args[0], *arg = args[1], *callback = args[2];
    PyObject *when = NULL, *delay = NULL, *kind = p->kind, *res = NULL, *skip = NULL;
    PyObject *trace = PyTuple_CheckExact(active) && PyTuple_GET_SIZE(active) == 2
                          ? PyTuple_GET_ITEM(active, 0)
                          : NULL;
    if (trace == NULL || !PyObject_TypeCheck(trace, &TraceCoreType) ||
        ((TraceCore *)trace)->closed || Py_IS_TYPE(callback, &TimerCallbackType)) {
        goto done;
    }
    long skip_frames = 0; /* the stack starts at whoever called call_at / call_later */
    if (p->takes_delay) {
        delay = Py_NewRef(arg);
        PyObject *now = PyObject_CallMethodNoArgs(loop, s_time);
        when = now != NULL ? PyNumber_Add(now, arg) : NULL;
        Py_XDECREF(now);
    }
    else {
        when = Py_NewRef(arg);
        PyObject *asked = call_later_delay(p->call_later_code, p->delay_index);
        if (asked != NULL) { /* asyncio's call_later, which calls call_at: recorded as one */
            delay = Py_NewRef(asked);
            kind = s_kind_call_later;
            skip_frames = 1;
        }
        else {
            PyObject *now = PyObject_CallMethodNoArgs(loop, s_time);
            delay = now != NULL ? PyNumber_Subtract(arg, now) : NULL;
            Py_XDECREF(now);
        }
    }
    if (when == NULL || delay == NULL) { /* not a number: the loop's own error, untraced */
        PyErr_Clear();
        goto done;
    }
    if ((skip = PyLong_FromLong(skip_frames)) == NULL) {
        rc = -1;
        goto done;
    }
    PyObject *call[4] = {trace, s_timer, PyTuple_GET_ITEM(active, 1), skip};
    res = call_new_resource(call);
    if (res == NULL || res == Py_None) {
        rc = res == NULL ? -1 : 0;
        goto done;
    }
    *wrapper = timer_new_impl(callback, trace, res, loop, when);
    if (*wrapper == NULL) {
        rc = -1;
        goto done;
    }
    PyObject *named = timer_kind(callback, kind);
    TraceCore *t = (TraceCore *)trace;
    int same = named == kind;
    if (note(t, res, s_kind, named) < 0 || note(t, res, s_delay_ms, as_ms(delay)) < 0 ||
        (same && note(t, res, s_callback, callback_name(callback)) < 0)) {
        Py_CLEAR(*wrapper);
        rc = -1;
        goto done;
    }
    rc = 1;
done:
    Py_XDECREF(active);
    Py_XDECREF(when);
    Py_XDECREF(delay);
    Py_XDECREF(res);
    Py_XDECREF(skip);
    return rc;
}

/* handle.__class__ = to, for a handle whose class is timer_handle_type (the caller checks). */
static void
swap_class(PyObject *handle, PyObject *to)
{
    PyTypeObject *from = Py_TYPE(handle);
    PyTypeObject *into = (PyTypeObject *)to;
    int plain = (from->tp_flags & into->tp_flags & Py_TPFLAGS_HEAPTYPE) &&
                from->tp_dictoffset == 0 && into->tp_dictoffset == 0;
#ifdef Py_TPFLAGS_MANAGED_DICT
    plain = plain && !((from->tp_flags | into->tp_flags) & Py_TPFLAGS_MANAGED_DICT);
#endif
    if (!class_swap_checked || !plain) {
        if (PyObject_SetAttr(handle, s_class, to) < 0) {
            report_and_clear("timers");
            return;
        }
        class_swap_checked = 1;
        return;
    }
    Py_INCREF(to);
    Py_SET_TYPE(handle, (PyTypeObject *)to);
    Py_DECREF(from);
}

static PyObject *
patch_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TimerPatch *p = (TimerPatch *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < 3 || nargs + nkw > 64) {
        return PyObject_Vectorcall(p->original, args, nargsf, kwnames);
    }
    PyObject *wrapper = NULL;
    int traced = patch_prepare(p, args, &wrapper);
    if (traced <= 0) {
        if (traced < 0) {
            report_and_clear("timers");
        }
        return PyObject_Vectorcall(p->original, args, nargsf, kwnames);
    }
    PyObject *stack[64];
    for (Py_ssize_t i = 0; i < nargs + nkw; i++) {
        stack[i] = args[i];
    }
    stack[2] = wrapper;
    PyObject *handle = PyObject_Vectorcall(p->original, stack, nargs, kwnames);
    TimerCallback *cb = (TimerCallback *)wrapper;
    if (handle == NULL) { /* refused by the loop (a bad delay, a closed loop): as ever */
        PyObject *type, *value, *tb;
        fetch_exception(&type, &value, &tb);
        timer_done(cb, NULL, value);
        PyErr_Restore(type, value, tb);
        Py_DECREF(wrapper);
        return NULL;
    }
    Py_XSETREF(cb->handle, Py_NewRef(handle));
    if ((PyObject *)Py_TYPE(handle) == timer_handle_type && traced_handle_type != NULL) {
        /* asyncio's loops: the handle records its own cancel */
        swap_class(handle, traced_handle_type);
    }
    else if (unsettled_append != NULL) { /* uvloop's handles: watched, see core_check_watched */
        PyObject *out = PyObject_CallFunctionObjArgs(unsettled_append, (PyObject *)cb->trace,
                                                     wrapper, NULL);
        if (out == NULL) {
            report_and_clear("timers");
        }
        Py_XDECREF(out);
    }
    Py_DECREF(wrapper);
    return handle;
}

static PyObject *
patch_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *original, *kind, *code;
    int takes_delay;
    Py_ssize_t index;
    if (!PyArg_ParseTuple(args, "OUpOn:TimerPatch", &original, &kind, &takes_delay, &code,
                          &index)) {
        return NULL;
    }
    if (!PyCallable_Check(original) || !PyCode_Check(code)) {
        PyErr_SetString(PyExc_TypeError, "TimerPatch(original, kind, takes_delay, "
                                         "call_later_code: code, delay_index)");
        return NULL;
    }
    TimerPatch *p = (TimerPatch *)type->tp_alloc(type, 0);
    if (p == NULL) {
        return NULL;
    }
    p->original = Py_NewRef(original);
    p->kind = Py_NewRef(kind);
    p->takes_delay = takes_delay;
    p->call_later_code = Py_NewRef(code);
    p->delay_index = index;
    p->vectorcall = patch_call;
    return (PyObject *)p;
}

static int
patch_traverse(TimerPatch *p, visitproc visit, void *arg)
{
    Py_VISIT(p->original);
    Py_VISIT(p->kind);
    Py_VISIT(p->call_later_code);
    return 0;
}

static int
patch_clear(TimerPatch *p)
{
    Py_CLEAR(p->original);
    Py_CLEAR(p->kind);
    Py_CLEAR(p->call_later_code);
    return 0;
}

static void
patch_dealloc(TimerPatch *p)
{
    PyObject_GC_UnTrack(p);
    patch_clear(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyTypeObject TimerPatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TimerPatch",
    .tp_basicsize = sizeof(TimerPatch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "TimerPatch(original, kind, takes_delay, call_later_code, delay_index).",
    .tp_new = patch_new,
    .tp_traverse = (traverseproc)patch_traverse,
    .tp_clear = (inquiry)patch_clear,
    .tp_dealloc = (destructor)patch_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimerPatch, vectorcall),
};

/* Set by the timers instrumentation: the context variable, asyncio's TimerHandle and what a
 * traced one becomes, and how a timer whose cancel the loop does not report is listed. */
static PyObject *
set_timer_hooks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyContextVar_CheckExact(args[0]) || !PyType_Check(args[1]) ||
        !PyType_Check(args[2]) || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "set_timer_hooks(var, timer_handle_type, "
                                         "traced_handle_type, unsettled_append)");
        return NULL;
    }
    Py_XSETREF(active_var, Py_NewRef(args[0]));
    class_swap_checked = 0; /* another pair of types: CPython checks it again */
    Py_XSETREF(timer_handle_type, Py_NewRef(args[1]));
    Py_XSETREF(traced_handle_type, Py_NewRef(args[2]));
    Py_XSETREF(unsettled_append, Py_NewRef(args[3]));
    Py_RETURN_NONE;
}

/* ScopedCall(var, type, awaitable, notes, done): ``await awaitable`` recorded as a resource of
 * ``type`` caused by the current one, the way instrumentation records a library's async call
 * (_context.record_call; its Python form there runs without the accelerator). On its first
 * step the resource is made (its stack from the awaiting frame), annotated with ``notes`` and
 * made the current resource; the steps pass straight through; when the awaitable returns,
 * ``done(result)`` may give more annotations, and the resource settles ok, or, when it raises,
 * cancelled / error. No coroutine frame of ours sits in the await chain. */
typedef struct {
    PyObject_HEAD
    PyObject *var;
    PyObject *type;
    PyObject *awaitable; /* until the first step, then NULL */
    PyObject *inner;     /* the iterator driven: the coroutine, or awaitable.__await__() */
    PyObject *notes;     /* dict */
    PyObject *done;      /* callable or None */
    PyObject *trace;     /* set while recording */
    PyObject *res;
    PyObject *token;
    char started, finished;
} ScopedCall;

static PyObject *s_await;
static PyObject *s_hit;
static PyObject *found_function; /* this module's found(), which ScopedCall answers itself */

/* found(result) -> {"hit": result is not None}: what a read adds when it returns. */
static PyObject *
found(PyObject *module, PyObject *result)
{
    PyObject *notes = PyDict_New();
    if (notes != NULL &&
        PyDict_SetItem(notes, s_hit, result == Py_None ? Py_False : Py_True) < 0) {
        Py_CLEAR(notes);
    }
    return notes;
}

/* The first step: the resource, its notes, and it as the current resource. */
static void
scoped_start(ScopedCall *s)
{
    s->started = 1;
    PyObject *active = NULL;
    if (PyContextVar_Get(s->var, NULL, &active) < 0) {
        report_and_clear("start_resource");
        return;
    }
    if (active == NULL || !PyTuple_CheckExact(active) || PyTuple_GET_SIZE(active) != 2 ||
        !PyObject_TypeCheck(PyTuple_GET_ITEM(active, 0), &TraceCoreType) ||
        ((TraceCore *)PyTuple_GET_ITEM(active, 0))->closed) {
        Py_XDECREF(active);
        return;
    }
    PyObject *trace = PyTuple_GET_ITEM(active, 0);
    PyObject *skip = PyLong_FromLong(0); /* the stack from the awaiting frame */
    PyObject *call[4] = {trace, s->type, PyTuple_GET_ITEM(active, 1), skip};
    PyObject *res = skip ? call_new_resource(call) : NULL;
    Py_XDECREF(skip);
    if (res == NULL || res == Py_None || !Py_IS_TYPE(res, &ResourceType)) {
        Py_XDECREF(res);
        Py_DECREF(active);
        if (PyErr_Occurred()) {
            report_and_clear("start_resource");
        }
        return;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(s->notes, &pos, &key, &value)) {
        PyObject *args[3] = {res, key, value};
        PyObject *out = core_annotate((TraceCore *)trace, args, 3);
        if (out == NULL) {
            report_and_clear("start_resource");
            break;
        }
        Py_DECREF(out);
    }
    PyObject *state = PyTuple_Pack(2, trace, res);
    PyObject *token = state ? PyContextVar_Set(s->var, state) : NULL;
    Py_XDECREF(state);
    if (token == NULL) {
        report_and_clear("start_resource");
    }
    s->trace = Py_NewRef(trace);
    s->res = res;
    s->token = token;
    Py_DECREF(active);
}

/* The awaitable returned (result) or raised (the exception set, and set again after). */
static void
scoped_finish(ScopedCall *s, PyObject *result)
{
    s->finished = 1;
    if (s->res == NULL) {
        return;
    }
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (result == NULL) {
        fetch_exception(&type, &value, &tb);
    }
    if (s->token != NULL) {
        if (PyContextVar_Reset(s->var, s->token) < 0) {
            report_and_clear("start_resource");
        }
        Py_CLEAR(s->token);
    }
    TraceCore *t = (TraceCore *)s->trace;
    ResourceObject *r = (ResourceObject *)s->res;
    if (result != NULL && s->done == found_function) { /* a read: did it find its key? */
        PyObject *args[3] = {s->res, s_hit, result == Py_None ? Py_False : Py_True};
        PyObject *out = core_annotate(t, args, 3);
        Py_XDECREF(out);
        if (out == NULL) {
            report_and_clear("start_resource");
        }
    }
    else if (result != NULL && s->done != Py_None) { /* more annotations from the result */
        PyObject *extra = PyObject_CallOneArg(s->done, result);
        if (extra != NULL && PyDict_Check(extra)) {
            PyObject *key, *val;
            Py_ssize_t pos = 0;
            while (PyDict_Next(extra, &pos, &key, &val)) {
                PyObject *args[3] = {s->res, key, val};
                PyObject *out = core_annotate(t, args, 3);
                if (out == NULL) {
                    break;
                }
                Py_DECREF(out);
            }
        }
        Py_XDECREF(extra);
        if (PyErr_Occurred()) {
            report_and_clear("start_resource");
        }
    }
    PyObject *now = now_ns();
    if (now == NULL) {
        report_and_clear("start_resource");
    }
    else if (result != NULL) {
        settle_resource(r, now, s_ok);
    }
    else if (settle_from_exception != NULL && value != NULL) {
        PyObject *out = PyObject_CallFunctionObjArgs(settle_from_exception, s->trace, s->res,
                                                     now, value, NULL);
        Py_XDECREF(out);
        if (out == NULL) {
            report_and_clear("start_resource");
        }
    }
    Py_XDECREF(now);
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
    }
}

/* The iterator to drive, made on the first step: ``await`` does the same. */
static int
scoped_inner(ScopedCall *s)
{
    if (s->inner != NULL) {
        return 0;
    }
    PyObject *awaitable = s->awaitable;
    if (awaitable == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return -1;
    }
    if (PyCoro_CheckExact(awaitable)) {
        s->inner = Py_NewRef(awaitable);
    }
    else {
        unaryfunc getter = Py_TYPE(awaitable)->tp_as_async != NULL
                               ? Py_TYPE(awaitable)->tp_as_async->am_await
                               : NULL;
        s->inner = getter != NULL ? getter(awaitable)
                                  : PyObject_CallMethodNoArgs(awaitable, s_await);
        if (s->inner == NULL) {
            return -1;
        }
    }
    Py_CLEAR(s->awaitable);
    return 0;
}

static PySendResult
scoped_am_send(ScopedCall *s, PyObject *arg, PyObject **result)
{
    if (s->finished) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *result = NULL;
        return PYGEN_ERROR;
    }
    if (!s->started) {
        if (scoped_inner(s) < 0) {
            s->finished = 1;
            *result = NULL;
            return PYGEN_ERROR;
        }
        scoped_start(s);
    }
    PySendResult status = PyIter_Send(s->inner, arg, result);
    if (status == PYGEN_NEXT) {
        return status;
    }
    scoped_finish(s, status == PYGEN_RETURN ? *result : NULL);
    return status;
}

static PyObject *
scoped_send(ScopedCall *s, PyObject *arg)
{
    PyObject *result = NULL;
    PySendResult status = scoped_am_send(s, arg, &result);
    if (status == PYGEN_RETURN) {
        return stop_with(result);
    }
    return result;
}

static PyObject *
scoped_iternext(ScopedCall *s)
{
    return scoped_send(s, Py_None);
}

static PyObject *
scoped_throw(ScopedCall *s, PyObject *args)
{
    if (s->finished || !s->started) { /* as a coroutine not running: raised here */
        if (!s->started && scoped_inner(s) == 0) {
            s->started = 1;
        }
        s->finished = 1;
        PyObject *throw = s->inner != NULL ? PyObject_GetAttr(s->inner, s_throw) : NULL;
        if (throw == NULL) { /* raised here, as by a coroutine that never ran */
            PyObject *exc = PyTuple_GET_SIZE(args) > 0 ? PyTuple_GET_ITEM(args, 0) : NULL;
            if (exc != NULL && PyExceptionInstance_Check(exc)) {
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            }
            else if (exc != NULL && PyExceptionClass_Check(exc)) {
                PyErr_SetNone(exc);
            }
            else if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "throw() needs an exception");
            }
            return NULL;
        }
        PyObject *out = PyObject_Call(throw, args, NULL);
        Py_DECREF(throw);
        return out;
    }
    PyObject *throw = PyObject_GetAttr(s->inner, s_throw);
    PyObject *out = throw != NULL ? PyObject_Call(throw, args, NULL) : NULL;
    Py_XDECREF(throw);
    if (out != NULL) {
        return out; /* the awaitable handled it and goes on */
    }
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) { /* it returned */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyObject *result = value != NULL ? PyObject_GetAttrString(value, "value") : NULL;
        if (result != NULL) {
            scoped_finish(s, result);
            Py_DECREF(result);
        }
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    scoped_finish(s, NULL);
    return NULL;
}

static PyObject *
scoped_close(ScopedCall *s, PyObject *unused)
{
    if (!s->started || s->finished) {
        s->finished = 1;
        if (s->awaitable != NULL && PyCoro_CheckExact(s->awaitable)) {
            return PyObject_CallMethodNoArgs(s->awaitable, s_close);
        }
        Py_RETURN_NONE;
    }
    PyObject *args = PyTuple_Pack(1, PyExc_GeneratorExit);
    PyObject *out = args != NULL ? scoped_throw(s, args) : NULL;
    Py_XDECREF(args);
    if (out != NULL) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "coroutine ignored GeneratorExit");
        return NULL;
    }
    if (PyErr_ExceptionMatches(PyExc_GeneratorExit) ||
        PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return NULL;
}

static PyObject *
scoped_getattro(ScopedCall *s, PyObject *name)
{
    PyObject *out = PyObject_GenericGetAttr((PyObject *)s, name);
    if (out == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyObject *target = s->inner != NULL ? s->inner : s->awaitable;
        if (target != NULL) {
            PyErr_Clear();
            out = PyObject_GetAttr(target, name);
        }
    }
    return out;
}

static PyObject *
scoped_repr(ScopedCall *s)
{
    PyObject *target = s->inner != NULL ? s->inner : s->awaitable;
    if (target == NULL) {
        return PyUnicode_FromFormat("<ScopedCall %U>", s->type);
    }
    return PyObject_Repr(target);
}

static PyObject *
scoped_make(PyTypeObject *type, PyObject *var, PyObject *rtype, PyObject *awaitable,
            PyObject *notes, PyObject *done)
{
    if (!PyContextVar_CheckExact(var) || !PyUnicode_Check(rtype) || !PyDict_Check(notes) ||
        (done != Py_None && !PyCallable_Check(done))) {
        PyErr_SetString(PyExc_TypeError,
                        "ScopedCall(var: ContextVar, type: str, awaitable, notes: dict, done)");
        return NULL;
    }
    ScopedCall *s = PyObject_GC_New(ScopedCall, type);
    if (s == NULL) {
        return NULL;
    }
    s->var = Py_NewRef(var);
    s->type = Py_NewRef(rtype);
    s->awaitable = Py_NewRef(awaitable);
    s->inner = NULL;
    s->notes = Py_NewRef(notes);
    s->done = Py_NewRef(done);
    s->trace = s->res = s->token = NULL;
    s->started = s->finished = 0;
    PyObject_GC_Track(s);
    return (PyObject *)s;
}

static PyObject *
scoped_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *var, *rtype, *awaitable, *notes, *done;
    if (!PyArg_ParseTuple(args, "OUOO!O:ScopedCall", &var, &rtype, &awaitable, &PyDict_Type,
                          &notes, &done)) {
        return NULL;
    }
    return scoped_make(type, var, rtype, awaitable, notes, done);
}

/* ScopedCall(...) as instrumentation calls it, once per recorded call: no argument tuple. */
static PyObject *
scoped_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 5 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError,
                        "ScopedCall(var, type, awaitable, notes, done) takes 5 positional "
                        "arguments");
        return NULL;
    }
    return scoped_make((PyTypeObject *)type, args[0], args[1], args[2], args[3], args[4]);
}

static int
scoped_traverse(ScopedCall *s, visitproc visit, void *arg)
{
    Py_VISIT(s->var);
    Py_VISIT(s->type);
    Py_VISIT(s->awaitable);
    Py_VISIT(s->inner);
    Py_VISIT(s->notes);
    Py_VISIT(s->done);
    Py_VISIT(s->trace);
    Py_VISIT(s->res);
    Py_VISIT(s->token);
    return 0;
}

static int
scoped_clear(ScopedCall *s)
{
    Py_CLEAR(s->var);
    Py_CLEAR(s->type);
    Py_CLEAR(s->awaitable);
    Py_CLEAR(s->inner);
    Py_CLEAR(s->notes);
    Py_CLEAR(s->done);
    Py_CLEAR(s->trace);
    Py_CLEAR(s->res);
    Py_CLEAR(s->token);
    return 0;
}

static void
scoped_dealloc(ScopedCall *s)
{
    PyObject_GC_UnTrack(s);
    scoped_clear(s);
    PyObject_GC_Del(s);
}

static PyMethodDef scoped_methods[] = {
    {"send", (PyCFunction)scoped_send, METH_O, "send(value): one step of the awaitable."},
    {"throw", (PyCFunction)scoped_throw, METH_VARARGS, "throw(...): into the awaitable."},
    {"close", (PyCFunction)scoped_close, METH_NOARGS, "close(): as a coroutine's."},
    {"__await__", (PyCFunction)timed_await_method, METH_NOARGS, "Its own iterator."},
    {NULL},
};

static PyAsyncMethods scoped_as_async = {
    .am_await = (unaryfunc)timed_self,
    .am_send = (sendfunc)scoped_am_send,
};

static PyTypeObject ScopedCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.ScopedCall",
    .tp_basicsize = sizeof(ScopedCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "ScopedCall(var, type, awaitable, notes, done): an awaited call, recorded.",
    .tp_new = scoped_new,
    .tp_vectorcall = scoped_vectorcall,
    .tp_traverse = (traverseproc)scoped_traverse,
    .tp_clear = (inquiry)scoped_clear,
    .tp_dealloc = (destructor)scoped_dealloc,
    .tp_repr = (reprfunc)scoped_repr,
    .tp_getattro = (getattrofunc)scoped_getattro,
    .tp_as_async = &scoped_as_async,
    .tp_iter = (getiterfunc)timed_self,
    .tp_iternext = (iternextfunc)scoped_iternext,
    .tp_methods = scoped_methods,
};

/* KeyedCall(var, type, op, original, fallback, backends, done, where, ttl_at): in place of a
 * library's ``method(self, key, ...)`` while a request is traced (the traced side of a
 * Dispatch). When the key is given by position and ``backends`` names the class of ``self``,
 * the call is ``original(self, key, ...)`` recorded as ScopedCall(var, type, call, {"backend",
 * "op", "key": str(key)}, done) with no Python frame, and with "ttl" when ``ttl_at`` >= 0 and
 * a number is given as ``ttl=`` or at that position (self is 0); any other call goes to
 * ``fallback``, the instrumentation's Python form, which makes the same record (and names new
 * classes). A failure of ours is counted under ``where``, as the Python form counts it, and
 * the call is returned unrecorded. */
typedef struct {
    PyObject_HEAD
    PyObject *var, *type, *op, *original, *fallback, *backends, *done, *where;
    Py_ssize_t ttl_at;
    vectorcallfunc vectorcall;
} KeyedCall;

static void
keyed_report(KeyedCall *k)
{
    const char *where = PyUnicode_AsUTF8(k->where);
    if (where == NULL) { /* cannot be: where is a str checked when made */
        PyErr_Clear();
        where = "instrumentation";
    }
    report_and_clear(where);
}

static PyObject *s_backend, *s_op, *s_key, *s_ttl;

static PyObject *
keyed_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    KeyedCall *k = (KeyedCall *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *backend = NULL;
    if (nargs >= 2 && args[1] != Py_None) {
        backend = PyDict_GetItemWithError(k->backends, (PyObject *)Py_TYPE(args[0]));
        if (backend == NULL && PyErr_Occurred()) {
            keyed_report(k);
        }
    }
    if (backend == NULL) {
        return PyObject_Vectorcall(k->fallback, args, nargsf, kwnames);
    }
    Py_INCREF(backend); /* borrowed from a dict the library's code could change */
    PyObject *call = PyObject_Vectorcall(k->original, args, nargsf, kwnames);
    if (call == NULL) { /* the library's own error, raised as untraced */
        Py_DECREF(backend);
        return NULL;
    }
    PyObject *key = PyObject_Str(args[1]);
    PyObject *notes = key != NULL ? PyDict_New() : NULL;
    if (notes == NULL || PyDict_SetItem(notes, s_backend, backend) < 0 ||
        PyDict_SetItem(notes, s_op, k->op) < 0 || PyDict_SetItem(notes, s_key, key) < 0) {
        Py_DECREF(backend);
        Py_XDECREF(key);
        Py_XDECREF(notes);
        keyed_report(k);
        return call; /* unrecorded, as the Python form returns it when its notes fail */
    }
    Py_DECREF(backend);
    Py_DECREF(key);
    if (k->ttl_at >= 0) { /* a write's ttl: by keyword, else at its position */
        PyObject *ttl = nargs > k->ttl_at ? args[k->ttl_at] : NULL;
        Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            if (PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, i), s_ttl) == 0) {
                ttl = args[nargs + i];
            }
        }
        if (ttl != NULL && ((PyLong_Check(ttl) && !PyBool_Check(ttl)) || PyFloat_Check(ttl)) &&
            PyDict_SetItem(notes, s_ttl, ttl) < 0) {
            Py_DECREF(notes);
            keyed_report(k);
            return call;
        }
    }
    PyObject *out = scoped_make(&ScopedCallType, k->var, k->type, call, notes, k->done);
    Py_DECREF(notes);
    if (out == NULL) {
        keyed_report(k);
        return call;
    }
    Py_DECREF(call);
    return out;
}

static PyObject *
keyed_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *var, *rtype, *op, *original, *fallback, *backends, *done, *where;
    Py_ssize_t ttl_at;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "KeyedCall() takes no keywords");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!UUOOO!OUn:KeyedCall", &PyContextVar_Type, &var, &rtype, &op,
                          &original, &fallback, &PyDict_Type, &backends, &done, &where,
                          &ttl_at)) {
        return NULL;
    }
    if (!PyCallable_Check(original) || !PyCallable_Check(fallback) ||
        (done != Py_None && !PyCallable_Check(done))) {
        PyErr_SetString(PyExc_TypeError,
                        "KeyedCall(var, type, op, original: callable, fallback: callable, "
                        "backends: dict, done: callable or None, where: str, ttl_at: int)");
        return NULL;
    }
    KeyedCall *k = (KeyedCall *)type->tp_alloc(type, 0);
    if (k == NULL) {
        return NULL;
    }
    k->var = Py_NewRef(var);
    k->type = Py_NewRef(rtype);
    k->op = Py_NewRef(op);
    k->original = Py_NewRef(original);
    k->fallback = Py_NewRef(fallback);
    k->backends = Py_NewRef(backends);
    k->done = Py_NewRef(done);
    k->where = Py_NewRef(where);
    k->ttl_at = ttl_at < 0 ? -1 : ttl_at;
    k->vectorcall = keyed_call;
    return (PyObject *)k;
}

static int
keyed_traverse(KeyedCall *k, visitproc visit, void *arg)
{
    Py_VISIT(k->var);
    Py_VISIT(k->type);
    Py_VISIT(k->op);
    Py_VISIT(k->original);
    Py_VISIT(k->fallback);
    Py_VISIT(k->backends);
    Py_VISIT(k->done);
    Py_VISIT(k->where);
    return 0;
}

static int
keyed_clear(KeyedCall *k)
{
    Py_CLEAR(k->var);
    Py_CLEAR(k->type);
    Py_CLEAR(k->op);
    Py_CLEAR(k->original);
    Py_CLEAR(k->fallback);
    Py_CLEAR(k->backends);
    Py_CLEAR(k->done);
    Py_CLEAR(k->where);
    return 0;
}

static void
keyed_dealloc(KeyedCall *k)
{
    PyObject_GC_UnTrack(k);
    keyed_clear(k);
    Py_TYPE(k)->tp_free((PyObject *)k);
}

static PyTypeObject KeyedCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.KeyedCall",
    .tp_basicsize = sizeof(KeyedCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "KeyedCall(var, type, op, original, fallback, backends, done, where, ttl_at): a "
              "keyed library call, recorded without a Python frame.",
    .tp_new = keyed_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(KeyedCall, vectorcall),
    .tp_traverse = (traverseproc)keyed_traverse,
    .tp_clear = (inquiry)keyed_clear,
    .tp_dealloc = (destructor)keyed_dealloc,
};

/* Futures (_futures.TracedFuture and create_future's traced side, in C). SettleAfter(method,
 * state, only_if_true) goes in TracedFuture's class in place of set_result / set_exception /
 * cancel: it calls asyncio's own method, then settles the future's resource (for cancel, only
 * when the cancel took). FutureMaker(var, original, traced_future_type) is the traced side of
 * the loop's create_future. */
static PyObject *s_record_futures, *s_asynctrace_trace, *s_future;

typedef struct {
    PyObject_HEAD
    PyObject *method;
    PyObject *state;
    int only_if_true;
    vectorcallfunc vectorcall;
} SettleAfter;

static PyObject *
settle_after_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    SettleAfter *s = (SettleAfter *)self;
    PyObject *out = PyObject_Vectorcall(s->method, args, nargsf, kwnames);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (out == NULL || nargs < 1) {
        return out;
    }
    if (s->only_if_true) {
        int took = PyObject_IsTrue(out);
        if (took <= 0) {
            if (took < 0) {
                Py_DECREF(out);
                return NULL;
            }
            return out;
        }
    }
    PyObject *res = slot_get(args[0], s_asynctrace_res);
    if (res == NULL) {
        report_and_clear("future");
        return out;
    }
    if (Py_IS_TYPE(res, &ResourceType)) {
        ResourceObject *r = (ResourceObject *)res;
        if (r->settled_at == Py_None || r->settled_at == NULL) {
            PyObject *now = now_ns();
            if (now == NULL) {
                report_and_clear("future");
            }
            else {
                settle_resource(r, now, s->state);
                Py_DECREF(now);
            }
        }
    }
    Py_DECREF(res);
    return out;
}

static PyObject *
settle_after_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *method, *state;
    int only_if_true;
    if (!PyArg_ParseTuple(args, "OUp:SettleAfter", &method, &state, &only_if_true)) {
        return NULL;
    }
    SettleAfter *s = (SettleAfter *)type->tp_alloc(type, 0);
    if (s == NULL) {
        return NULL;
    }
    s->method = Py_NewRef(method);
    s->state = Py_NewRef(state);
    s->only_if_true = only_if_true;
    s->vectorcall = settle_after_call;
    return (PyObject *)s;
}

static int
settle_after_traverse(SettleAfter *s, visitproc visit, void *arg)
{
    Py_VISIT(s->method);
    Py_VISIT(s->state);
    return 0;
}

static int
settle_after_clear(SettleAfter *s)
{
    Py_CLEAR(s->method);
    Py_CLEAR(s->state);
    return 0;
}

static void
settle_after_dealloc(SettleAfter *s)
{
    PyObject_GC_UnTrack(s);
    settle_after_clear(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyTypeObject SettleAfterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.SettleAfter",
    .tp_basicsize = sizeof(SettleAfter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "SettleAfter(method, state, only_if_true): a future method that settles after.",
    .tp_new = settle_after_new,
    .tp_traverse = (traverseproc)settle_after_traverse,
    .tp_clear = (inquiry)settle_after_clear,
    .tp_dealloc = (destructor)settle_after_dealloc,
    .tp_descr_get = dispatch_get,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(SettleAfter, vectorcall),
};

typedef struct {
    PyObject_HEAD
    PyObject *var;
    PyObject *original;
    PyObject *future_type;
    vectorcallfunc vectorcall;
} FutureMaker;

static PyObject *
future_maker_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FutureMaker *m = (FutureMaker *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *active = NULL;
    if (nargs != 1 || kwnames != NULL || PyContextVar_Get(m->var, NULL, &active) < 0) {
        PyErr_Clear();
        return PyObject_Vectorcall(m->original, args, nargsf, kwnames);
    }
    PyObject *trace = active != NULL && PyTuple_CheckExact(active) &&
                              PyTuple_GET_SIZE(active) == 2
                          ? PyTuple_GET_ITEM(active, 0)
                          : NULL;
    int wanted = 0;
    if (trace != NULL && PyObject_TypeCheck(trace, &TraceCoreType) &&
        !((TraceCore *)trace)->closed) {
        PyObject *flag = slot_get(trace, s_record_futures);
        wanted = flag == NULL ? -1 : PyObject_IsTrue(flag);
        Py_XDECREF(flag);
    }
    if (wanted <= 0) {
        Py_XDECREF(active);
        if (wanted < 0) {
            report_and_clear("create-future");
        }
        return PyObject_Vectorcall(m->original, args, nargsf, kwnames);
    }
    PyObject *fut = PyObject_Vectorcall(m->future_type, args, 0, s_loop_only);
    if (fut == NULL) {
        Py_DECREF(active);
        return NULL; /* the loop's own future could not be made either */
    }
    if (slot_set(fut, s_asynctrace_trace, trace) < 0 ||
        slot_set(fut, s_asynctrace_res, Py_None) < 0) {
        Py_DECREF(active);
        Py_DECREF(fut);
        return NULL;
    }
    PyObject *skip = PyLong_FromLong(0); /* the stack from create_future's caller */
    PyObject *call[4] = {trace, s_future, PyTuple_GET_ITEM(active, 1), skip};
    PyObject *res = skip ? call_new_resource(call) : NULL;
    Py_XDECREF(skip);
    if (res == NULL || slot_set(fut, s_asynctrace_res, res) < 0) {
        report_and_clear("create-future");
    }
    Py_XDECREF(res);
    Py_DECREF(active);
    return fut;
}

static PyObject *
future_maker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *var, *original, *future_type;
    if (!PyArg_ParseTuple(args, "OOO:FutureMaker", &var, &original, &future_type)) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(var) || !PyCallable_Check(original) ||
        !PyType_Check(future_type)) {
        PyErr_SetString(PyExc_TypeError, "FutureMaker(var, original, traced_future_type)");
        return NULL;
    }
    FutureMaker *m = (FutureMaker *)type->tp_alloc(type, 0);
    if (m == NULL) {
        return NULL;
    }
    m->var = Py_NewRef(var);
    m->original = Py_NewRef(original);
    m->future_type = Py_NewRef(future_type);
    m->vectorcall = future_maker_call;
    return (PyObject *)m;
}

static int
future_maker_traverse(FutureMaker *m, visitproc visit, void *arg)
{
    Py_VISIT(m->var);
    Py_VISIT(m->original);
    Py_VISIT(m->future_type);
    return 0;
}

static int
future_maker_clear(FutureMaker *m)
{
    Py_CLEAR(m->var);
    Py_CLEAR(m->original);
    Py_CLEAR(m->future_type);
    return 0;
}

static void
future_maker_dealloc(FutureMaker *m)
{
    PyObject_GC_UnTrack(m);
    future_maker_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyTypeObject FutureMakerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.FutureMaker",
    .tp_basicsize = sizeof(FutureMaker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "FutureMaker(original, traced_future_type): create_future's traced side.",
    .tp_new = future_maker_new,
    .tp_traverse = (traverseproc)future_maker_traverse,
    .tp_clear = (inquiry)future_maker_clear,
    .tp_dealloc = (destructor)future_maker_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FutureMaker, vectorcall),
};

/* start_trace(cls, trace_id, request, limits, ints, origin, started_at_unix_ns, dropped_type):
 * what Trace.start makes, without Trace.__init__'s frame and keyword arguments (a third of a
 * traced request's set-up). cls is a TraceCore subclass whose __init__ and add are Trace's
 * own (the caller checks; NotImplemented for a class on the Python core); the trace gets its
 * lists, its limits as the machine integers of ints (the six of _model._machine_limits, in
 * their order), a new dropped_type, the Python slots set as __init__ sets them, and its root
 * resource (id 1) made at origin. The tests hold the two ways to the same state. */
static PyObject *s_root, *s_trace_id, *s_request, *s_origin, *s_started_at_unix_ns;
static PyObject *s_ended_at, *s_limits, *s_finishers, *s_propagate_to;

static PyObject *
start_trace(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyType_Check(args[0]) || !PyTuple_CheckExact(args[4]) ||
        PyTuple_GET_SIZE(args[4]) != 6 || !PyCallable_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError,
                        "start_trace(cls, trace_id, request, limits, ints: 6-tuple, origin, "
                        "started_at_unix_ns, dropped_type)");
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)args[0], &TraceCoreType)) {
        Py_RETURN_NOTIMPLEMENTED; /* a trace on the Python core: Trace.__init__ makes it */
    }
    Py_ssize_t ints[6];
    for (Py_ssize_t i = 0; i < 6; i++) {
        ints[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(args[4], i));
        if (ints[i] == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    TraceCore *t = (TraceCore *)core_new((PyTypeObject *)args[0], NULL, NULL);
    if (t == NULL) {
        return NULL;
    }
    PyObject *trace = (PyObject *)t, *finishers = PyList_New(0), *propagate = PyDict_New();
    t->resources = PyList_New(0);
    t->annotations = PyList_New(0);
    t->stacks = PyList_New(0);
    t->stack_ids = PyDict_New();
    t->dropped = PyObject_CallNoArgs(args[7]);
    t->max_resources = ints[0];
    t->max_annotations = ints[1];
    t->max_annotation_length = ints[2];
    t->max_callbacks = ints[3];
    t->max_stacks = ints[4];
    t->stack_depth = ints[5];
    PyObject *root = NULL;
    if (finishers == NULL || propagate == NULL || t->resources == NULL ||
        t->annotations == NULL || t->stacks == NULL || t->stack_ids == NULL ||
        t->dropped == NULL || slot_set(trace, s_trace_id, args[1]) < 0 ||
        slot_set(trace, s_request, args[2]) < 0 || slot_set(trace, s_origin, args[5]) < 0 ||
        slot_set(trace, s_started_at_unix_ns, args[6]) < 0 ||
        slot_set(trace, s_ended_at, Py_None) < 0 || slot_set(trace, s_limits, args[3]) < 0 ||
        slot_set(trace, s_record_futures, Py_True) < 0 ||
        slot_set(trace, s_propagate_to, propagate) < 0 ||
        slot_set(trace, s_finishers, finishers) < 0 ||
        (root = core_add_impl(t, s_root, zero, Py_None, args[5])) == NULL) {
        Py_XDECREF(finishers);
        Py_XDECREF(propagate);
        Py_DECREF(trace);
        return NULL;
    }
    Py_DECREF(root);
    Py_DECREF(finishers);
    Py_DECREF(propagate);
    return trace;
}

static PyMethodDef methods[] = {
    {"untraced_check", (PyCFunction)(void (*)(void))untraced_check, METH_FASTCALL,
     "untraced_check(scope, header, prefix) -> None, the header value, True or NotImplemented."},
    {"find_header", (PyCFunction)(void (*)(void))find_header, METH_FASTCALL,
     "find_header(headers, name) -> the first value of header name, None or NotImplemented."},
    {"start_trace", (PyCFunction)(void (*)(void))start_trace, METH_FASTCALL,
     "start_trace(cls, trace_id, request, limits, ints, origin, started_at_unix_ns, "
     "dropped_type) -> a started trace, as Trace.start makes it."},
    {"set_stack_formatter", (PyCFunction)(void (*)(void))set_stack_formatter, METH_FASTCALL,
     "set_stack_formatter(format, cache, stop_code): what TraceCore.new_resource walks with."},
#ifdef HAVE_QUIET_WAIT
    {"quiet_poke", (PyCFunction)quiet_poke, METH_O,
     "quiet_poke(bump): with bump true, every quiet_wait under way returns False now; the "
     "count of pokes"},
    {"quiet_wait", (PyCFunction)(void (*)(void))quiet_wait, METH_FASTCALL,
     "quiet_wait(pause_ns, after_ns, limit_ns, pokes): sleep, without the GIL, until a step "
     "has run after_ns with no other starting or ending (True), limit_ns or a poke (False)"},
#endif
    {"set_stack_bounds", (PyCFunction)(void (*)(void))set_stack_bounds, METH_FASTCALL,
     "set_stack_bounds(drivers, runners): code a walk goes past into the coroutine it drives, "
     "and code a walk stops at."},
    {"stack_lookup", (PyCFunction)(void (*)(void))stack_lookup, METH_FASTCALL,
     "stack_lookup(skip, max_depth, stop_code, cache) -> the cached Stack, or (hash, key)."},
    {"stacks_json", (PyCFunction)(void (*)(void))stacks_json, METH_FASTCALL,
     "stacks_json(stacks, cache, encode) -> bytes: v1's stackTraces."},
    {"trace_json", (PyCFunction)(void (*)(void))trace_json, METH_FASTCALL,
     "trace_json(head, resources, origin, slots, stacks, frames, annotations, dropped, encode, "
     "strings) -> bytes: a whole trace in format v1."},
    {"duration_ms", (PyCFunction)duration_ms, METH_O,
     "duration_ms(seconds) -> milliseconds to the microsecond, as timers write delayMs."},
    {"in_order", (PyCFunction)in_order, METH_O,
     "in_order(resources) -> True, False, or None when it cannot tell."},
    {"set_timed_hooks", (PyCFunction)(void (*)(void))set_timed_hooks, METH_FASTCALL,
     "set_timed_hooks(traced_future_type, settle_from_exception, report)."},
    {"found", (PyCFunction)found, METH_O,
     "found(result) -> {'hit': result is not None}: a read's annotation (ScopedCall's own)."},
    {"set_timer_hooks", (PyCFunction)(void (*)(void))set_timer_hooks, METH_FASTCALL,
     "set_timer_hooks(var, timer_handle_type, traced_handle_type, unsettled_append)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "asgi_asynctrace._speedups",
    "Optional C accelerator: creation-stack keys, the header scan, traces as JSON.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    s_type = PyUnicode_InternFromString("type");
    s_headers = PyUnicode_InternFromString("headers");
    s_path = PyUnicode_InternFromString("path");
    s_http = PyUnicode_InternFromString("http");
    s_websocket = PyUnicode_InternFromString("websocket");
    s_loop_only = Py_BuildValue("(s)", "loop");
    s_pending = PyUnicode_InternFromString("pending");
    zero = PyLong_FromLong(0);
    s_ok = PyUnicode_InternFromString("ok");
    s_callbacks = PyUnicode_InternFromString("callbacks");
    s_throw = PyUnicode_InternFromString("throw");
    s_close = PyUnicode_InternFromString("close");
    s_asynctrace_res = PyUnicode_InternFromString("_asynctrace_res");
    s_task = PyUnicode_InternFromString("task");
    s_coroutine = PyUnicode_InternFromString("coroutine");
    s_qualname = PyUnicode_InternFromString("__qualname__");
    s_context = PyUnicode_InternFromString("context");
    s_new_resource = PyUnicode_InternFromString("new_resource");
    s_annotate = PyUnicode_InternFromString("annotate");
    s_await = PyUnicode_InternFromString("__await__");
    s_record_futures = PyUnicode_InternFromString("record_futures");
    s_asynctrace_trace = PyUnicode_InternFromString("_asynctrace_trace");
    s_future = PyUnicode_InternFromString("future");
    if (s_await == NULL || !s_record_futures || !s_asynctrace_trace || !s_future) {
        return NULL;
    }
    s_time = PyUnicode_InternFromString("time");
    s_timer = PyUnicode_InternFromString("timer");
    s_kind = PyUnicode_InternFromString("kind");
    s_delay_ms = PyUnicode_InternFromString("delayMs");
    s_late_ms = PyUnicode_InternFromString("lateMs");
    s_callback = PyUnicode_InternFromString("callback");
    s_error = PyUnicode_InternFromString("error");
    s_cancelled = PyUnicode_InternFromString("cancelled");
    s_error_state = s_error;
    s_class = PyUnicode_InternFromString("__class__");
    s_delay = PyUnicode_InternFromString("delay");
    s_f_locals = PyUnicode_InternFromString("f_locals");
    s_sleep = PyUnicode_InternFromString("sleep");
    s_timeout = PyUnicode_InternFromString("timeout");
    s_wait_for = PyUnicode_InternFromString("wait_for");
    s_set_result_unless = PyUnicode_InternFromString("_set_result_unless_cancelled");
    s_on_timeout = PyUnicode_InternFromString("Timeout._on_timeout");
    s_release_waiter = PyUnicode_InternFromString("_release_waiter");
    s_kind_call_later = PyUnicode_InternFromString("call_later");
    s__callback = PyUnicode_InternFromString("_callback");
    s__cancelled = PyUnicode_InternFromString("_cancelled");
    s__context = PyUnicode_InternFromString("_context");
    if (!s__callback || !s__cancelled || !s__context) {
        return NULL;
    }
    thousand = PyLong_FromLong(1000);
    zero_float = PyFloat_FromDouble(0.0);
    PyObject *builtins = PyImport_ImportModule("builtins");
    builtin_round = builtins ? PyObject_GetAttrString(builtins, "round") : NULL;
    Py_XDECREF(builtins);
    if (!s_time || !s_timer || !s_kind || !s_delay_ms || !s_late_ms || !s_callback || !s_error ||
        !s_cancelled || !s_class || !s_delay || !s_f_locals || !s_sleep || !s_timeout ||
        !s_wait_for || !s_set_result_unless || !s_on_timeout || !s_release_waiter ||
        !s_kind_call_later || !thousand || !zero_float || !builtin_round) {
        return NULL;
    }
    if (!s_ok || !s_callbacks || !s_throw || !s_close || !s_asynctrace_res || !s_task ||
        !s_coroutine || !s_qualname || !s_context || !s_new_resource || !s_annotate) {
        return NULL;
    }
    s_root = PyUnicode_InternFromString("root");
    s_trace_id = PyUnicode_InternFromString("trace_id");
    s_request = PyUnicode_InternFromString("request");
    s_origin = PyUnicode_InternFromString("origin");
    s_started_at_unix_ns = PyUnicode_InternFromString("started_at_unix_ns");
    s_ended_at = PyUnicode_InternFromString("ended_at");
    s_limits = PyUnicode_InternFromString("limits");
    s_finishers = PyUnicode_InternFromString("finishers");
    s_propagate_to = PyUnicode_InternFromString("propagate_to");
    if (!s_root || !s_trace_id || !s_request || !s_origin || !s_started_at_unix_ns ||
        !s_ended_at || !s_limits || !s_finishers || !s_propagate_to) {
        return NULL;
    }
    s_hit = PyUnicode_InternFromString("hit");
    s_backend = PyUnicode_InternFromString("backend");
    s_op = PyUnicode_InternFromString("op");
    s_key = PyUnicode_InternFromString("key");
    s_ttl = PyUnicode_InternFromString("ttl");
    if (!s_hit || !s_backend || !s_op || !s_key || !s_ttl) {
        return NULL;
    }
    s_frames = PyUnicode_InternFromString("frames");
    s_ellipsis = PyUnicode_FromString("\xe2\x80\xa6"); /* U+2026, as _recording appends */
    PyObject *time_module = PyImport_ImportModule("time");
    perf_counter_ns = time_module ? PyObject_GetAttrString(time_module, "perf_counter_ns") : NULL;
    Py_XDECREF(time_module);
    if (!s_frames || !s_ellipsis || !perf_counter_ns) {
        return NULL;
    }
    if (!s_type || !s_headers || !s_path || !s_http || !s_websocket || !s_loop_only ||
        !s_pending || !zero) {
        return NULL;
    }
    if (PyType_Ready(&DispatchType) < 0 || PyType_Ready(&TaskCallType) < 0 ||
        PyType_Ready(&ResourceType) < 0 || PyType_Ready(&TraceCoreType) < 0 ||
        PyType_Ready(&TimedType) < 0 || PyType_Ready(&TaskFactoryType) < 0 ||
        PyType_Ready(&TimerCallbackType) < 0 || PyType_Ready(&TimerPatchType) < 0 ||
        PyType_Ready(&ScopedCallType) < 0 || PyType_Ready(&SettleAfterType) < 0 ||
        PyType_Ready(&FutureMakerType) < 0 || PyType_Ready(&TimerCancelType) < 0 ||
        PyType_Ready(&KeyedCallType) < 0) {
        return NULL;
    }
    core_new_resource_method = PyDict_GetItemWithError(TraceCoreType.tp_dict, s_new_resource);
    if (core_new_resource_method == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "TraceCore has no new_resource");
        }
        return NULL;
    }
    Py_INCREF(core_new_resource_method);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Dispatch", (PyObject *)&DispatchType) < 0 ||
        PyModule_AddObjectRef(m, "TaskCall", (PyObject *)&TaskCallType) < 0 ||
        PyModule_AddObjectRef(m, "Resource", (PyObject *)&ResourceType) < 0 ||
        PyModule_AddObjectRef(m, "TraceCore", (PyObject *)&TraceCoreType) < 0 ||
        PyModule_AddObjectRef(m, "TimedCoroutine", (PyObject *)&TimedType) < 0 ||
        PyModule_AddObjectRef(m, "TaskFactory", (PyObject *)&TaskFactoryType) < 0 ||
        PyModule_AddObjectRef(m, "TimerCallback", (PyObject *)&TimerCallbackType) < 0 ||
        PyModule_AddObjectRef(m, "TimerPatch", (PyObject *)&TimerPatchType) < 0 ||
        PyModule_AddObjectRef(m, "ScopedCall", (PyObject *)&ScopedCallType) < 0 ||
        PyModule_AddObjectRef(m, "SettleAfter", (PyObject *)&SettleAfterType) < 0 ||
        PyModule_AddObjectRef(m, "FutureMaker", (PyObject *)&FutureMakerType) < 0 ||
        PyModule_AddObjectRef(m, "TimerCancel", (PyObject *)&TimerCancelType) < 0 ||
        PyModule_AddObjectRef(m, "KeyedCall", (PyObject *)&KeyedCallType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    found_function = PyObject_GetAttrString(m, "found");
    if (found_function == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
