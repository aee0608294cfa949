"""Names renamed in 0.2 keep working for one release, with a DeprecationWarning naming the new one."""
import functools
import warnings


def renamed_attributes(module_globals: dict, renames: dict):
    """A module `__getattr__` that serves each old name in `renames` (old -> new) with a warning."""
    def __getattr__(name):
        if name in renames:
            new = renames[name]
            warnings.warn(f"{module_globals['__name__']}.{name} was renamed {new}; the old name will be removed "
                          "in the next release", DeprecationWarning, stacklevel=2)
            return module_globals[new]
        raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")

    return __getattr__


def renamed_function(new, old_name: str):
    """`new` under its old name, warning on each call."""
    @functools.wraps(new)
    def old(*args, **kwargs):
        warnings.warn(f"{old_name} was renamed {new.__name__}; the old name will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    old.__name__ = old_name.rpartition(".")[2]
    return old


def model_from_estimator(fn=None, *, skip: int = 0):
    """For functions that used to take `model` before the estimator (which already holds it):
    `fn(estimator, ...)`; the old `fn(model, estimator, ...)` still works, with a warning, and
    must name the estimator's own model. `skip` leading arguments (self) are passed through."""
    if fn is None:
        return functools.partial(model_from_estimator, skip=skip)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        head, rest = args[:skip], args[skip:]
        model = kwargs.pop("model", None)
        if rest and isinstance(rest[0], torch.nn.Module):
            model, rest = rest[0], rest[1:]
        if model is not None:
            name = fn.__qualname__.replace(".__init__", "")
            warnings.warn(f"{name}(model, estimator, ...) is deprecated: pass the estimator alone, it holds the model "
                          "(the model argument will be removed in the next release)", DeprecationWarning,
                          stacklevel=2)
            estimator = rest[0] if rest else kwargs.get("estimator")
            estimators = estimator if isinstance(estimator, (list, tuple)) else [estimator]
            if any(getattr(e, "model", None) is not model for e in estimators):
                raise ValueError("the estimator must observe the same model object")
        return fn(*head, *rest, **kwargs)

    return wrapper
