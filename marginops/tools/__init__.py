"""Tools built on the marginops library: the ``marginops`` command (cli), the benchmark (bench),
the digits demo (demo) and peak-memory measurement (memory).

The library (every marginops module outside this package) never imports from here; the tools
import the library like any user would (tests/test_layout.py holds both)."""
