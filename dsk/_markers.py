"""pluggy markers for the ``dsk`` project (kept apart so that importing them is cheap)."""

import pluggy

hookspec = pluggy.HookspecMarker("dsk")
hookimpl = pluggy.HookimplMarker("dsk")
