"""The test suite (a package, so that `tests.*` never resolves to another distribution's
top-level `tests`, e.g. robustbench 1.1.1 installs one)."""
