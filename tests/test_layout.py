"""The shape of meshbox.py: the map in its docstring is true.

meshbox is one file of sections, each opened by a ``# ---- Name ----``
banner and listed, in order, in the module docstring.  These tests read the
source (they import nothing of it) and fail when the file stops matching
its map: a section that uses a name defined in a later one, a name defined
twice, SQL outside the Store, an error class outside MeshboxError, or a user
error raised as a bare ValueError.
"""

import ast
import collections
import os
import re

import pytest

MESHBOX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "meshbox.py")
BANNER = re.compile(r"^# ---- (.+) ----$")


class Layout:
    """meshbox.py parsed: its sections, the top-level names each defines and
    where every module-level name is used."""

    def __init__(self, source):
        self.source = source
        self.tree = ast.parse(source)
        self.banners = [(number, m.group(1)) for number, line in enumerate(source.splitlines(), 1)
                        if (m := BANNER.match(line))]
        self.order = [name for _, name in self.banners]
        self.definitions = collections.defaultdict(list)      # name -> [(line, section)]
        for node in self.tree.body:
            for name in defined_names(node):
                self.definitions[name].append((node.lineno, self.section_at(node.lineno)))

    def section_at(self, line):
        current = None
        for number, name in self.banners:
            if number <= line:
                current = name
        return current

    def docstring_sections(self):
        """The section names the docstring's map lists, in its order."""
        doc = ast.get_docstring(self.tree)
        listing = doc.split("Map of this file", 1)[1]
        # "  Name            what it holds": the name fills columns 2-17
        return [line[2:18].strip() for line in listing.splitlines() if line[:2] == "  " and line[2:3].isupper()]

    def forward_uses(self):
        """{(using section, defining section): names} where a section uses a
        name that a later section defines."""
        out = collections.defaultdict(set)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in self.definitions:
                user = self.section_at(node.lineno)
                _, owner = self.definitions[node.id][0]
                if self.order.index(user) < self.order.index(owner):
                    out[(user, owner)].add(node.id)
        return out

    def calls_in_sections(self, attribute):
        """Sections that call ``something.<attribute>(...)``."""
        return {self.section_at(node.lineno) for node in ast.walk(self.tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == attribute}


def defined_names(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


@pytest.fixture(scope="module")
def layout():
    with open(MESHBOX, encoding="utf-8") as f:
        return Layout(f.read())


def test_the_docstring_lists_every_section_in_file_order(layout):
    assert layout.docstring_sections() == layout.order
    assert len(set(layout.order)) == len(layout.order), "two sections share a name"


def test_no_section_uses_a_name_defined_in_a_later_one(layout):
    forward = {f"{user} uses {', '.join(sorted(names))} from the later section {owner}"
               for (user, owner), names in layout.forward_uses().items()}
    assert not forward, "sections out of dependency order:\n" + "\n".join(sorted(forward))


def test_every_top_level_name_is_defined_once(layout):
    twice = {name: [line for line, _ in places] for name, places in layout.definitions.items() if len(places) > 1}
    assert not twice, f"defined more than once (name: lines): {twice}"


def test_only_the_store_runs_sql(layout):
    assert layout.calls_in_sections("execute") <= {"Store"}
    assert layout.calls_in_sections("executescript") <= {"Store"}


def test_every_error_class_is_a_meshbox_error(layout):
    """One root for errors a user is shown: the CLI and APIs catch MeshboxError,
    so anything else (a TypeError from a bug) keeps its traceback."""
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in layout.tree.body
               if isinstance(node, ast.ClassDef)}

    def rooted(name):
        return name == "MeshboxError" or any(rooted(base) for base in classes.get(name, ()) if base in classes)

    errors = [name for name, bases in classes.items()
              if name.endswith(("Error", "Refused")) or "Exception" in bases]
    assert errors, "no error classes found: the test reads the wrong file"
    assert [name for name in errors if not rooted(name)] == []


def test_user_errors_are_not_bare_value_errors(layout):
    bare = [node.lineno for node in ast.walk(layout.tree) if isinstance(node, ast.Raise)
            and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)
            and node.exc.func.id == "ValueError"]
    assert bare == [], f"raise InvalidInput (a MeshboxError) instead of ValueError at lines {bare}"


def test_the_checks_see_what_they_look_for():
    """Each check catches the fault it is for, on a small file that has it."""
    source = '''"""x

Map of this file:

  Early           first
                  and more
  Late            second
"""
# ---- Early ----
def early():
    db.execute("SELECT 1")
    return late()


class OddError(Exception):
    pass
# ---- Late ----
def late():
    raise ValueError("no")


def late():
    pass
'''
    layout = Layout(source)
    assert layout.docstring_sections() == ["Early", "Late"] == layout.order
    assert layout.forward_uses() == {("Early", "Late"): {"late"}}
    assert layout.definitions["late"] == [(18, "Late"), (22, "Late")]
    assert layout.calls_in_sections("execute") == {"Early"}
