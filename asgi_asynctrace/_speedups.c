/* Two hot loops that pure Python cannot make cheap: the key of a creation stack, and the
 * middleware's header scan on every request.
 *
 *   key = stack_key(skip, max_depth, stop_code)
 *
 * Walks from the caller's frame (skip = 0) outwards, at most max_depth frames, stopping
 * before a frame running stop_code, and returns the (code object address, last instruction)
 * of each frame packed into one bytes object: an exact key, one allocation, hashed once.
 * The Python fallback in _stacks.py builds the same key as a tuple; both are only ever
 * compared with keys made by the same function. Optional at build time: without a compiler
 * the package runs on the fallback.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>

#define MAX_FRAMES 256

typedef struct {
    void *code;
    long long lasti;
} entry;

static PyObject *
stack_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "stack_key(skip, max_depth, stop_code)");
        return NULL;
    }
    Py_ssize_t skip = PyLong_AsSsize_t(args[0]);
    Py_ssize_t depth = PyLong_AsSsize_t(args[1]);
    if ((skip == -1 || depth == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (depth > MAX_FRAMES) {
        depth = MAX_FRAMES;
    }
    PyObject *stop = args[2];
    entry buf[MAX_FRAMES];
    Py_ssize_t n = 0;

    PyFrameObject *f = PyEval_GetFrame(); /* borrowed */
    Py_XINCREF(f);
    for (Py_ssize_t i = 0; i < skip && f != NULL; i++) {
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    while (f != NULL && n < depth) {
        PyCodeObject *code = PyFrame_GetCode(f);
        if ((PyObject *)code == stop) {
            Py_DECREF(code);
            break;
        }
        buf[n].code = (void *)code;
#if PY_VERSION_HEX >= 0x030B0000
        buf[n].lasti = PyFrame_GetLasti(f);
#else
        buf[n].lasti = f->f_lasti;
#endif
        Py_DECREF(code);
        n++;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
    return PyBytes_FromStringAndSize((const char *)buf, n * (Py_ssize_t)sizeof(entry));
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

static PyMethodDef methods[] = {
    {"untraced_check", (PyCFunction)(void (*)(void))untraced_check, METH_FASTCALL,
     "untraced_check(scope, header, prefix) -> None, the header value, True or NotImplemented."},
    {"stack_key", (PyCFunction)(void (*)(void))stack_key, METH_FASTCALL,
     "stack_key(skip, max_depth, stop_code) -> bytes: the exact key of the caller's stack."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "asgi_asynctrace._speedups",
    "Optional C accelerator: creation-stack keys and the header scan.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    s_type = PyUnicode_InternFromString("type");
    s_headers = PyUnicode_InternFromString("headers");
    s_path = PyUnicode_InternFromString("path");
    s_http = PyUnicode_InternFromString("http");
    s_websocket = PyUnicode_InternFromString("websocket");
    if (!s_type || !s_headers || !s_path || !s_http || !s_websocket) {
        return NULL;
    }
    return PyModule_Create(&module);
}
