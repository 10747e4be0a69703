"""The layout coda.py's table of contents promises, read from its source: the server (Part 1)
never calls into the commands run by hooks and operators (Part 2), so a reviewer of its attack
surface can stop at that line; and the objects that make up the running server are built in
one place, wire()."""
import ast

from conftest import ROOT

PART_2 = "# Part 2: Commands run by hooks and operators"
PROCESS_OBJECTS = {"Access", "Sessions", "Gateway", "Pat", "Setup", "ProxyPort"}


def parse(source):
    return ast.parse(source), source[:source.index(PART_2)].count("\n") + 1


def bound_names(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {target.id for target in targets if isinstance(target, ast.Name)}
    return set()


def local_names(node):
    names = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store)}
    return names | {arg.arg for sub in ast.walk(node) if isinstance(sub, ast.arguments)
                    for arg in sub.posonlyargs + sub.args + sub.kwonlyargs + [sub.vararg, sub.kwarg] if arg}


def calls_into_part_2(source):
    tree, boundary = parse(source)
    part_2 = set().union(*(bound_names(node) for node in tree.body if node.lineno > boundary))
    return sorted({(node.name, sub.id) for node in tree.body if node.lineno < boundary
                   and isinstance(node, (ast.FunctionDef, ast.ClassDef)) for sub in ast.walk(node)
                   if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)
                   and sub.id in part_2 - local_names(node)})


def built_outside_wire(source):
    tree, _ = parse(source)
    wire = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "wire")
    inside = {id(sub) for sub in ast.walk(wire)}
    return sorted(sub.func.id for sub in ast.walk(tree) if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name)
                  and sub.func.id in PROCESS_OBJECTS and id(sub) not in inside)


def test_the_server_never_calls_into_part_2():
    assert calls_into_part_2((ROOT / "coda.py").read_text()) == []


def test_the_process_objects_are_built_only_in_wire():
    assert built_outside_wire((ROOT / "coda.py").read_text()) == []
