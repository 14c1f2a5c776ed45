"""Sphinx configuration of the API reference, built from the docstrings.

Build it with warnings as errors (CI does)::

    .venv/bin/pip install -e '.[docs]'
    .venv/bin/python -m sphinx -W --keep-going -n -b html docs/api /tmp/api-html
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from typing import TypeVar

from docutils.nodes import Element
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

project = "intercept-dispatch"
author = "intercept-dispatch contributors"
copyright = "intercept-dispatch contributors"

# The docstrings are plain reST (``code``, :class: roles, field lists): autodoc alone, no napoleon.
extensions = ["sphinx.ext.autodoc"]

# Every cross-reference must resolve, signatures' type hints included.
nitpicky = True
nitpick_ignore_regex = [
    # Third-party types in signatures: the build runs offline, with no intersphinx inventory to link them to.
    ("py:.*", r"anyio(\..+)?"),
    # prometheus_client's, imported only for type checking (it is the optional `metrics` extra), so unqualified.
    ("py:class", r"prometheus_client(\..+)?|CollectorRegistry|Metric"),
]

autodoc_member_order = "bysource"
# A module with __all__ shows exactly the names in it, documented or not.
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
# Signatures show the hints; descriptions stay as written.
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Aliases read better than what they expand to.
autodoc_type_aliases = {
    "Handler": "dispatcher.Handler",
    "BulkHandler": "dispatcher.BulkHandler",
}
python_use_unqualified_type_names = True
add_module_names = False

html_theme = "alabaster"
html_title = "intercept-dispatch API reference"

# The public API: every name in each of these modules' __all__ must be documented on some page, under that name or,
# for a re-export, where the object is defined (``transports.testing.check_transport`` is
# ``transports.conformance.check_transport``).
PUBLIC_MODULES = [
    "dispatcher",
    "transports.testing",
    "transports.conformance",
    "transports.memory",
    "transports.pipe",
    "transports.unix",
    "transports.shared_memory",
    "transports.fdstream",
    "transports.framing",
    "transports.latency",
    "transports.kvm",
    "transports.service",
]

log = logging.getLogger(__name__)


def _resolve(dotted: str) -> object:
    """The object a documented dotted name stands for (a module, or attributes of one); raises if there is none."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(dotted)


def check_public_api_documented(app: Sphinx, env: BuildEnvironment) -> None:
    documented = env.get_domain("py").objects
    # A re-export counts where the very object is documented under the same last name.
    by_last_name: dict[str, list[object]] = {}
    for name in documented:
        try:
            by_last_name.setdefault(name.rpartition(".")[2], []).append(_resolve(name))
        except (ImportError, AttributeError):
            continue
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if f"{module_name}.{name}" in documented or any(value is other for other in by_last_name.get(name, ())):
                continue
            log.warning("%s.%s is public (in __all__) but the API reference does not document it", module_name, name)


def unlinked_outside_names(app: Sphinx, env: BuildEnvironment, node: Element, contnode: Element) -> Element | None:
    """Show without a link what has no page here: the standard library's names and type variables.

    The build runs offline, so there is no intersphinx inventory of the standard library to link to, and a type
    variable in a signature (``Callable[[F], F]``) is no object to document.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if target.partition(".")[0] in sys.stdlib_module_names:
        return contnode
    try:
        value = _resolve(target)
    except (ImportError, AttributeError):
        value = None
    if isinstance(value, TypeVar):
        return contnode
    module = node.get("py:module")
    if node.get("reftype") == "data" and module and hasattr(importlib.import_module(module), target):
        # Say why, rather than that there is no such thing: autodoc skips a module's variable without a docstring.
        log.warning(
            "%s.%s is referred to but not documented: give it a docstring (a string literal on the line after it)",
            module,
            target,
            location=node,
        )
        return contnode
    return None


def docstrings_as_written(app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]) -> None:
    """Show the docstrings the code has, not the ones Python or autodoc make up.

    A NamedTuple field without a ``#:`` comment gets none, rather than "Alias for field number 0". A constant or
    alias documented where it is re-exported gets the docstring it has where it is defined: autodoc reads a
    variable's docstring from the source of the module the page names (``dispatcher``), while
    ``dispatcher.NO_RECEIVER`` is documented in ``dispatcher/irq.py``; failing that, it shows the docstring of
    the value's type (``int``'s), which says nothing about the constant.
    """
    if what == "attribute" and len(lines) <= 2 and re.fullmatch(r"Alias for field number \d+", "".join(lines)):
        # A NamedTuple field without a #: comment: its generated docstring says nothing.
        lines.clear()
    if what != "data":
        return
    package, _, attribute = name.rpartition(".")
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith(package + ".") or getattr(module, attribute, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", attribute))
        except PycodeError:
            continue
        if docs:
            lines[:] = list(docs)
            return
    type_doc = getattr(type(obj), "__doc__", None)
    if type_doc and " ".join(" ".join(lines).split()) == " ".join(type_doc.split()):
        lines.clear()


REMAINING_SUBMODULES = re.compile(r"^\.\. remaining-submodules:: (\S+)$", re.M)


def remaining_submodules(app: Sphinx, docname: str, source: list[str]) -> None:
    """Expand ``.. remaining-submodules:: PACKAGE`` into a section for each submodule the page does not document.

    A page lists its package's main modules in the order a reader wants them; a module added to the package later
    is documented all the same, and the build checks its docstrings.
    """

    def sections(match: re.Match[str]) -> str:
        package = importlib.import_module(match[1])
        names = sorted(module.name for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}."))
        return "\n".join(
            f"``{name}``\n{'-' * (len(name) + 4)}\n\n.. automodule:: {name}\n"
            for name in names
            if f".. automodule:: {name}\n" not in source[0]
        )

    source[0] = REMAINING_SUBMODULES.sub(sections, source[0])


def setup(app: Sphinx) -> None:
    app.connect("env-check-consistency", check_public_api_documented)
    app.connect("missing-reference", unlinked_outside_names)
    app.connect("autodoc-process-docstring", docstrings_as_written)
    app.connect("source-read", remaining_submodules)
