"""Finding the user's application: MODULE:ATTRIBUTE, imported in each worker.

Every failure becomes an AppLoadError whose message names the problem; the
worker logs it (with the user's own traceback when their code raised) and
exits with APP_LOAD_ERROR, which the primary reads as "stop, do not respawn".
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable

from cydispatch.settings import Settings


class AppLoadError(Exception):
    """The application cannot be loaded; the message is meant for the user.

    `user_code` is True when the user's own code raised (import or factory),
    so its traceback helps.
    """

    def __init__(self, message: str, user_code: bool = False) -> None:
        super().__init__(message)
        self.user_code = user_code


def is_asgi3(app) -> bool:
    """An ASGI 3 app is a coroutine function, or an object whose __call__ is one."""
    if inspect.isclass(app):
        return False
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)
    return inspect.iscoroutinefunction(call)


def positional_parameters(app) -> int | None:
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
        return None
    return sum(1 for p in signature.parameters.values() if p.kind in kinds)


def import_target(settings: Settings) -> object:
    module_name, _, attributes = settings.app.partition(":")
    app_dir = os.path.abspath(settings.app_dir)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name
                                     or module_name.startswith(exc.name + ".")):
            raise AppLoadError(f"cannot import {module_name!r}: no module named "
                               f"{exc.name!r} (looked in {app_dir} and sys.path; "
                               "see --app-dir)") from None
        raise AppLoadError(f"importing {module_name!r} failed: {exc}",
                           user_code=True) from exc
    except BaseException as exc:   # SystemExit from a script-like module too
        raise AppLoadError(f"importing {module_name!r} failed: "
                           f"{type(exc).__name__}: {exc}", user_code=True) from exc
    target = module
    path = module_name
    for attribute in attributes.split("."):
        try:
            target = getattr(target, attribute)
        except AttributeError:
            raise AppLoadError(f"{path!r} has no attribute {attribute!r} "
                               f"(APP is {settings.app})") from None
        path += ("." if path != module_name else ":") + attribute
    return target


def load_app(settings: Settings) -> tuple[Callable, str]:
    """The application and its interface ("asgi" or "wsgi")."""
    app = import_target(settings)
    if settings.factory:
        if not callable(app):
            raise AppLoadError(f"{settings.app} is not callable, so it cannot be a "
                               "--factory")
        try:
            app = app()
        except BaseException as exc:
            raise AppLoadError(f"the factory {settings.app} failed: "
                               f"{type(exc).__name__}: {exc}", user_code=True) from exc
    if not callable(app):
        hint = " (did you mean --factory?)" if inspect.isfunction(app) else ""
        raise AppLoadError(f"{settings.app} is a {type(app).__name__}, not an ASGI or "
                           f"WSGI application{hint}")
    interface = settings.interface
    if interface == "auto":
        if is_asgi3(app):
            interface = "asgi"
        elif positional_parameters(app) in (2, None) and not inspect.isclass(app):
            # (environ, start_response), or *args as a wrapper takes them.
            interface = "wsgi"
        else:
            hint = ""
            if inspect.isfunction(app) and positional_parameters(app) == 0:
                hint = "; if it returns the application, add --factory"
            raise AppLoadError(
                f"{settings.app} is neither an ASGI 3 application (async, taking "
                "scope, receive, send) nor a WSGI one (taking environ, "
                f"start_response){hint}; --interface says which it is")
    elif interface == "asgi" and not is_asgi3(app):
        raise AppLoadError(f"{settings.app} is not an ASGI 3 application: it is not "
                           "a coroutine function (ASGI 2 classes are not supported)")
    return app, interface
