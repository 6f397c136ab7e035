/* Part of _speedups.c (one translation unit; see there): format v1's resources and annotations written as JSON, straight from the records. */

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

/* The "]" that closes an array; 0, or -1 with an exception. */
static int
close_array(buffer *b)
{
    if (reserve(b, 1) < 0) {
        return -1;
    }
    b->data[b->len++] = ']';
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
    return close_array(b);
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
    return close_array(&b);
fail:
    return -1;
#undef b
}
