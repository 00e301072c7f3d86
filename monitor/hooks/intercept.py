"""Intercepting a method of one object without setting anything on that object.

An attribute set on the instance would travel with it: into `state_dict()` of
objects that save their `__dict__` (LR schedulers), into pickles and deep copies
(GradScaler.__getstate__ copies `__dict__`). So the method is wrapped once on the
object's class, and the wrapper dispatches by identity: registered instances go
through their handler, every other instance straight to the original.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

Handler = Callable[..., Any]  # handler(call_original, *args, **kwargs)

_lock = threading.Lock()
# (class, method name) -> (original attribute in the class __dict__ or None if inherited, handlers by id)
_patched: dict[tuple[type, str], tuple[Any, dict[int, Handler]]] = {}


def intercept(obj: Any, name: str, handler: Handler) -> Callable[[], None]:
    """Route `obj.name(...)` through `handler(call_original, ...)`; returns a function that undoes it."""
    cls = type(obj)
    key = (cls, name)
    with _lock:
        if key not in _patched:
            own = cls.__dict__.get(name)
            original = getattr(cls, name)  # the function, own or inherited
            handlers: dict[int, Handler] = {}

            def wrapper(self, *args, **kwargs):
                # Registered objects are kept alive by their monitor, so an id is never reused meanwhile.
                h = handlers.get(id(self))
                if h is None:
                    return original(self, *args, **kwargs)
                return h(partial(original, self), *args, **kwargs)

            wrapper.__wrapped__ = original  # type: ignore[attr-defined]
            wrapper.__name__ = getattr(original, "__name__", name)
            wrapper.__doc__ = getattr(original, "__doc__", None)
            setattr(cls, name, wrapper)
            _patched[key] = (own, handlers)
        _patched[key][1][id(obj)] = handler

    def undo() -> None:
        with _lock:
            entry = _patched.get(key)
            if entry is None:
                return
            own, handlers = entry
            handlers.pop(id(obj), None)
            if not handlers:
                if own is None:
                    delattr(cls, name)  # the method was inherited: inherit it again
                else:
                    setattr(cls, name, own)
                del _patched[key]

    return undo
