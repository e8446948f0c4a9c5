"""dsk_optim: the optimizers of dsk (kind ``optimizer``): ``adamw``."""
