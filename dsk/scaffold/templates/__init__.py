"""Templates of ``dsk new-plugin``: :mod:`.common` (the files every kind shares) and one module per kind.

A kind's module defines ``SUMMARY`` (one line), ``MODULE`` (the implementation module's name), ``TABLE`` (the recipe table it
fills), ``IMPL_NAME`` (the implemented attribute, ``str.format`` over the names below), ``CONTRACT`` (the suites its tests run), ``CONFIG``,
``IMPL`` and ``TEST`` (``string.Template`` texts over ``$dist $pkg $comp $kind $Class $Config $module $impl $hook
$summary $Summary $table $dsk_req $contract``), optionally ``PLUGIN``, and ``RECIPE``: the example recipe's tables that differ from
:data:`.common.RECIPE_BASE` (a table mapped to None is left out).
"""
