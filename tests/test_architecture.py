"""The shape of controller/: no import circle anywhere, and the core free of I/O (see pyproject's contracts)."""

from __future__ import annotations

import grimp


def test_the_import_graph_of_controller_has_no_circle() -> None:
    graph = grimp.build_graph("controller")
    modules = sorted(graph.modules)
    imports = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in imports[module]:
            if state.get(target) == "open":
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in modules:
        if module not in state:
            visit(module, [module])
    assert circles == []


_ABOVE = ("controller.adapters", "controller.config", "controller.cli", "controller.commands", "controller.daemon")


def test_the_core_and_the_model_import_nothing_from_above() -> None:
    graph = grimp.build_graph("controller")
    low = [m for m in graph.modules if m.startswith(("controller.core", "controller.model"))]
    for module in low:
        above = [
            t
            for t in graph.find_modules_directly_imported_by(module)
            if t.startswith(
                (
                    "controller.adapters",
                    "controller.config",
                    "controller.cli",
                    "controller.commands",
                    "controller.daemon",
                )
            )
        ]
        assert above == [], module
