"""Contract suites a plugin's own tests call with its component, one module per family of kinds.

Each ``check_*`` function builds the component (from a ``build()`` callable, so that it can make fresh ones),
runs it at tiny sizes and raises ``AssertionError`` with a message that says what is wrong and what to fix.
Import the module of the kind you test, e.g. ``from dsk.testing.contracts.model import check_router``.
"""
