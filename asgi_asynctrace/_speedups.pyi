from typing import Any

def stack_lookup(
    skip: int, max_depth: int, stop_code: object, cache: dict[int, tuple[bytes, Any]], /
) -> object: ...
def untraced_check(scope: object, header: bytes, prefix: str, /) -> object: ...
def resources_json(
    resources: list[Any],
    origin: int,
    slots: tuple[object, ...],
    encode: object,
    cache: dict[str, bytes] = ...,
    /,
) -> bytes: ...
def annotations_json(
    annotations: list[Any], encode: object, cache: dict[str, bytes] = ..., /
) -> bytes: ...

class Dispatch:
    untraced: Any
    traced: Any
    def __init__(self, var: Any, untraced: Any, traced: Any, /) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, obj: Any, owner: Any = None, /) -> Any: ...

class TaskCall:
    def __init__(self, task_type: Any, /) -> None: ...
    def __call__(self, loop: Any, coro: Any, /, **kwargs: Any) -> Any: ...

class Resource:
    async_id: int
    trigger_id: int
    type: str
    stack_id: int | None
    created_at: int
    callbacks: list[int]
    settled_at: int | None
    state: str
    annotation_count: int
    awaited_by: list[int] | None
    def __init__(
        self, async_id: int, trigger_id: int, type: str, stack_id: int | None, created_at: int
    ) -> None: ...
    def intervals(self) -> list[tuple[int, int | None]]: ...

def set_stack_formatter(
    format: Any, cache: dict[int, tuple[bytes, Any]], stop_code: object, /
) -> None: ...

class TraceCore:
    resources: list[Resource]
    annotations: list[tuple[int, str, Any]]
    stacks: list[tuple[str, ...]]
    _stack_ids: dict[object, int]
    dropped: Any
    closed: bool
    stack_depth: int
    _max_resources: int
    _max_annotations: int
    _max_annotation_length: int
    _max_callbacks: int
    _max_stacks: int
    _next_id: int
    def add(
        self, type: str, trigger_id: int, stack_id: int | None, now: int, /
    ) -> Resource | None: ...
    def begin(self, res: Resource, now: int, /) -> None: ...
    def end(self, res: Resource, now: int, /) -> None: ...
    def settle(self, res: Resource, now: int, state: str, /) -> None: ...
    def annotate(self, res: Resource, key: str, value: Any, /) -> None: ...
    def stack_id(self, key: object, frames: tuple[str, ...], /) -> int | None: ...
    def new_resource(self, type: str, parent: Resource, skip: int, /) -> Resource | None: ...

def stacks_json(stacks: list[Any], cache: dict[int, Any], encode: object, /) -> bytes: ...
def in_order(resources: list[Any], /) -> bool | None: ...
