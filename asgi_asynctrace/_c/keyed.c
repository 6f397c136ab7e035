/* Part of _speedups.c (one translation unit; see there): KeyedCall: a cache or key-value call recorded with its key. */

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
