/* Part of _speedups.c (one translation unit; see there): TimedCoroutine: each step of a traced task's coroutine. */

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
