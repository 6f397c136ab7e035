/* Part of _speedups.c (one translation unit; see there): the middleware's header scan on every request (find_header, untraced_check). */

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
