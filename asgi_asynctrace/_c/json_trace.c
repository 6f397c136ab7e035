/* Part of _speedups.c (one translation unit; see there): the stack table and the whole trace as JSON (stacks_json, trace_json). */

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
    return close_array(&b);
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
