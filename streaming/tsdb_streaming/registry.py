"""Export formats by name: each format module registers the forecaster class that serves it.

``tsdb_model.json``'s ``"format"`` picks the class; nothing else in the runtime looks at a
format or strategy name. A new export format is one module that subclasses
``core.StreamingForecaster`` and decorates it with ``@register_format("its-name")``.
"""

from __future__ import annotations

from .errors import StreamingError

_FORMATS: dict[str, type] = {}


def register_format(name: str):
    """Class decorator: serve exports whose metadata says ``"format": name`` with this class."""
    def decorate(cls: type) -> type:
        if _FORMATS.get(name, cls) is not cls:
            raise ValueError(f"format {name!r} is already served by {_FORMATS[name].__qualname__}")
        _FORMATS[name] = cls
        cls.FORMAT = name
        return cls
    return decorate


def format_class(name, where: str = "tsdb_model.json") -> type:
    """The class registered for format ``name``; ``where`` names the file in the error."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise StreamingError(f"{where}: format {name!r} is not served by this runtime (it serves "
                             f"{sorted(_FORMATS)}); upgrade tsdb-streaming or re-export the model") from None


def registered_formats() -> list[str]:
    return sorted(_FORMATS)


__all__ = ["format_class", "register_format", "registered_formats"]
