/* Part of _speedups.c (one translation unit; see there): ScopedCall: an awaited library call recorded as a resource. */

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
