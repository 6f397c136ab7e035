/* Part of _speedups.c (one translation unit; see there): Resource, the record of one async resource, and in_order. */

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
