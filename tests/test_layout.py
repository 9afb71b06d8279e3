"""The architecture as docs/architecture.md describes it: no import circle between modules,
at most 8 top-level modules, model families and loss terms each declared in one place."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "vae_scale"


def import_graph() -> dict[str, set[str]]:
    """module -> the vae_scale modules it imports (at the top or inside functions)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vae_scale"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = import_graph()
    assert cycles(graph) == []
    # the rooms' direction: training uses analysis (evaluation), never the other way round
    readers = [m for m in graph if m.startswith(("vae_scale.analysis", "vae_scale.hub"))]
    assert not any(t.startswith("vae_scale.training") for m in readers for t in graph[m])
    streaming = [m for m in graph if m.startswith("vae_scale.data.streaming")]
    assert not any("vae_scale.data.sourcing" in t for m in streaming for t in graph[m])


def test_at_most_eight_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_model_families_and_loss_terms_are_declared_once():
    import typing

    from vae_scale.config import MODEL_SECTIONS, Config
    from vae_scale.losses import ELBO_TERMS, ELBOTerms
    from vae_scale.models import FAMILIES

    # the config's union is derived from the registered families, nothing listed by hand
    annotation = Config.model_fields["model"].annotation
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    union = typing.get_args(annotation)
    assert set(union) == set(MODEL_SECTIONS.values())
    assert {n: f.config_section for n, f in FAMILIES.items()} == MODEL_SECTIONS
    for name, family in FAMILIES.items():
        assert family.config_section.__module__ == family.__module__, name  # beside its network
    assert set(ELBO_TERMS) <= set(ELBOTerms.__dataclass_fields__)
