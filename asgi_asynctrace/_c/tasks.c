/* Part of _speedups.c (one translation unit; see there): TaskFactory: the traced side of the hooks' task factory. */

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
