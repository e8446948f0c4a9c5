"""dsk-sinkhorn: a dsk plugin adding the router component "sinkhorn".

Token-to-expert assignment balanced by Sinkhorn-Knopp iterations during training (S-BASE).
"""

__version__ = "0.1.0"
