"""Vendored example data for :mod:`adjointhydro` (see ``README.md`` in this folder).

Load it with :func:`adjointhydro.data.load_leaf_river`. This subpackage holds data
files only; it exists so that ``importlib.resources`` can find them once installed.
"""
