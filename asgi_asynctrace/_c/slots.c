/* Part of _speedups.c (one translation unit; see there): reading and writing a __slots__ member straight at its offset. */

/* Where obj keeps the attribute called name, when that is a __slots__ member of obj's class
 * (found through the type's attribute cache) and the class reads and writes attributes the
 * usual way: the traced side of every future, timer and stack reads and writes a few such
 * slots, and the generic attribute lookup was most of what each one cost. NULL otherwise,
 * for the caller to ask the usual way (a class that replaced the slot, or its
 * __getattribute__ / __setattr__, is asked). */
static PyObject **
slot_address(PyObject *obj, PyObject *name, int writing)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (writing ? tp->tp_setattro != PyObject_GenericSetAttr
                : tp->tp_getattro != PyObject_GenericGetAttr) {
        return NULL;
    }
    PyObject *descr = _PyType_Lookup(tp, name); /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        return NULL;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
    if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
        return NULL;
    }
    return (PyObject **)((char *)obj + m->offset);
}

/* obj.name: a new reference, NULL with an exception set (an unset slot raises as ever). */
static PyObject *
slot_get(PyObject *obj, PyObject *name)
{
    PyObject **at = slot_address(obj, name, 0);
    if (at != NULL && *at != NULL) {
        return Py_NewRef(*at);
    }
    return PyObject_GetAttr(obj, name);
}

/* obj.name = value; 0, or -1 with an exception set. */
static int
slot_set(PyObject *obj, PyObject *name, PyObject *value)
{
    PyObject **at = slot_address(obj, name, 1);
    if (at == NULL) {
        return PyObject_SetAttr(obj, name, value);
    }
    Py_XSETREF(*at, Py_NewRef(value));
    return 0;
}
