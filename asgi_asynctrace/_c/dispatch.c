/* Part of _speedups.c (one translation unit; see there): Dispatch (untraced or traced, by the context variable) and TaskCall (a plain task factory). */

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
