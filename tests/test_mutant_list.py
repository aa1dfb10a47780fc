"""The mutant list (tests/mutants.py) names text that is in the code: a change that rewrites
a mutated line fails here, in the suite, rather than only in the slow mutant run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.mutants import COPIED, MUTANTS, ROOT, Mutant


@pytest.mark.parametrize("mutant", MUTANTS, ids=[mutant.name for mutant in MUTANTS])
def test_each_mutation_applies_to_the_code_once(mutant: Mutant, tmp_path: Path) -> None:
    target = tmp_path / mutant.path
    target.parent.mkdir(parents=True)
    shutil.copy(ROOT / mutant.path, target)
    mutant.apply(tmp_path)  # raises LookupError when the text is not (once) there
    assert target.read_text() != (ROOT / mutant.path).read_text()


def test_every_mutated_file_is_in_the_copied_tree() -> None:
    assert all(mutant.path.split("/")[0] in COPIED for mutant in MUTANTS)
