"""dsk_moe: DeepSeekMoE FFN layers and routers (auxiliary-loss-free balancing, group-limited routing).

Components: ffn ``moe`` and ``dense``; router ``noaux_tc``, ``aux_loss`` and ``greedy``. See MOE.md.
"""

__version__ = "0.1.0"
