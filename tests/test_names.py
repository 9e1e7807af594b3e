"""Names in the package: a class name says which class it is (issue 24 item 6)."""

import ast
import collections
import pathlib

from twisted.trial import unittest

import mailingest

# The store's engine transaction helper, renamed on the store roles branch; remove when merged.
PENDING = {"Transaction"}


def class_names() -> dict[str, list[str]]:
    """Every class defined in the package (at any depth), by name: the modules defining it."""
    root = pathlib.Path(mailingest.__file__).parent
    found = collections.defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                found[node.name].append(str(path.relative_to(root)))
    return found


class ClassNameTests(unittest.TestCase):
    def test_no_two_classes_share_a_name(self):
        found = class_names()
        self.assertIn("delivery/session.py", found["Session"])
        duplicates = {name: paths for name, paths in found.items() if len(paths) > 1 and name not in PENDING}
        self.assertEqual(duplicates, {})
