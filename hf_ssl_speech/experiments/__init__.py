"""Experiments that answer a question end to end with the library.

`low_resource` (does SSL pay with few labels?) runs the stages; `config` holds its settings, `report` its tables
and plots.
"""
